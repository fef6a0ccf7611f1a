"""Image decoding: every PIL mode reaches 8-bit RGB by a stated rule, checked pixel by pixel.

Each test builds an image with numpy, saves it in a format that stores that mode (or, for modes
no file format stores, converts it in memory), decodes it with ``load_rgb`` / ``convert_to_rgb``
and compares against a conversion written here from the rule (docs/contracts.md, "Image
decoding"). Images that no rule maps to 8 bits are refused, naming stimulus, mode and range.
"""

from __future__ import annotations

import colorsys
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import xmodal.stimuli as stimuli
from xmodal.stimuli import StimulusError, convert_to_rgb, load_rgb, read_manifest, write_manifest

RNG = np.random.default_rng(0)


def _rgb(path: Path, sid: str = "s") -> np.ndarray:
    im = load_rgb(path, sid)
    assert im.mode == "RGB"
    return np.asarray(im)


def _gray3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1)


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour): 0 gray, 2 RGB,
    4 gray+alpha, 6 RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _tiff16_rgb(arr: np.ndarray, extra_samples: int = 2, photometric: int = 2) -> bytes:
    """An uncompressed little-endian 16-bit RGB (or RGBA: ``extra_samples`` 2 unassociated, 1
    associated alpha; or with ``photometric`` 5, CMYK) TIFF, tag by tag (Pillow cannot write
    one)."""
    h, w, n = arr.shape
    data = arr.astype("<u2").tobytes()
    bps_at = 8 + len(data)  # BitsPerSample (n values) follows the pixel data
    short, long_ = 3, 4
    tags = [(256, short, 1, w), (257, short, 1, h), (258, short, n, bps_at), (259, short, 1, 1),
            (262, short, 1, photometric), (273, long_, 1, 8), (277, short, 1, n),
            (278, short, 1, h), (279, long_, 1, len(data)), (284, short, 1, 1)]  # fmt: skip
    tags += [(338, short, 1, extra_samples)] if n == 4 and photometric == 2 else []
    ifd = struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        inline = typ == short and count == 1
        ifd += struct.pack("<HHIHH" if inline else "<HHII", tag, typ, count, value, *[0] * inline)
    head = b"II*\x00" + struct.pack("<I", bps_at + 2 * n)
    return head + data + struct.pack(f"<{n}H", *[16] * n) + ifd + struct.pack("<I", 0)


def _tiff_gray(arr: np.ndarray, photometric: int, deflate: bool = False) -> bytes:
    """A one-channel little-endian TIFF with the given PhotometricInterpretation (0 white is
    zero, 1 black is zero); SampleFormat from the dtype (1 unsigned, 2 signed, 3 float)."""
    h, w = arr.shape
    data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    data = zlib.compress(data) if deflate else data
    fmt = {"u": 1, "i": 2, "f": 3}[arr.dtype.kind]
    short, long_ = 3, 4
    tags = [(256, short, 1, w), (257, short, 1, h), (258, short, 1, 8 * arr.dtype.itemsize),
            (259, short, 1, 8 if deflate else 1), (262, short, 1, photometric),
            (273, long_, 1, 8), (277, short, 1, 1), (278, short, 1, h),
            (279, long_, 1, len(data)), (284, short, 1, 1), (339, short, 1, fmt)]  # fmt: skip
    ifd = struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        inline = typ == short
        ifd += struct.pack("<HHIHH" if inline else "<HHII", tag, typ, count, value, *[0] * inline)
    pad = b"\x00" * (len(data) % 2)
    head = b"II*\x00" + struct.pack("<I", 8 + len(data) + len(pad))
    return head + data + pad + ifd + struct.pack("<I", 0)


# ======================================================================= high bit depth, float
def test_16bit_grayscale_png_ramp_becomes_the_8bit_ramp(tmp_path, caplog):
    # before: Pillow's convert("RGB") clipped at 255, so the whole image came out white
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(1, 256)  # 0, 257, ..., 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "ramp.png", "ramp")
    np.testing.assert_array_equal(got, _gray3(np.arange(256, dtype=np.uint8)[None]))
    assert "stimulus 'ramp': converting I;16 image" in caplog.text
    assert "16-bit grayscale (values 0..65535) scaled to 8 bits (v >> 8)" in caplog.text


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I;16L", "TIFF")])
def test_16bit_grayscale_random(tmp_path, mode, fmt):
    a = RNG.integers(0, 65536, (17, 23), dtype=np.uint16)
    a[0, 0] = 65535
    raw = a.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    Image.frombytes(mode, (23, 17), raw).save(tmp_path / "g.img", fmt)
    np.testing.assert_array_equal(_rgb(tmp_path / "g.img"), _gray3((a // 256).astype(np.uint8)))


def _bmp565(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-pixel BMP (BI_BITFIELDS, 5-6-5 bits: Windows tools, embedded cameras)."""
    h, w, _ = rgb.shape
    r, g, b = (rgb[..., 0] >> 3).astype(np.uint16), rgb[..., 1] >> 2, rgb[..., 2] >> 3
    px = ((r << 11) | (g.astype(np.uint16) << 5) | b).astype("<u2")
    stride = (w * 2 + 3) // 4 * 4
    rows = b"".join(px[y].tobytes().ljust(stride, b"\0") for y in range(h - 1, -1, -1))
    dib = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 16, 3, len(rows), 2835, 2835, 0, 0)
    masks = struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    off = 14 + len(dib) + len(masks)
    return b"BM" + struct.pack("<IHHI", off + len(rows), 0, 0, off) + dib + masks + rows


def test_a_565_bmp_has_packed_pixels_not_16bit_samples(tmp_path, caplog):
    """Pillow's raw mode BGR;16 holds 5-6-5 bits per pixel, which it expands to 8-bit samples:
    the 16-bit rules called a dark one 12-bit data and refused a black one."""
    dark = RNG.integers(0, 16, (8, 8, 3)).astype(np.uint8)
    (tmp_path / "dark.bmp").write_bytes(_bmp565(dark))
    (tmp_path / "black.bmp").write_bytes(_bmp565(np.zeros((8, 8, 3), np.uint8)))
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "dark.bmp", "dark")
        assert not _rgb(tmp_path / "black.bmp", "black").any()
    r5, g6, b5 = dark[..., 0] >> 3, dark[..., 1] >> 2, dark[..., 2] >> 3
    want = np.stack([(r5 << 3) | (r5 >> 2), (g6 << 2) | (g6 >> 4), (b5 << 3) | (b5 >> 2)], -1)
    np.testing.assert_array_equal(got, want)
    assert "16-bit" not in caplog.text


def test_16bit_colour_png_keeps_the_high_byte(tmp_path, caplog):
    rgb = RNG.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png16(rgb, 2))
    rgba = RNG.integers(0, 65536, (9, 11, 4), dtype=np.uint16)
    (tmp_path / "rgba16.png").write_bytes(_png16(rgba, 6))
    (tmp_path / "rgb16.tif").write_bytes(_tiff16_rgb(rgb))
    # associated alpha: Pillow's raw mode RGBa;16L (the 5-6-5 rule first refused it)
    opaque = np.concatenate([rgba[..., :3], np.full_like(rgba[..., :1], 65535)], axis=-1)
    (tmp_path / "rgba16.tif").write_bytes(_tiff16_rgb(opaque, extra_samples=1))
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        np.testing.assert_array_equal(_rgb(tmp_path / "rgb16.png"), rgb >> 8)
        np.testing.assert_array_equal(_rgb(tmp_path / "rgba16.png"), rgba[..., :3] >> 8)
        np.testing.assert_array_equal(_rgb(tmp_path / "rgb16.tif"), rgb >> 8)
        np.testing.assert_array_equal(_rgb(tmp_path / "rgba16.tif"), opaque[..., :3] >> 8)
    assert "16-bit samples reduced to 8 bits by Pillow (v >> 8)" in caplog.text


def test_float_tiff_on_0_1_is_scaled_by_255(tmp_path, caplog):
    # before: Pillow's convert("RGB") truncated [0, 1] to 0 or 1, so the image came out black
    a = RNG.random((13, 19)).astype(np.float32)
    a[0, :3] = [0.0, 1.0, 0.5]
    Image.fromarray(a).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "f.tif", "flt")
    expected = np.array([[round(255 * float(v)) for v in row] for row in a], dtype=np.uint8)
    np.testing.assert_array_equal(got, _gray3(expected))
    assert "float grayscale (values 0..1) scaled to 8 bits as round(255 v)" in caplog.text


def test_int32_tiff_in_16bit_range(tmp_path):
    a = RNG.integers(0, 65536, (8, 8)).astype(np.int32)
    a[0, 0] = 40000
    Image.fromarray(a).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(_rgb(tmp_path / "i.tif"), _gray3((a >> 8).astype(np.uint8)))


@pytest.mark.parametrize(
    "values, match",
    [
        (np.array([[0, 70000]], np.int32), r"mode I\) with values 0\.\.70000: outside 0\.\.65535"),
        (np.array([[-5, 300]], np.int32), r"mode I\) with values -5\.\.300: outside"),
        (np.array([[0, 255]], np.uint16), r"mode I;16\) with values 0\.\.255, all below 256"),
        (np.array([[0.0, 255.0]], np.float32), r"mode F\) with values 0\.\.255: only .*\[0, 1\]"),
        (np.array([[-0.2, 0.5]], np.float32), r"mode F\) with values -0\.2\.\.0\.5"),
        (np.array([[np.nan, 0.5]], np.float32), r"mode F\) with 1 NaN or infinite"),
    ],
    ids=["int_above_16bit", "int_negative", "16bit_all_below_256", "float_0_255", "float_negative",
         "float_nan"],
)  # fmt: skip
def test_no_rule_to_8_bits_is_refused_naming_stimulus_mode_and_range(tmp_path, values, match):
    Image.fromarray(values).save(tmp_path / "x.tif")
    with pytest.raises(StimulusError, match=r"stimulus 'sx': image .*x\.tif: .*" + match):
        load_rgb(tmp_path / "x.tif", "sx")


def test_refusal_in_the_up_front_check_names_the_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    Image.fromarray(np.array([[0.0, 2.0]], np.float32)).save(tmp_path / "bad.tif")
    cols = {"stimulus_id": ["a", "b"], "image": ["ok.png", "bad.tif"], "caption": ["x", "y"]}
    import pandas as pd

    path = write_manifest(pd.DataFrame(cols), tmp_path / "stimuli.tsv")
    with pytest.raises(StimulusError, match=r"1 image\(s\).*\['b'\].*first: line 3, stimulus 'b'"):
        read_manifest(path, verify_images=True)


def test_dark_16bit_image_is_converted_with_a_warning(tmp_path, caplog):
    a = RNG.integers(0, 4096, (8, 8), dtype=np.uint16)  # 12-bit camera data in a 16-bit file
    a[0, :2] = [4095, 0]
    Image.fromarray(a).save(tmp_path / "d.png")
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "d.png", "dark")
    np.testing.assert_array_equal(got, _gray3((a >> 8).astype(np.uint8)))
    assert "stimulus 'dark'" in caplog.text and "values 0..4095 of 0..65535" in caplog.text


# ======================================================================= 8-bit modes
def test_bilevel_grayscale_and_palette(tmp_path):
    bits = RNG.integers(0, 2, (10, 12)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(_rgb(tmp_path / "b.png"), _gray3(bits * np.uint8(255)))

    gray = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "l.png"), _gray3(gray))

    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.tobytes())
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "p.png"), palette[index])


def test_alpha_is_discarded_keeping_the_stored_colour(tmp_path, caplog):
    rgba = RNG.integers(0, 256, (10, 12, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(RNG.random((10, 12)) < 0.25, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    la = RNG.integers(0, 256, (10, 12, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.tobytes())
    p.info["transparency"] = int(index[0, 0])
    p.save(tmp_path / "pt.png", transparency=int(index[0, 0]))
    pa = Image.merge("PA", [p, Image.fromarray(rgba[..., 3])])
    pa.save(tmp_path / "pa.tif")
    assert Image.open(tmp_path / "pa.tif").mode == "PA"
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        np.testing.assert_array_equal(_rgb(tmp_path / "a.png", "rgba"), rgba[..., :3])
        np.testing.assert_array_equal(_rgb(tmp_path / "la.png"), _gray3(la[..., 0]))
        np.testing.assert_array_equal(_rgb(tmp_path / "pt.png"), palette[index])
        np.testing.assert_array_equal(_rgb(tmp_path / "pa.tif"), palette[index])
    frac = 100 * float(np.mean(rgba[..., 3] < 255))
    assert f"stimulus 'rgba': converting RGBA image {tmp_path / 'a.png'} to RGB" in caplog.text
    assert f"alpha discarded ({frac:.1f}% of pixels not fully opaque" in caplog.text


def test_premultiplied_alpha_is_unpremultiplied_first():
    straight = RNG.integers(0, 256, (9, 9)).astype(np.int64)
    alpha = RNG.integers(1, 256, (9, 9)).astype(np.int64)
    pre = (straight * alpha + 127) // 255  # premultiplied, rounded
    band = Image.fromarray(pre.astype(np.uint8))
    a_band = Image.fromarray(alpha.astype(np.uint8))
    expected = np.minimum(pre * 255 // alpha, 255).astype(np.uint8)  # Pillow truncates
    for mode, bands in [("La", [band, a_band]), ("RGBa", [band, band, band, a_band])]:
        rgb, what = convert_to_rgb(Image.merge(mode, bands))
        np.testing.assert_array_equal(np.asarray(rgb), _gray3(expected))
        assert what.startswith(f"premultiplied {mode} un-premultiplied")


def test_cmyk_ycbcr_hsv_rgbx(tmp_path):
    x = RNG.integers(0, 256, (12, 14, 4), dtype=np.uint8)
    c, k = x[..., :3].astype(np.int64), x[..., 3:].astype(np.int64)
    Image.merge("CMYK", [Image.fromarray(x[..., i]) for i in range(4)]).save(tmp_path / "c.tif")
    expected = np.rint((255 - c) * (255 - k) / 255)
    np.testing.assert_array_equal(_rgb(tmp_path / "c.tif"), expected)

    Image.merge("YCbCr", [Image.fromarray(x[..., i]) for i in range(3)]).save(tmp_path / "y.tif")
    assert Image.open(tmp_path / "y.tif").mode == "YCbCr"
    y, cb, cr = (x[..., i].astype(float) for i in range(3))
    jpeg = np.stack(  # JPEG (JFIF) full-range YCbCr
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
         y + 1.772 * (cb - 128)], axis=-1,
    )  # fmt: skip
    got = _rgb(tmp_path / "y.tif").astype(float)
    assert np.abs(got - np.clip(np.rint(jpeg), 0, 255)).max() <= 1

    hsv = Image.merge("HSV", [Image.fromarray(x[..., i]) for i in range(3)])
    rgb, _ = convert_to_rgb(hsv)
    ref = [[colorsys.hsv_to_rgb(*(x[i, j, :3] / 255)) for j in range(14)] for i in range(12)]
    np.testing.assert_array_equal(np.asarray(rgb), np.rint(np.array(ref) * 255))

    rgbx, what = convert_to_rgb(Image.fromarray(x, "RGBX"))
    np.testing.assert_array_equal(np.asarray(rgbx), x[..., :3])
    assert what == "padding band of RGBX dropped"


def test_cielab_to_srgb(tmp_path):
    """LAB (D50, as ICC profiles) to sRGB (D65, Bradford adaptation), well inside the gamut."""
    lab8 = np.stack(
        [RNG.integers(20, 236, (30, 30)), RNG.integers(98, 159, (30, 30)),
         RNG.integers(98, 159, (30, 30))], axis=-1,
    ).astype(np.uint8)  # fmt: skip
    Image.merge("LAB", [Image.fromarray(lab8[..., i]) for i in range(3)]).save(tmp_path / "l.tif")
    assert Image.open(tmp_path / "l.tif").mode == "LAB"
    f = lab8.astype(float)
    fy = (f[..., 0] * 100 / 255 + 16) / 116
    fx, fz = fy + (f[..., 1] - 128) / 500, fy - (f[..., 2] - 128) / 200
    d = 6 / 29

    def finv(t: np.ndarray) -> np.ndarray:
        return np.where(t > d, t**3, 3 * d * d * (t - 4 / 29))

    xyz50 = np.stack([0.96422 * finv(fx), finv(fy), 0.82521 * finv(fz)], axis=-1)
    bradford_50_to_65 = np.array(
        [[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
         [0.0122982, -0.0204830, 1.3299098]]
    )  # fmt: skip
    xyz_to_srgb = np.array(
        [[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]
    )
    lin = xyz50 @ bradford_50_to_65.T @ xyz_to_srgb.T
    inside = ((lin > 0.05) & (lin < 0.95)).all(axis=-1)
    assert inside.mean() > 0.5
    enc = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.abs(lin) ** (1 / 2.4) - 0.055)
    got = _rgb(tmp_path / "l.tif").astype(float)
    diff = np.abs(got - np.rint(enc * 255))[inside]
    # Pillow's conversion (it agrees with LittleCMS's) is a few levels from the closed form at
    # most; a naive band copy, the failure this guards against, is off by ~100
    assert np.mean(diff <= 1) > 0.95 and diff.max() <= 10


# ======================================================================= EXIF, frames, huge
def test_exif_orientation_is_ignored_and_counted(tmp_path, caplog):
    """As timm: the pixels as stored. Logged per stimulus and counted by the up-front check."""
    import pandas as pd

    pixels = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    Image.fromarray(pixels).save(tmp_path / "r.png", exif=exif)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "r.png", "rot")
    np.testing.assert_array_equal(got, pixels)  # not rotated: 6 x 10 as stored
    assert (
        "stimulus 'rot': image" in caplog.text
        and "EXIF orientation 6 (viewers rotate 90° CW to display it)" in caplog.text
    )
    cols = {"stimulus_id": ["rot", "p"], "image": ["r.png", "plain.png"], "caption": ["a", "b"]}
    path = write_manifest(pd.DataFrame(cols), tmp_path / "stimuli.tsv")
    caplog.clear()
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        read_manifest(path, verify_images=True)
    assert "1 stimuli carry a non-default EXIF orientation ['rot']" in caplog.text
    assert any(r.levelname == "WARNING" and "EXIF" in r.getMessage() for r in caplog.records)


def test_first_frame_of_an_animation(tmp_path, caplog):
    frames = [Image.new("RGB", (5, 4), (255 * (i == 0), 80 * i, 0)) for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "a.gif", "gif")
    np.testing.assert_array_equal(got, np.asarray(frames[0]))
    assert "stimulus 'gif': image" in caplog.text and "has 3 frames; using the first" in caplog.text


def _box_reduce(rgb: np.ndarray, f: int) -> np.ndarray:
    """Pillow's reduce(f): mean over f x f blocks (partial blocks at the edge), rounded."""
    h, w = rgb.shape[:2]
    out = np.zeros((-(-h // f), -(-w // f), 3))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = rgb[i * f : (i + 1) * f, j * f : (j + 1) * f].reshape(-1, 3).mean(0)
    return out


@pytest.mark.parametrize("mode", ["P", "I;16", "1"])
def test_huge_image_of_any_mode_is_converted_then_reduced(tmp_path, monkeypatch, mode):
    # before: reduce() refused P, 1 and I;16 ("image has wrong mode"): a StimulusError
    monkeypatch.setattr(stimuli, "MAX_SIDE", 40)
    if mode == "I;16":
        a = RNG.integers(0, 65536, (90, 130), dtype=np.uint16)
        a[0, 0] = 65535
        Image.fromarray(a).save(tmp_path / "big.png")
        full = _gray3((a >> 8).astype(np.uint8))
    elif mode == "1":
        bits = RNG.integers(0, 2, (90, 130)).astype(bool)
        Image.fromarray(bits).save(tmp_path / "big.png")
        full = _gray3(bits * np.uint8(255))
    else:
        palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
        index = RNG.integers(0, 256, (90, 130), dtype=np.uint8)
        p = Image.fromarray(index, "P")
        p.putpalette(palette.tobytes())
        p.save(tmp_path / "big.png")
        full = palette[index]
    assert Image.open(tmp_path / "big.png").mode == mode
    got = _rgb(tmp_path / "big.png")
    assert got.shape == (23, 33, 3)  # factor ceil(130 / 40) = 4
    assert np.abs(got - _box_reduce(full.astype(float), 4)).max() <= 1


def test_modes_no_file_stores_are_converted_in_memory_too():
    """``convert_to_rgb`` is the one rule: every mode Pillow has is handled or refused by name."""
    for mode in Image.MODES if hasattr(Image, "MODES") else []:
        im = Image.new(mode, (3, 2))
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            im = Image.frombytes(mode, (3, 2), np.full(6, 1000, np.uint16).tobytes())
        elif mode == "I":
            im = Image.fromarray(np.full((2, 3), 1000, np.int32))
        rgb, _ = convert_to_rgb(im, "m")
        assert rgb.mode == "RGB" and rgb.size == (3, 2), mode


def test_unknown_mode_is_refused():
    class Odd:
        mode = "BGR;15"

    with pytest.raises(StimulusError, match=r"stimulus 'z': image mode 'BGR;15' is not supported"):
        convert_to_rgb(Odd(), "z")  # type: ignore[arg-type]


def test_io_bytes_source_and_path_give_the_same_pixels(tmp_path):
    a = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    a[0, 0] = 65535
    Image.fromarray(a).save(tmp_path / "g.png")
    via_bytes = stimuli._decode(io.BytesIO((tmp_path / "g.png").read_bytes()), "s", "g.png")
    np.testing.assert_array_equal(np.asarray(via_bytes.image), _rgb(tmp_path / "g.png"))


@pytest.mark.parametrize("deflate", [False, True])
def test_white_is_zero_tiffs_are_inverted_at_every_depth(tmp_path, caplog, deflate):
    """TIFF PhotometricInterpretation 0 (scanners, MONOCHROME1 converters): Pillow inverts
    8-bit samples but not 16-bit or float ones, which reached the model as a negative."""
    ramp8 = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (5, 1))
    want = _gray3(ramp8)
    stored = {
        "w8": 255 - ramp8,
        "w16": (65535 - ramp8.astype(np.uint16) * 257).astype(np.uint16),
        "wf": (1 - ramp8 / 255).astype(np.float32),
        "b16": (ramp8.astype(np.uint16) * 257).astype(np.uint16),  # black is zero, for contrast
    }
    for name, a in stored.items():
        photometric = 1 if name.startswith("b") else 0
        (tmp_path / f"{name}.tif").write_bytes(_tiff_gray(a, photometric, deflate))
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        for name in stored:
            np.testing.assert_array_equal(_rgb(tmp_path / f"{name}.tif", name), want, name)
    assert "white-is-zero (TIFF PhotometricInterpretation 0) inverted" in caplog.text


def test_signed_16bit_tiff_is_refused(tmp_path):
    """int16 samples (SampleFormat 2): a 0..32767 image came out at half brightness, unsaid."""
    ramp = np.tile(np.linspace(0, 32767, 64).round().astype(np.int16), (4, 1))
    (tmp_path / "s16.tif").write_bytes(_tiff_gray(ramp, 1))
    with pytest.raises(StimulusError, match=r"'s16'.*signed 16-bit samples"):
        load_rgb(tmp_path / "s16.tif", "s16")


def test_signed_8bit_tiff_is_refused(tmp_path):
    """int8 samples (SampleFormat 2): Pillow reads them as L, so -128..-1 reached the models as
    128..255 (a dark-to-bright ramp turned bright at its dark end), with exit 0."""
    ramp = np.tile(np.array([-128, -64, -1, 0, 1, 64, 127], dtype=np.int8), (4, 1))
    (tmp_path / "s8.tif").write_bytes(_tiff_gray(ramp, 1))
    with Image.open(tmp_path / "s8.tif") as im:
        assert im.mode == "L"
    with pytest.raises(StimulusError, match=r"'s8'.*signed 8-bit samples"):
        load_rgb(tmp_path / "s8.tif", "s8")
    unsigned = ramp.astype(np.int16) + 128  # the same ramp stored unsigned is read as it is
    (tmp_path / "u8.tif").write_bytes(_tiff_gray(unsigned.astype(np.uint8), 1))
    np.testing.assert_array_equal(_rgb(tmp_path / "u8.tif"), _gray3(unsigned.astype(np.uint8)))


def _tiff12(values: list[int]) -> bytes:
    """A one-row little-endian grayscale TIFF of 12-bit samples, packed two in three bytes (as
    microscopes and scientific cameras write them; Pillow cannot write one)."""
    assert len(values) % 2 == 0
    data = b"".join(
        bytes([a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF])
        for a, b in zip(values[::2], values[1::2], strict=True)
    )
    short, long_ = 3, 4
    tags = [(256, short, len(values)), (257, short, 1), (258, short, 12), (259, short, 1),
            (262, short, 1), (273, long_, 0), (277, short, 1), (278, short, 1),
            (279, long_, len(data))]  # fmt: skip
    at = 8 + 2 + 12 * len(tags) + 4  # the pixels follow the one IFD
    ifd = struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        value = at if tag == 273 else value
        ifd += struct.pack("<HHIHH" if typ == short else "<HHII", tag, typ, 1, value,
                           *[0] * (typ == short))  # fmt: skip
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def test_a_12_bit_tiff_is_scaled_by_its_declared_depth(tmp_path, caplog):
    """TIFF BitsPerSample 12 comes from Pillow as I;16 holding 0..4095: scaled as 16-bit data
    (v >> 8) the image came out nearly black (4095 -> 15), with a warning that called it dark
    16-bit data. It is scaled by its declared depth: v >> 4, 4095 -> 255."""
    values = [0, 1024, 2048, 4095, 17, 3000]
    (tmp_path / "t12.tif").write_bytes(_tiff12(values))
    assert Image.open(tmp_path / "t12.tif").mode == "I;16"
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "t12.tif", "cam")
    want = (np.array([values]) >> 4).astype(np.uint8)
    np.testing.assert_array_equal(got, _gray3(want))
    assert "12-bit samples (0..4095) scaled to 16 bits (v << 4)" in caplog.text
    assert "comes out dark" not in caplog.text


def test_a_thin_large_jpeg_decodes(tmp_path):
    """A JPEG over MAX_SIDE whose short side is below the reduction factor (9000 x 2) asked
    Pillow's draft for a height of 0: a ZeroDivisionError that named no stimulus or file."""
    Image.new("RGB", (9000, 2), (200, 10, 10)).save(tmp_path / "thin.jpg")
    got = _rgb(tmp_path / "thin.jpg", "pano")
    assert got.shape[0] == 1 and 1000 < got.shape[1] <= stimuli.MAX_SIDE  # reduced, as any
    assert np.abs(got.astype(int) - [200, 10, 10]).max() < 8


def _tiff_planar16(rgb: np.ndarray) -> bytes:
    """An uncompressed little-endian 16-bit RGB TIFF stored as three colour planes
    (PlanarConfiguration 2, tifffile's default for a (3, H, W) array; Pillow cannot write one)."""
    h, w, _ = rgb.shape
    planes = [np.ascontiguousarray(rgb[..., c]).astype("<u2").tobytes() for c in range(3)]
    short, long_ = 3, 4
    n_tags = 10
    extra = 8 + 2 + 12 * n_tags + 4  # arrays follow the one IFD, then the planes
    bits_at, offsets_at, counts_at = extra, extra + 6, extra + 18
    first = extra + 30
    offsets = [first + k * len(planes[0]) for k in range(3)]
    tags = [(256, short, 1, w), (257, short, 1, h), (258, short, 3, bits_at), (259, short, 1, 1),
            (262, short, 1, 2), (273, long_, 3, offsets_at), (277, short, 1, 3),
            (278, short, 1, h), (279, long_, 3, counts_at), (284, short, 1, 2)]  # fmt: skip
    ifd = struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        if typ == short and count == 1:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    arrays = struct.pack("<3H", 16, 16, 16) + struct.pack("<3I", *offsets)
    arrays += struct.pack("<3I", *[len(p) for p in planes])
    return (
        b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + arrays + b"".join(planes)
    )


def test_a_16bit_tiff_of_colour_planes_is_refused(tmp_path):
    """Pillow decodes an uncompressed 16-bit RGB TIFF stored as separate planes as 8-bit
    samples, high and low bytes interleaved: it reached the models as noise, unsaid. Refused,
    naming the stimulus and the layout; the same pixels interleaved decode as v >> 8."""
    rgb = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    (tmp_path / "planar.tif").write_bytes(_tiff_planar16(rgb))
    im = Image.open(tmp_path / "planar.tif")
    assert im.mode == "RGB" and im.tag_v2[284] == 2  # what Pillow makes of it
    with pytest.raises(StimulusError, match=r"'cam'.*16-bit samples.*PlanarConfiguration 2"):
        load_rgb(tmp_path / "planar.tif", "cam")
    (tmp_path / "contig.png").write_bytes(_png16(rgb, 2))
    np.testing.assert_array_equal(_rgb(tmp_path / "contig.png"), (rgb >> 8).astype(np.uint8))


@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_a_tiff_with_an_orientation_is_refused(tmp_path, orientation):
    """Pillow's TIFF loader applies the Orientation tag while decoding (every other format is
    used as stored), for some layouts scrambling the pixels (an 8-bit gray 6 x 4 image with
    Orientation 6 came out as neither): refused, naming the stimulus; Orientation 1 decodes."""
    pixels = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "o.tif", exif=exif.tobytes())
    if orientation == 1:
        np.testing.assert_array_equal(_rgb(tmp_path / "o.tif"), _gray3(pixels))
        return
    with pytest.raises(StimulusError, match=rf"'scan'.*TIFF with Orientation {orientation}"):
        load_rgb(tmp_path / "o.tif", "scan")


def test_a_truncated_multipage_file_is_refused_naming_the_stimulus(tmp_path):
    """Pillow raises TypeError or IndexError (not OSError) on some truncated multi-frame files:
    they escaped as a traceback naming no stimulus or file. Any decoding error now names both."""
    frames = [Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    (tmp_path / "cut.tif").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 10])
    with pytest.raises(StimulusError, match=r"'pages'.*cannot decode image .*cut\.tif \(\w+Error"):
        load_rgb(tmp_path / "cut.tif", "pages")


@pytest.mark.parametrize(("top", "dark"), [(15 << 8 | 255, True), (16 << 8, False), (65535, False)])
def test_16bit_rgb_is_dark_only_within_12_bits(tmp_path, caplog, top, dark):
    """A 16-bit RGB PNG that Pillow reduces (v >> 8) is warned dark when it uses at most 12 of
    its 16 bits (max below 4096: at most 15 after the shift), and not from 4096 up."""
    a = RNG.integers(0, 256, (4, 4, 3)).astype(np.uint16)
    a[0, 0, 0] = top
    (tmp_path / "c.png").write_bytes(_png16(a, 2))
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "c.png", "c")
    np.testing.assert_array_equal(got, (a >> 8).astype(np.uint8))
    assert ("uses at most 12 of its 16 bits" in caplog.text) is dark


def _ppm16(rgb: np.ndarray, maxval: int) -> bytes:
    """A binary PPM (P6) of 16-bit samples with maximum value ``maxval``, as dcraw -4 and netpbm
    write them."""
    h, w, _ = rgb.shape
    return f"P6\n{w} {h}\n{maxval}\n".encode() + rgb.astype(">u2").tobytes()


def test_a_16bit_ppm_is_checked_as_16bit_colour(tmp_path, caplog):
    """A PPM names its depth only by its maximum value, so a 16-bit one skipped the 16-bit
    checks: 8-bit values in it reached the models black (max 1 of 255), 12-bit values dark,
    with no word, and the stimuli report called it unconverted (audit). Pillow reduces it by
    its white level, round(v · 255 / maxval); that is said, and it is checked as 16-bit PNGs
    are."""
    full = RNG.integers(0, 65536, (6, 5, 3))
    (tmp_path / "full.ppm").write_bytes(_ppm16(full, 65535))
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "full.ppm", "raw")
    np.testing.assert_array_equal(got, np.round(full * 255 / 65535).astype(np.uint8))
    assert "16-bit samples reduced to 8 bits by Pillow (round(v · 255 / 65535)" in caplog.text
    assert "comes out dark" not in caplog.text
    twelve = RNG.integers(0, 4096, (6, 5, 3))
    twelve[0, 0, 0] = 4095
    (tmp_path / "t12.ppm").write_bytes(_ppm16(twelve, 4095))  # its own white level: not dark
    caplog.clear()
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        got = _rgb(tmp_path / "t12.ppm", "t12")
    np.testing.assert_array_equal(got, np.round(twelve * 255 / 4095).astype(np.uint8))
    assert caplog.text == ""
    (tmp_path / "dark.ppm").write_bytes(_ppm16(twelve, 65535))
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        _rgb(tmp_path / "dark.ppm", "dark")
    assert "'dark'" in caplog.text and "comes out dark (max 16 of 255)" in caplog.text
    # a PPM of a smaller maxval holds no 8-bit values in 16 bits: values up to 255 of 300 are
    # 85% white, and of 4095 dark (refused as black at first, review)
    low = RNG.integers(0, 256, (6, 5, 3))
    low[0, 0, 0] = 255
    for maxval, dark in ((300, False), (4095, True)):
        (tmp_path / "low.ppm").write_bytes(_ppm16(low, maxval))
        caplog.clear()
        with caplog.at_level("WARNING", logger="xmodal.stimuli"):
            got = _rgb(tmp_path / "low.ppm", "low")
        np.testing.assert_array_equal(got, np.round(low * 255 / maxval).astype(np.uint8))
        assert ("comes out dark" in caplog.text) is dark, (maxval, caplog.text)
    eight = RNG.integers(0, 256, (6, 5, 3))
    eight[0, 0, 0] = 255
    (tmp_path / "eight.ppm").write_bytes(_ppm16(eight, 65535))
    with pytest.raises(StimulusError, match=r"'eight'.*16-bit RGB image .* it is black"):
        _rgb(tmp_path / "eight.ppm", "eight")
    # the same as a plain (ASCII, P3) PPM, which Pillow decodes with another decoder (mutation)
    text = f"P3\n5 6\n65535\n{' '.join(map(str, eight.ravel()))}\n"
    (tmp_path / "plain.ppm").write_text(text)
    with pytest.raises(StimulusError, match=r"'plain'.*16-bit RGB image .* it is black"):
        _rgb(tmp_path / "plain.ppm", "plain")
    table = stimuli.scan_images(  # the stimuli report says what was done
        pd.DataFrame({"stimulus_id": ["raw"], "image": ["full.ppm"], "caption": ["a"]}),
        tmp_path,
    )
    assert "round(v · 255 / 65535)" in table["conversion"].iloc[0]


def test_a_16bit_cmyk_tiff_of_8bit_values_is_refused(tmp_path, caplog):
    """Pillow keeps the high byte of 16-bit CMYK ink, so 8-bit values in 16-bit samples gave no
    ink: a white image, without a word, where the same values as 16-bit RGB were refused
    (audit). A full-range one converts as an 8-bit CMYK image of its high bytes does."""
    low = RNG.integers(0, 256, (5, 4, 4))
    (tmp_path / "low.tif").write_bytes(_tiff16_rgb(low, photometric=5))
    assert Image.open(tmp_path / "low.tif").mode == "CMYK"
    with pytest.raises(StimulusError, match=r"'ink'.*16-bit CMYK image .* it is white"):
        _rgb(tmp_path / "low.tif", "ink")
    full = RNG.integers(0, 65536, (5, 4, 4))
    (tmp_path / "full.tif").write_bytes(_tiff16_rgb(full, photometric=5))
    want = Image.fromarray((full >> 8).astype(np.uint8), "CMYK").convert("RGB")
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        np.testing.assert_array_equal(_rgb(tmp_path / "full.tif", "cmyk"), np.asarray(want))
    assert caplog.text == ""
    # ink of at most 12 of 16 bits reduces to at most 15 of 255: a pale image, with a warning
    faint = RNG.integers(256, 4096, (5, 4, 4))
    (tmp_path / "faint.tif").write_bytes(_tiff16_rgb(faint, photometric=5))
    want = Image.fromarray((faint >> 8).astype(np.uint8), "CMYK").convert("RGB")
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        np.testing.assert_array_equal(_rgb(tmp_path / "faint.tif", "faint"), np.asarray(want))
    assert "'faint'" in caplog.text and "16-bit CMYK image uses at most 12 of its 16 bits" in (
        caplog.text
    )
    assert f"it comes out pale (max {int(faint.max()) >> 8} of 255)" in caplog.text


def test_a_compressed_tiff_beyond_the_bomb_limit_decodes(tmp_path, monkeypatch):
    """Pillow's TIFF loader checks the decompression-bomb limit again while loading, after the
    raised limit of the open was put back: a compressed TIFF above PIL's limit was refused as a
    bomb where a PNG of the same size decoded (contracts.md: decoded up to 2^30 pixels;
    audit). Here PIL's limit is lowered to make a small image huge."""
    a = RNG.integers(0, 256, (60, 70, 3)).astype(np.uint8)
    for name, kw in (("lzw.tif", {"compression": "tiff_lzw"}), ("p.png", {})):
        Image.fromarray(a).save(tmp_path / name, **kw)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4200 pixels: beyond twice that
    for name in ("lzw.tif", "p.png"):
        np.testing.assert_array_equal(_rgb(tmp_path / name, "big"), a)
    b = a[:50, :50]  # 2500 pixels: beyond twice the limit, within four times (mutation)
    Image.fromarray(b).save(tmp_path / "small.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(_rgb(tmp_path / "small.tif", "big"), b)
    assert Image.MAX_IMAGE_PIXELS == 1000  # put back


def test_a_folder_named_like_an_image_is_said_to_be_a_folder(tmp_path):
    """A folder named like an image (an unzipped ``photo.jpg/``) was reported as an image not
    found, though the path exists (audit)."""
    (tmp_path / "photo.jpg").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = tmp_path / "stimuli.tsv"
    path.write_text("stimulus_id\timage\tcaption\ns1\tphoto.jpg\ta dog\ns2\tok.png\ta cat\n")
    with pytest.raises(StimulusError) as err:
        read_manifest(path)
    said = str(err.value)
    assert "not a regular file (a folder?)" in said and "'s1'" in said and "photo.jpg" in said
    assert "not found" not in said
    # with a file missing too, both are named (the folder's message hid the missing file)
    path.write_text("stimulus_id\timage\tcaption\ns1\tphoto.jpg\ta dog\ns2\tgone.png\ta cat\n")
    with pytest.raises(StimulusError) as err:
        read_manifest(path)
    said = str(err.value)
    assert "image file(s) not found" in said and "'s2'" in said and "gone.png" in said
    assert "1 of them are folders, not files: stimulus ids ['s1']" in said
