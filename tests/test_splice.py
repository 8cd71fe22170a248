"""Every-position splice (SAEBench core metrics): evaluation.splice_metrics and splice_intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_evaluation import Identity

from adaptivek import ExclusionRule, TopKSAE, extract, select_tokens
from adaptivek.evaluation import splice_intervals, splice_metrics
from adaptivek.models import d_model, module_blocks

TEXTS = ["The capital of France is Paris, and the capital of Italy is Rome.", "Hi there, how are you today?",
         "Sparse autoencoders split activations into features that people can read.",
         "one two three four five six seven eight nine ten"]
LAYER = 1


class Zero(torch.nn.Module):
    """A stand-in SAE that reconstructs nothing: splicing it is the zero ablation."""

    def encode(self, x, k=None):
        return torch.zeros_like(x)

    def decode(self, codes):
        return torch.zeros_like(codes)


class Shrink(torch.nn.Module):
    """A stand-in SAE with a visible reconstruction error."""

    def encode(self, x, k=None):
        return x

    def decode(self, codes):
        return 0.6 * codes + 0.1


def _run(lm, saes, texts=TEXTS, **kw):
    kw = {"scale": 1.0, "mean": torch.full((d_model(lm),), 0.05), "max_norm": None, "max_length": 24,
          "batch_size": 3} | kw
    return splice_metrics(lm, saes, texts, LAYER, **kw)


@pytest.mark.parametrize("model", ["tiny_neox", "tiny_gemma2"])
def test_identity_recovers_everything_and_zero_nothing(model, request, one_thread):
    lm = request.getfixturevalue(model)
    res = _run(lm, {"id": Identity(), "zero": Zero()})
    ident, zero = res["saes"]["id"], res["saes"]["zero"]
    assert torch.equal(ident["rows"], res["rows_clean"])  # scale 1: the very same block output
    assert ident["frac_recovered_zero"] == 1.0 and ident["frac_recovered_mean"] == 1.0
    assert ident["kl"] == 0.0 and bool((ident["rows_kl"] == 0).all())
    assert torch.equal(zero["rows"], res["rows_zero_ablate"])
    assert zero["frac_recovered_zero"] == 0.0 and zero["kl"] > 0
    assert res["ce_zero_ablate"] > res["ce_clean"]  # the ablation does something: the test can fail
    scaled = _run(lm, {"id": Identity()}, scale=2.5)["saes"]["id"]
    assert scaled["frac_recovered_zero"] == pytest.approx(1.0, abs=1e-5) and scaled["kl"] < 1e-6


def _manual(lm, sae, text, *, mean, drop_first, max_norm, scale=1.0):
    """Per-token CE (clean, spliced, mean-ablated) and KL of one unpadded text with a plain PyTorch hook."""
    hf, block = lm._module, module_blocks(lm)[LAYER]
    ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=24).input_ids
    seen = {}

    def read(mod, inp, out):
        seen["h"] = (out[0] if isinstance(out, tuple) else out)[0].clone()

    def write(values):
        def hook(mod, inp, out):
            h = out[0] if isinstance(out, tuple) else out
            h[0, where] = values.to(h.dtype)
            return out
        return hook

    with torch.no_grad():
        handle = block.register_forward_hook(read)
        clean = hf(ids).logits[0].float().log_softmax(-1)
        handle.remove()
        pos = torch.arange(ids.shape[1])
        where = (pos >= drop_first) & (seen["h"].norm(dim=-1) <= (max_norm if max_norm is not None else np.inf))
        x = seen["h"][where]
        out = {}
        for name, vals in (("sae", sae.decode(sae.encode(x * scale)) / scale), ("mean", mean.expand_as(x))):
            handle = block.register_forward_hook(write(vals))
            out[name] = hf(ids).logits[0].float().log_softmax(-1)
            handle.remove()
    score = where.clone()
    score[-1] = False
    tgt = ids[0, 1:][score[:-1]]
    ce = {k: -v[score].gather(1, tgt[:, None]).squeeze(1).double() for k, v in {"clean": clean, **out}.items()}
    kl = (clean[score].exp() * (clean[score] - out["sae"][score])).sum(-1).double()
    return ce, kl, pos[score]


def test_matches_a_plain_hook_per_text(tiny_neox, one_thread):
    mean = torch.randn(d_model(tiny_neox), generator=torch.Generator().manual_seed(0))
    clean = _run(tiny_neox, {"id": Identity()}, max_norm=None, drop_first=0)
    acts, text_index = extract(tiny_neox, TEXTS, LAYER, token="all", max_length=24, progress=False)
    sel = select_tokens(acts, text_index, ExclusionRule(drop_first=2, max_norm_ratio=1.05))  # excludes many
    norms_cut = sel.threshold
    res = _run(tiny_neox, {"shrink": Shrink()}, mean=mean, drop_first=2, max_norm=norms_cut, scale=1.7)
    counts = res["counts"]
    assert counts["excluded_extreme_norm"] == sel.counts["extreme_norm"] > 0  # the training data's exclusions
    assert counts["excluded_first_positions"] == sel.counts["first_positions"] == 2 * len(TEXTS)
    assert counts["spliced"] == sel.counts["kept"] and counts["tokens"] == sel.counts["total"]
    assert res["n_tokens"] < clean["n_tokens"] and counts["scored"] == res["n_tokens"]
    for t, text in enumerate(TEXTS):
        ce, kl, pos = _manual(tiny_neox, Shrink(), text, mean=mean, drop_first=2, max_norm=norms_cut, scale=1.7)
        mine = res["text_index"] == t
        assert torch.equal(res["position"][mine], pos)
        assert torch.allclose(res["rows_clean"][mine], ce["clean"], atol=1e-4)
        assert torch.allclose(res["saes"]["shrink"]["rows"][mine], ce["sae"], atol=1e-4)
        assert torch.allclose(res["rows_mean_ablate"][mine], ce["mean"], atol=1e-4)
        assert torch.allclose(res["saes"]["shrink"]["rows_kl"][mine], kl, atol=1e-5)
    assert not torch.allclose(res["saes"]["shrink"]["rows"], res["rows_clean"], atol=1e-3)  # the splice bites


def test_clean_pass_is_shared_and_batches_do_not_matter(tiny_neox, one_thread):
    calls = []
    handle = tiny_neox._module.register_forward_hook(lambda *a: calls.append(1))
    try:
        three = _run(tiny_neox, {"a": Shrink(), "b": Identity(), "c": Zero()}, batch_size=3)
    finally:
        handle.remove()
    assert len(calls) == 2 * (3 + 3)  # 2 batches x (clean, zero, mean + one per SAE)
    one = _run(tiny_neox, {"a": Shrink()}, batch_size=1)
    assert torch.equal(one["text_index"], three["text_index"]) and torch.equal(one["position"], three["position"])
    assert torch.allclose(one["saes"]["a"]["rows"], three["saes"]["a"]["rows"], atol=1e-4)
    assert torch.allclose(one["rows_clean"], three["rows_clean"], atol=1e-4)


def test_per_token_k_and_l0(tiny_neox, one_thread):
    sae = TopKSAE(d_model(tiny_neox), 256, 5, seed=0)
    res = _run(tiny_neox, {"own": sae, "two": sae, "fn": sae, "mean": Identity(), "clean": Zero()},
               k={"two": 2, "fn": lambda x: torch.where(x[:, 0] > 0, 3, 1)})
    s = res["saes"]
    assert bool((s["own"]["l0"] == 5).all()) and bool((s["two"]["l0"] == 2).all())
    assert set(s["fn"]["l0"].tolist()) == {1, 3}
    assert s["own"]["l0_mean"] == 5.0
    assert s["mean"]["kl"] == 0.0 and torch.equal(s["clean"]["rows"], res["rows_zero_ablate"])  # names never clash


@pytest.fixture(scope="module")
def documents_run(tiny_neox, one_thread):
    """24 texts, one document each, spliced with the identity and a lossy stand-in."""
    texts = [f"Document number {i} says {' and '.join(['more'] * (i % 4 + 1))} things." for i in range(24)]
    return _run(tiny_neox, {"id": Identity(), "shrink": Shrink()}, texts=texts, batch_size=8)


def test_intervals_over_documents(documents_run):
    res = documents_run
    table = splice_intervals(res, [f"doc{i}" for i in range(24)], reference="id", n_boot=200)
    own = table[table["versus"].isna()].set_index(["sae", "metric"])
    assert own.loc[("id", "frac_recovered_zero"), ["estimate", "lo", "hi"]].tolist() == pytest.approx([1, 1, 1])
    shrink = own.loc[("shrink", "kl")]
    assert shrink["lo"] <= shrink["estimate"] <= shrink["hi"] and shrink["hi"] > shrink["lo"]
    assert shrink["estimate"] == pytest.approx(res["saes"]["shrink"]["kl"])
    diff = table[table["versus"] == "id"].set_index("metric")
    assert diff.loc["delta_ce", "estimate"] == pytest.approx(res["saes"]["shrink"]["delta_ce"])
    assert (table["n_documents"] == 24).all()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    ({"scale": 0.0}, "scale"),
    ({"scale": -1.0}, "scale"),
    ({"mean": torch.zeros(3)}, "mean must be"),
    ({"mean": torch.full((64,), float("nan"))}, "mean must be"),
    ({"max_norm": -1.0}, "max_norm"),
    ({"drop_first": -1}, "drop_first"),
    ({"k": {"nope": 3}}, "not in saes"),
    ({"k": {"id": torch.ones(4, dtype=torch.long)}}, "before tokenising"),
    ({"texts": ["Hi there, fine.", "a"]}, "fewer than 2 tokens"),
    ({"drop_first": 500}, "no position was scored"),
    ({"max_norm": 1e-6}, "no position was scored"),
], ids=["scale-zero", "scale-negative", "mean-shape", "mean-nan", "max_norm-negative", "drop_first-negative",
        "k-unknown-name", "k-per-token-tensor", "text-one-token", "all-excluded-by-position", "all-excluded-by-norm"])
def test_bad_input(tiny_neox, kw, match):
    saes = {"id": Identity()}
    with pytest.raises((ValueError, TypeError), match=match):
        _run(tiny_neox, saes, **kw)


@pytest.mark.parametrize("docs, kw, match", [
    ([f"d{i % 5}" for i in range(24)], {}, "needs at least 20"),
    ([f"d{i}" for i in range(23)], {}, "one id per text"),
    ([f"d{i}" for i in range(24)], {"reference": "nope"}, "not one of the SAEs"),
], ids=["too-few-documents", "wrong-length", "unknown-reference"])
def test_intervals_bad_input(documents_run, docs, kw, match):
    with pytest.raises(ValueError, match=match):
        splice_intervals(documents_run, docs, n_boot=10, **kw)


@pytest.mark.slow
def test_embedded_model_identity_recovers_everything(embedded_lm):
    from adaptivek.tokens import ExclusionRule

    texts = TEXTS[:2]
    res = splice_metrics(embedded_lm, {"id": Identity(), "zero": Zero()}, texts, 6, scale=1.0,
                         mean=torch.zeros(d_model(embedded_lm)), max_norm=None, drop_first=ExclusionRule().drop_first,
                         max_length=16, batch_size=2)
    assert res["saes"]["id"]["frac_recovered_zero"] == 1.0 and res["saes"]["id"]["kl"] == 0.0
    assert res["saes"]["zero"]["frac_recovered_zero"] == 0.0
    assert res["ce_zero_ablate"] > res["ce_clean"] + 1.0  # zeroing a middle layer of a real model hurts a lot
    assert res["counts"]["excluded_first_positions"] == 2 and int(res["position"].min()) >= 1


def test_spliced_passes_run_only_the_blocks_after_the_layer(tiny_neox, one_thread):
    """The clean pass runs every block; each spliced pass (zero, mean, one per SAE) only those after LAYER,
    and the blocks' forward methods are back in place afterwards (nnsight traces still work)."""
    mods = module_blocks(tiny_neox)
    calls = [0] * len(mods)
    handles = [next(m.children()).register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, m in enumerate(mods)]  # a block's first sub-module runs once per real forward of it
    try:
        _run(tiny_neox, {"a": Shrink(), "b": Identity()}, batch_size=len(TEXTS))
    finally:
        for h in handles:
            h.remove()
    passes = 1 + 2 + 2  # one batch: clean, zero, mean, two SAEs
    assert calls == [1] * (LAYER + 1) + [passes] * (len(mods) - LAYER - 1)
    assert all("forward" not in m.__dict__ or m.__dict__["forward"] is not None for m in mods)
    again = _run(tiny_neox, {"b": Identity()})
    assert again["saes"]["b"]["frac_recovered_zero"] == 1.0
