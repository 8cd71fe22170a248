from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptivek import activations as act
from adaptivek import extract

TEXTS = [
    "The capital of France is Paris.",
    "A much longer sentence, with several clauses, that keeps going so that the batch needs padding.",
    "Short one.",
    "Sparse autoencoders decompose activations into interpretable features.",
]


def _reference(lm, texts, layer):
    """transformers' own hidden_states[layer + 1], one unpadded text at a time."""
    base, tok = lm._module.base_model, lm.tokenizer  # the decoder stack without the unembedding
    last, full = [], []
    for t in texts:
        enc = tok([t], return_tensors="pt")
        with torch.inference_mode():
            hs = base(**enc, output_hidden_states=True).hidden_states[layer + 1][0]
        last.append(hs[-1])
        full.append(hs)
    return torch.stack(last), full


def _close(a, b):
    # batching changes float summation order only: relative error ~1e-6
    scale = b.abs().max().clamp(min=1.0)
    return (a - b).abs().max().item() / scale.item() < 1e-4


@pytest.mark.parametrize("fixture", ["embedded_lm", "tiny_neox", "tiny_gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_matches_transformers(request, fixture, side):
    lm = request.getfixturevalue(fixture)
    layer = 2
    got = extract(lm, TEXTS, layer, padding_side=side, batch_size=4, progress=False)
    want, _ = _reference(lm, TEXTS, layer)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _close(got, want)


@pytest.mark.parametrize("fixture", ["embedded_lm", "tiny_gemma2"])
def test_all_tokens_exclude_padding_and_match(request, fixture):
    lm = request.getfixturevalue(fixture)
    acts, index = extract(lm, TEXTS, 1, token="all", padding_side="left", progress=False)
    _, full = _reference(lm, TEXTS, 1)
    assert acts.shape[0] == sum(h.shape[0] for h in full) == index.shape[0]
    assert torch.equal(index, torch.cat([torch.full((h.shape[0],), i) for i, h in enumerate(full)]))
    assert _close(acts, torch.cat(full))


def test_several_layers_in_one_pass_equal_single_layers(embedded_lm):
    many = extract(embedded_lm, TEXTS, [5, 1], progress=False)
    assert list(many) == [1, 5]
    for ly in (1, 5):
        assert torch.allclose(many[ly], extract(embedded_lm, TEXTS, ly, progress=False), atol=1e-5)


def test_a_token_mapping_reads_last_and_all_tokens_in_one_pass(tiny_gemma2, tmp_path):
    mixed = extract(tiny_gemma2, TEXTS, [1, 3], token={1: "last", 3: "all"}, cache_dir=tmp_path, progress=False)
    assert torch.allclose(mixed[1], extract(tiny_gemma2, TEXTS, 1, progress=False), atol=1e-5)
    acts, index = extract(tiny_gemma2, TEXTS, 3, token="all", cache_dir=tmp_path, progress=False)  # a cache hit
    assert torch.equal(mixed[3][1], index) and torch.equal(mixed[3][0], acts)
    last = extract(tiny_gemma2, TEXTS, 3, progress=False)
    assert torch.allclose(acts[index.diff(append=torch.tensor([-1])) != 0], last, atol=1e-5)  # each text's last row
    # the last tokens of a layer cached with every token come from that entry, without a forward pass
    from adaptivek import activations as A

    calls = []
    real = A._run
    A._run = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        cached_last = extract(tiny_gemma2, TEXTS, 3, cache_dir=tmp_path, progress=False)
    finally:
        A._run = real
    assert calls == [] and torch.equal(cached_last, acts[index.diff(append=torch.tensor([-1])) != 0])
    for bad, match in (({1: "last"}, "exactly the layers"), ({1: "last", 3: "every"}, "'last' or 'all'")):
        with pytest.raises(ValueError, match=match):
            extract(tiny_gemma2, TEXTS, [1, 3], token=bad, progress=False)


def test_forward_stops_after_the_deepest_requested_layer(embedded_lm):
    ran = []
    # pre-hooks: a block that starts is recorded even if nnsight stops the pass at its output
    hooks = [blk.register_forward_pre_hook(lambda m, i, n=n: ran.append(n))
             for n, blk in enumerate(embedded_lm._module.model.layers)]
    try:
        extract(embedded_lm, TEXTS[:2], [1, 4], progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(set(ran)) == [0, 1, 2, 3, 4]


def test_last_token_index_for_both_padding_sides():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert act.last_token_index(right).tolist() == [2, 3, 0]
    assert act.last_token_index(left).tolist() == [3, 3, 3]


def test_cache_is_reused_and_keyed_by_content(embedded_lm, tmp_path, monkeypatch):
    first = extract(embedded_lm, TEXTS, 3, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1

    def no_forward(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(act, "_run", no_forward)
    again = extract(embedded_lm, TEXTS, 3, cache_dir=tmp_path, progress=False)
    assert torch.equal(first, again)
    with pytest.raises(AssertionError, match="recomputed"):  # other texts -> other key
        extract(embedded_lm, TEXTS[:3], 3, cache_dir=tmp_path, progress=False)
    with pytest.raises(AssertionError, match="recomputed"):  # other max_length -> other key
        extract(embedded_lm, TEXTS, 3, max_length=8, cache_dir=tmp_path, progress=False)


def test_a_cache_entry_without_its_metadata_is_not_trusted(embedded_lm, tmp_path, recwarn):
    extract(embedded_lm, TEXTS, 3, cache_dir=tmp_path, progress=False)
    (meta,) = tmp_path.glob("*.json")
    meta.unlink()  # as if the run died between the tensor file and its metadata
    assert act._cached(tmp_path, act._spec(embedded_lm, 3, "last", 128), TEXTS) is None
    assert not recwarn.list  # an unfinished entry is an ordinary miss, not corruption


@pytest.mark.parametrize("layer", [np.int64(3), np.int32(3), [np.int64(3), 1]], ids=["int64", "int32", "list"])
def test_numpy_integer_layers_are_accepted(tiny_neox, layer):
    got = extract(tiny_neox, TEXTS, layer, progress=False)
    want = extract(tiny_neox, TEXTS, [1, 3], progress=False)
    if isinstance(layer, list):
        assert list(got) == [1, 3] and all(type(k) is int for k in got)
        got = got[3]
    assert torch.equal(got, want[3])


def test_truncation_keeps_what_the_model_sees(embedded_lm):
    tok = embedded_lm.tokenizer
    cut = act.truncate_to_tokens(tok, TEXTS, 6)
    assert cut[2] == TEXTS[2]  # already short enough: unchanged
    assert all(len(tok(c)["input_ids"]) <= 6 for c in cut)
    assert TEXTS[1].startswith(cut[1]) and len(cut[1]) < len(TEXTS[1])


@pytest.mark.parametrize(
    ("texts", "kw", "error", "match"),
    [
        ([], {}, ValueError, "texts is empty"),
        (["ok", ""], {}, ValueError, r"texts\[1\] is empty"),
        (["ok", "   "], {}, ValueError, r"texts\[1\] is empty"),
        (["ok", 3], {}, TypeError, r"texts\[1\] is a int"),
        ("a single string", {}, TypeError, "wrap it in a list"),
        (["ok"], {"layer": 30}, ValueError, r"out of range.*0\.\.29"),
        (["ok"], {"layer": -1}, ValueError, "out of range"),
        (["ok"], {"layer": []}, ValueError, "empty list"),
        (["ok"], {"max_length": 0}, ValueError, "max_length must be an int >= 1"),
        (["ok"], {"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
        (["ok"], {"token": "first"}, ValueError, "token must be 'last' or 'all'"),
        (["ok"], {"padding_side": "middle"}, ValueError, "padding_side"),
        (["ok", "bad \ud800 text"], {}, ValueError, r"texts\[1\] holds a lone surrogate '\\ud800' at character 4"),
        (["ok"], {"layer": 2.0}, TypeError, "layer must be an int or a list of ints, got 2.0"),
        (["ok"], {"layer": "3"}, TypeError, "layer must be an int or a list of ints"),
        (["ok"], {"layer": [1, 2.5]}, TypeError, "layer must be an int"),
        (["ok"], {"layer": np.True_}, TypeError, "layer must be an int"),
    ],
    ids=["empty", "empty_text", "blank_text", "not_str", "single_string", "layer_too_big", "layer_negative",
         "layer_empty_list", "max_length_0", "batch_size_0", "bad_token", "bad_padding_side", "lone_surrogate",
         "float_layer", "str_layer", "float_in_layer_list", "numpy_bool_layer"],
)
def test_bad_input_gets_a_clear_error(embedded_lm, texts, kw, error, match):
    layer = kw.pop("layer", 0)
    with pytest.raises(error, match=match):
        extract(embedded_lm, texts, layer, progress=False, **kw)
