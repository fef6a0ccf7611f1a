"""Block loops whose block size is a module constant, run in several blocks.

Every block size below is large enough that the repository's tests ran these loops as one
block, where an off-by-one in the loop (a block one row short, a step past a block's end)
changes nothing. Each test shrinks the constant so that 23 rows (or entries) span several
blocks with a ragged last one, and asserts the one-block result. The GPA's ROW_CHUNK loops are
covered by tests/test_mutants_core.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal import alignment as al
from xmodal import correlate, stats
from xmodal import features as ft
from xmodal import metrics as mt

M = 23  # rows of data: blocks of 7 leave a ragged last block of 2
K = 5


def tied(seed, m=M, p=4, n_dup=5):
    """Small integer features with exact duplicates: integer kernels, many exact kNN ties."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (m, p)).astype(np.float64)
    x[rng.choice(m, n_dup, replace=False)] = x[rng.integers(0, m, n_dup)]
    return x


def brute_sets(g, k):
    """The tie rule: each row sorted on (−value, column), own entry left out."""
    m = len(g)
    return [
        sorted(sorted((j for j in range(m) if j != i), key=lambda j: (-g[i][j], j))[:k])
        for i in range(m)
    ]


def side_arrays(side):
    """Everything a KernelKNN holds that depends on the tie resolution, lists as sorted sets."""
    out = {"gap": side.gap, "unresolved": side.unresolved, "self_hsic": side.self_hsic}
    for name, nb in (("knn", side.knn), ("alt", side.alt)):
        order = torch.argsort(nb.idx, dim=-1)
        out[name + "_idx"] = nb.idx.gather(-1, order)
        out[name + "_val"] = nb.val.gather(-1, order)
        out[name + "_recip"] = nb.recip
    return {key: value.cpu().numpy() for key, value in out.items()}


def knn_outputs(x, y, dense):
    xs = mt.KernelKNN.from_features(x, K, dense=dense)
    ys = mt.KernelKNN.from_features(y, K, dense=dense)
    out = {f"x_{key}": v for key, v in side_arrays(xs).items()}
    out |= {f"y_{key}": v for key, v in side_arrays(ys).items()}
    for metric in ("cknna", "mutual_knn"):
        value, stability = mt.knn_metric(metric, xs, ys)
        out[metric] = value.numpy()
        out[metric + "_stability"] = stability.numpy()
    return out, xs


def assert_same(got, want):
    assert got.keys() == want.keys()
    for key in want:
        if want[key].dtype.kind in "biu":
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0, err_msg=key)


@pytest.mark.parametrize("dense", [True, False])
def test_tied_rows_re_ranked_in_chunks_give_the_one_chunk_lists(monkeypatch, dense):
    """metrics._CHUNK_ELEMS: the rows with a tie at the kNN boundary are re-ranked (lower
    column first; the near-tie alternative in reverse column order) a chunk of rows at a time,
    and on the blocked path list membership is looked up a chunk of entries at a time. With
    chunks of 7 rows (and of 32 entries) the lists, gaps, alternatives, CKNNA, mutual kNN and
    their stabilities are the one-chunk ones, and the lists follow the tie rule."""
    x, y = tied(3), tied(4)
    one, xs = knn_outputs(x, y, dense)
    n_tied = int(xs.unresolved.sum())  # integer kernels: the unresolved rows are exact ties
    assert n_tied > 7 and n_tied % 7, n_tied  # several chunks, the last one ragged
    monkeypatch.setattr(mt, "_CHUNK_ELEMS", 7 * M)
    chunked, xs = knn_outputs(x, y, dense)
    assert_same(chunked, one)
    got = [sorted(row) for row in xs.idx[0].tolist()]
    assert got == brute_sets(x @ x.T, K)


def test_tied_subsets_in_batches_give_the_one_batch_sides(monkeypatch):
    """alignment._MAX_BATCH_ELEMS in subset_sides: subsets of a full kernel are ranked a batch
    of subsets at a time. 23 subsets in batches of 7 give the one-batch lists, gaps and
    CKNNA values with their stabilities."""
    rng = np.random.default_rng(5)
    x, y = tied(6, m=40), tied(7, m=40)
    subsets = np.sort(np.stack([rng.choice(40, 20, replace=False) for _ in range(M)]), axis=1)
    gx, gy = torch.from_numpy(x @ x.T), torch.from_numpy(y @ y.T)

    def batched():
        xs, ys = al.subset_sides(gx, subsets, K), al.subset_sides(gy, subsets, K)
        parts = [mt.knn_metric("cknna", a, b) for a, b in zip(xs, ys, strict=True)]
        return len(xs), {
            "idx": torch.cat([s.idx.sort(dim=-1).values for s in xs]).numpy(),
            "gap": torch.cat([s.gap for s in xs]).numpy(),
            "cknna": torch.cat([p[0] for p in parts]).numpy(),
            "stability": torch.cat([p[1] for p in parts]).numpy(),
        }

    n_one, one = batched()
    monkeypatch.setattr(al, "_MAX_BATCH_ELEMS", 7 * 20 * 20)
    n_batches, got = batched()
    assert (n_one, n_batches) == (1, 4)
    assert_same(got, one)
    assert one["stability"].max() > 0  # the subsets' ties reach the values


def test_list_positions_in_chunks_give_the_one_chunk_bootstrap(monkeypatch):
    """stats._CHUNK: where each neighbour sits in another list (reciprocal entries, K's list
    of L's neighbours) is found a chunk of entries at a time. With chunks of 7 or so entries
    the sides and the resampled CKNNA and mutual kNN are the one-chunk ones."""
    x, y = tied(8, m=40), tied(9, m=40)
    x = x + 0.1 * np.random.default_rng(0).standard_normal(x.shape)  # fewer exact ties
    kk, ll = x @ x.T, y @ y.T
    plan = stats.BootstrapPlan(np.arange(3, 3 + 31), 40, np.random.default_rng(1), k=K)

    def run():
        sx, sy = plan.side(kk), plan.side(ll)
        fields = ("order", "values", "rec", "self_hsic")
        out = {f"{n}_{f}": getattr(s, f).numpy() for n, s in (("x", sx), ("y", sy)) for f in fields}
        out["cknna"] = plan.cknna(sx, sy)
        out["mutual_knn"] = plan.values(sx, sy, "mutual_knn")
        return out

    one = run()
    calls, real = [], stats._list_positions

    def small_chunks(lists, rows, cols):
        n = rows.numel()
        step = next(s for s in range(7, n) if n % s)  # several chunks, the last one ragged
        monkeypatch.setattr(stats, "_CHUNK", step * lists.shape[1])
        calls.append((n, step))
        return real(lists, rows, cols)

    monkeypatch.setattr(stats, "_list_positions", small_chunks)
    got = run()
    assert len(calls) == 4 and all(n > 2 * step for n, step in calls)  # sides, CKNNA, mutual
    assert_same(got, one)


def test_resamples_drawn_in_odd_blocks_are_the_resamples_drawn_at_once(monkeypatch):
    """correlate._BLOCK_ELEMS: resamples are drawn (block, n) at a time. With an odd n and
    blocks of 7 of 25 resamples (161 draws per full block) the random stream, the coefficients and
    the interval are exactly the one-block ones: the interval does not depend on the block."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(M)
    y = x + rng.standard_normal(M)
    one = correlate.bootstrap_coefficients(x, y, "spearman", 25, 11)
    one_ci = correlate.correlation_ci(x, y, n_boot=25, seed=11)
    monkeypatch.setattr(correlate, "_BLOCK_ELEMS", 7 * M)
    assert list(correlate._blocks(25, M)) == [7, 7, 7, 4]
    np.testing.assert_array_equal(correlate.bootstrap_coefficients(x, y, "spearman", 25, 11), one)
    assert correlate.correlation_ci(x, y, n_boot=25, seed=11) == one_ci


def test_abs_quantiles_in_row_blocks_equal_one_block(monkeypatch):
    """metrics._QUANTILE_MAX_NUMEL: abs_quantiles (the clamp threshold's per-stimulus 95th
    percentile of |x|) runs torch.quantile a block of stimuli at a time. Blocks of 7 stimuli
    give the one-block values exactly; a limit below one row's size (np.quantile per row)
    gives them to float32 rounding."""
    x = np.random.default_rng(3).standard_normal((3, M, 11)).astype(np.float32)
    one = mt.abs_quantiles(x)
    monkeypatch.setattr(mt, "_QUANTILE_MAX_NUMEL", 7 * 3 * 11)
    np.testing.assert_array_equal(mt.abs_quantiles(x), one)
    monkeypatch.setattr(mt, "_QUANTILE_MAX_NUMEL", 3 * 11 - 1)
    np.testing.assert_allclose(mt.abs_quantiles(x), one, rtol=1e-6, atol=0)


ATTRS = {"model_id": "org/tiny", "model_key": "tiny", "modality": "language", "source": "test"}


def write(path, x, by_layer=False, **kw):
    """A feature file through the library's writer: the array, or its layers one at a time
    (then abs_q95 is computed from the written dataset)."""
    n_layers, m, _ = x.shape
    ids, names = [f"s{i}" for i in range(m)], [f"layers.{i}" for i in range(n_layers)]
    return ft.write_features(path, iter(list(x)) if by_layer else x, ids, names, ATTRS, **kw)


def test_abs_q95_from_the_file_in_blocks_equals_one_block(tmp_path, monkeypatch):
    """features._QUANTILE_BLOCK: a file written layer by layer gets abs_q95 from the dataset
    on disk, a block of stimuli at a time. Blocks of 7 stimuli store the one-block values,
    which are those of the whole array (and, over 600 stimuli, the array path's blocks of
    256 stimuli give them too)."""
    x = np.random.default_rng(4).standard_normal((3, M, 11)).astype(np.float32)
    whole = ft.abs_quantile_rows(torch.from_numpy(x).transpose(0, 1)).numpy()

    def stored(name):
        with ft.FeatureFile(write(tmp_path / name, x, by_layer=True)) as ff:
            return ff.abs_q95()

    one = stored("one.h5")
    np.testing.assert_array_equal(one, whole)
    monkeypatch.setattr(ft, "_QUANTILE_BLOCK", 7 * 3 * 11)
    np.testing.assert_array_equal(stored("blocks.h5"), one)
    big = np.random.default_rng(5).standard_normal((2, 600, 3)).astype(np.float32)
    with ft.FeatureFile(write(tmp_path / "array.h5", big)) as ff:  # blocks of 256 stimuli
        from_array = ff.abs_q95()
    with ft.FeatureFile(write(tmp_path / "layers.h5", big, by_layer=True)) as ff:  # blocks of 38
        np.testing.assert_array_equal(ff.abs_q95(), from_array)
    want = ft.abs_quantile_rows(torch.from_numpy(big).transpose(0, 1)).numpy()
    np.testing.assert_array_equal(from_array, want)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_features_in_small_hdf5_chunks_read_back_unchanged(tmp_path, monkeypatch, dtype):
    """features._MAX_CHUNK_BYTES: the HDF5 chunks of the features hold as many stimuli as fit
    the byte limit. With a limit of 7 stimuli the chunks are (1, 7, dim), no chunk exceeds the
    limit, and the layers read back are the one-chunk file's (the values written)."""
    x = np.random.default_rng(6).standard_normal((3, M, 11)).astype(np.float32)
    itemsize = np.dtype(dtype).itemsize

    def written(name):
        path = write(tmp_path / name, x, dtype=dtype)
        with ft.FeatureFile(path) as ff:
            chunks = ff._f["features"].chunks
            return chunks, [ff.layer(i) for i in range(3)]

    chunks, one = written("one.h5")
    assert chunks == (1, M, 11)
    limit = 7 * 11 * itemsize + itemsize  # room for 7 stimuli and one more value
    monkeypatch.setattr(ft, "_MAX_CHUNK_BYTES", limit)
    chunks, got = written("chunks.h5")
    assert chunks == (1, 7, 11) and np.prod(chunks) * itemsize <= limit
    for a, b in zip(got, one, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one[0], x[0].astype(dtype).astype(np.float32))


def test_participation_ratio_in_two_row_blocks_equals_the_float64_spectrum():
    """diagnostics.participation_ratio sums XᵀX over row blocks of 2²⁴ / d rows, a literal
    that cannot be made small: 2²⁰ + 7 rows of 16 features span two blocks, the second of 7
    rows with large values in 3 features. The ratio is tr(C)²/‖C‖²_F of the centred
    features' XᵀX computed at once (float64); losing a row of either block moves it."""
    from xmodal.diagnostics import participation_ratio

    rng = np.random.default_rng(7)
    x = rng.standard_normal(((1 << 20) + 7, 16))
    x[-7:, :3] += 300.0 * rng.standard_normal((7, 3))  # the ragged last block stands out
    xc = x - x.mean(axis=0)
    c = xc.T @ xc
    del xc
    want = np.trace(c) ** 2 / np.sum(c * c)
    assert participation_ratio(x) == pytest.approx(want, rel=1e-10)
