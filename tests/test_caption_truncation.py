"""Caption truncation: every caption is cut to a token limit before any batch is built.

The tiny BLOOM declares no context length (ALiBi, like the real BLOOMs): before, it got no
truncation, and one 20,000-character caption ran at full length (the demo went out of memory).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from xmodal.extract import ExtractionError, extract_features
from xmodal.extract.language import (
    DEFAULT_MAX_TOKENS,
    caption_token_limit,
    context_length,
    extract_language_features,
    load_language_model,
    tokenize_captions,
)
from xmodal.features import FeatureFile

IDS = [f"stim-{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def bloom(tiny_lms):
    model, tok, _ = load_language_model(str(tiny_lms["bloom"]))
    return model, tok


def _long_caption(captions: list[str]) -> str:
    text = " ".join(captions)
    return (text + " ") * (20_000 // len(text) + 1)


def test_bloom_long_caption_is_cut_to_the_default_bound(bloom, captions, caplog, monkeypatch):
    model, tok = bloom
    assert context_length(model, tok) is None  # no declared limit, as the real BLOOMs
    long = _long_caption(captions)[:20_000]
    full = tok(long)["input_ids"]
    assert len(full) > 4 * DEFAULT_MAX_TOKENS
    texts = captions[:6] + [long] + captions[6:]
    ids = IDS[:6] + ["stim-long"] + IDS[6:]

    forward = model.forward
    widths = []

    def guarded(*args, **kwargs):  # no batch is ever built wider than the bound
        widths.append(kwargs["input_ids"].shape[1])
        assert widths[-1] <= DEFAULT_MAX_TOKENS, f"a batch of {widths[-1]} tokens was built"
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", guarded)
    with caplog.at_level("WARNING"):
        res = extract_language_features(
            model, tok, texts, stimulus_ids=ids, batch_size=4, progress=False
        )
    assert max(widths) == DEFAULT_MAX_TOKENS
    assert res.info["max_length"] == DEFAULT_MAX_TOKENS == 512
    assert res.info["max_length_source"] == "default bound"
    assert res.info["n_truncated"] == 1 and res.info["truncated_ids"] == ["stim-long"]
    assert (
        "1 caption(s) longer than 512 tokens (the model declares no context length" in caplog.text
    )
    assert f"['stim-long'] (1 in all) (the longest had {len(full)} tokens)" in caplog.text

    # the other captions' features are those they get without the long caption
    monkeypatch.setattr(model, "forward", forward)
    ref = extract_language_features(
        model, tok, captions, stimulus_ids=IDS, batch_size=4, progress=False
    )
    others = [k for k in range(13) if k != 6]
    np.testing.assert_allclose(res.features[:, others], ref.features, rtol=1e-5, atol=1e-5)
    # and the long one's are those of its first 512 tokens, run alone
    with torch.no_grad():
        hs = model(
            input_ids=torch.tensor([full[:DEFAULT_MAX_TOKENS]]), output_hidden_states=True
        ).hidden_states
    alone = np.stack([h[0].float().mean(0).numpy() for h in hs])
    np.testing.assert_allclose(res.features[:, 6], alone, rtol=1e-5, atol=1e-5)


def test_limit_rules(tiny_lms, captions, caplog):
    assert caption_token_limit(None, None) == (DEFAULT_MAX_TOKENS, "default bound")
    assert caption_token_limit(None, 48) == (48, "model context")
    assert caption_token_limit(10, 48) == (10, "max_tokens")
    assert caption_token_limit(10, None) == (10, "max_tokens")
    with caplog.at_level("WARNING"):
        assert caption_token_limit(100, 48) == (48, "model context")
    assert "max_tokens=100 is more than the model's 48-token context; using 48" in caplog.text
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ExtractionError, match="max_tokens must be a positive integer"):
            caption_token_limit(bad, 48)  # type: ignore[arg-type]


def test_explicit_max_tokens_counts_against_a_brute_force_count(bloom, captions, caplog):
    _, tok = bloom
    with caplog.at_level("WARNING"):
        out = tokenize_captions(tok, captions, stimulus_ids=IDS, max_tokens=8)
    lengths = [len(tok(c)["input_ids"]) for c in captions]
    over = [k for k, n in enumerate(lengths) if n > 8]
    assert out.truncated == over and out.max_tokens == 8 and out.limit_source == "max_tokens"
    assert [len(t) for t in out.ids] == [min(n, 8) for n in lengths]
    assert all(t == tok(c)["input_ids"][:8] for t, c in zip(out.ids, captions, strict=True))
    assert f"{len(over)} caption(s) longer than max_tokens=8 were truncated" in caplog.text


def test_a_limit_that_makes_different_captions_identical_stops_the_extraction(bloom, caplog):
    """Captions that differ after the limit only would get the same features: a duplicate the
    data does not have. Captions that were equal already, or that the limit keeps apart, pass."""
    _, tok = bloom
    shared = "a photograph of a red square on the left and"
    captions = [f"{shared} a blue circle", f"{shared} a green star", "two cats", "two cats"]
    ids = ["long-a", "long-b", "cat-1", "cat-2"]
    n_shared = len(tok(shared)["input_ids"])
    with pytest.raises(ExtractionError) as err:
        tokenize_captions(tok, captions, stimulus_ids=ids, max_tokens=n_shared)
    msg = str(err.value)
    assert "long-a" in msg and "long-b" in msg and "extraction.max_tokens" in msg
    assert "cat-1" not in msg and "1 group(s) of 2 stimuli" in msg
    out = tokenize_captions(tok, captions, stimulus_ids=ids, max_tokens=n_shared + 2)
    assert out.ids[0] != out.ids[1] and out.ids[2] == out.ids[3]
    # the model's own context cutting them cannot be raised by max_tokens
    with pytest.raises(ExtractionError, match="model context.*shorten the captions"):
        tokenize_captions(tok, captions, stimulus_ids=ids, context=n_shared)


def test_extract_features_passes_max_tokens_into_the_feature_file(
    tmp_path, tiny_lms, tiny_manifest
):
    cfg = {"modality": "language", "id": str(tiny_lms["bloom"]), "revision": None}
    out = extract_features(
        "bloom-tiny", cfg, tiny_manifest, tmp_path / "b.h5", max_tokens=6, progress=False
    )

    with FeatureFile(out) as ff:
        tok = json.loads(ff.attrs["preprocessing"])["tokenizer"]
    assert tok["max_length"] == 6 and tok["max_length_source"] == "max_tokens"
    assert tok["n_truncated"] > 0 and len(tok["truncated_ids"]) == min(tok["n_truncated"], 20)


def test_the_feature_file_counts_repeated_captions(tmp_path, tiny_lms, tiny_manifest):
    """Captions with the same tokens run once (docs/method.md); the file records how many rows
    are copies, so that a reader can tell duplicate rows planted by the data from a collapse."""
    df = pd.read_csv(tiny_manifest, sep="\t", dtype=str)
    df.loc[[3, 7], "caption"] = df.loc[0, "caption"]
    df["image"] = [str(tiny_manifest.parent / p) for p in df["image"]]
    manifest = tmp_path / "stimuli.tsv"
    df.to_csv(manifest, sep="\t", index=False)
    cfg = {"modality": "language", "id": str(tiny_lms["bloom"]), "revision": None}
    out = extract_features("bloom-tiny", cfg, manifest, tmp_path / "b.h5", progress=False)
    with FeatureFile(out) as ff:
        tok = json.loads(ff.attrs["preprocessing"])["tokenizer"]
        x = ff.layer(len(ff.layer_names) - 1)
    assert tok["n_repeated"] == 2
    assert np.array_equal(x[3], x[0]) and np.array_equal(x[7], x[0])


def test_a_special_tokens_spelling_in_a_caption_is_text(bloom, captions):
    """``</s>`` or ``<s>`` in a caption (HTML-like markup) is tokenized as its characters: before,
    the tokenizer turned it into the control token (an EOS in mid-caption), silently."""
    _, tok = bloom
    specials = set(tok.all_special_ids)
    for caption in [f"{captions[0]} </s> {captions[1]}", "<s>", "a <unk> and a <s>"]:
        (ids,) = tokenize_captions(tok, [caption], stimulus_ids=["s"], context=None).ids
        assert ids[0] == tok.bos_token_id and not specials & set(ids[1:]), caption
        assert tok.decode(ids[1:]) == caption  # every character kept, as written
    plain = tokenize_captions(tok, [captions[0]], stimulus_ids=["s"], context=None).ids[0]
    assert plain == tok(captions[0])["input_ids"]  # captions without such text: as before


def test_a_limit_that_leaves_only_special_tokens_is_refused(tiny_lms, captions):
    """With max_tokens=1 every caption would be BOS alone, and every stimulus the same point;
    a tokenizer that keeps BOS and EOS beyond the limit would go over it unnoticed."""
    from tokenizers import processors

    _, tok, _ = load_language_model(str(tiny_lms["llama"]))
    with pytest.raises(ExtractionError, match=r"stim-00.*special tokens only.*1-token limit"):
        tokenize_captions(tok, captions[:3], stimulus_ids=IDS[:3], max_tokens=1, context=48)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    with pytest.raises(ExtractionError, match=r"more than 1 tokens after truncation"):
        tokenize_captions(tok, captions[:3], stimulus_ids=IDS[:3], max_tokens=1, context=48)
    # captions 0 and 2 share their first word, the one token left between BOS and EOS
    cut = tokenize_captions(tok, captions[:2], stimulus_ids=IDS[:2], max_tokens=3, context=48)
    assert all(len(t) == 3 and t[0] == bos and t[-1] == eos for t in cut.ids)


def test_a_roberta_style_model_gets_the_positions_it_has(tmp_path, tiny_tokenizer, captions):
    """RoBERTa numbers positions from ``padding_idx + 1`` (roberta-base: 514 rows, 512 tokens).
    The limit was taken as ``max_position_embeddings``, so a caption of that many tokens (its
    tokenizer declaring no limit) died with torch's IndexError naming no stimulus (audit). It is
    cut at the positions the model has, and its features are those of the cut caption."""
    from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.pad_token = tok.bos_token  # as RoBERTa's own tokenizer has one; padding_idx = its id
    folder = tmp_path / "roberta"
    tok.save_pretrained(folder)
    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(0)
    RobertaModel(
        RobertaConfig(
            vocab_size=len(tok),
            max_position_embeddings=42,
            intermediate_size=40,
            pad_token_id=tok.pad_token_id,
            **size,
        )  # fmt: skip
    ).save_pretrained(folder)
    model, tok, _ = load_language_model(str(folder))
    assert tok.model_max_length > 10**6  # no limit from the tokenizer: the model's alone
    assert context_length(model, tok) == 40  # 42 rows, positions from padding_idx + 1 = 2
    bert = BertModel(BertConfig(vocab_size=len(tok), max_position_embeddings=42, **size))
    assert context_length(bert, tok) == 42  # BERT's positions start at row 0

    long = " ".join(captions)
    assert len(tok(long)["input_ids"]) > 42
    res = extract_language_features(
        model, tok, [captions[0], long], stimulus_ids=["short", "long"], progress=False
    )
    cut = tok(long, truncation=True, max_length=40, return_tensors="pt")
    assert cut["input_ids"].shape[1] == 40 and res.info["n_truncated"] == 1
    with torch.no_grad():
        hs = model(**cut, output_hidden_states=True).hidden_states
    want = np.stack([h[0].mean(0).numpy() for h in hs])
    np.testing.assert_allclose(res.features[:, 1], want, rtol=1e-5, atol=1e-6)
