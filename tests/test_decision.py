"""adaptivek.decision: paired differences over seeds and documents, power, verdicts, the precondition."""

from __future__ import annotations

import pytest
import torch

from adaptivek import decision


def _rows(err: torch.Tensor, l0: float) -> dict[str, torch.Tensor]:
    n = len(err)
    return {"sq_err": err.double(), "cosine": torch.full((n,), 0.9, dtype=torch.float64),
            "l2_ratio": torch.ones(n, dtype=torch.float64), "l0": torch.full((n,), float(l0), dtype=torch.float64)}


def _setup(n_docs=40, per_doc=20, gain=0.0, seed_noise=0.0, n_seeds=3):
    g = torch.Generator().manual_seed(0)
    n = n_docs * per_doc
    X = torch.randn(n, 8, generator=g)
    groups = torch.arange(n_docs).repeat_interleave(per_doc)
    base = X.pow(2).sum(1) * 0.3  # TopK's error: 30 % of each row's energy
    rows = []
    for s in range(n_seeds):
        jitter = 1 + seed_noise * (s - 1)
        rows.append({"matched_20": _rows(base * 1.05 * jitter, 20), "matched_21": _rows(base * 0.95 * jitter, 21),
                     "ada": _rows(base * (1 - gain) * jitter, 20.5), "shuf": _rows(base * jitter, 20.5)})
    return rows, X, groups


def test_a_real_gain_is_detected_and_no_gain_is_not():
    rows, X, groups = _setup(gain=0.2)
    res = decision.analyse(rows, X, groups, adaptivek="ada", matched=["matched_20", "matched_21"],
                           others={"shuffled": "shuf"}, n_boot=200)
    assert decision.verdict(res["vs_topk"]["adaptivek"]["fve"]) == "better"
    assert decision.verdict(res["vs"]["shuffled"]["fve"]) == "better"
    assert decision.verdict(res["vs"]["shuffled"]["mse"], higher_better=False) == "better"
    rows, X, groups = _setup(gain=0.0)
    res = decision.analyse(rows, X, groups, adaptivek="ada", matched=["matched_20", "matched_21"],
                           others={"shuffled": "shuf"}, n_boot=200)
    d = res["vs"]["shuffled"]["fve"]
    assert d["estimate"] == pytest.approx(0, abs=1e-12) and decision.verdict(d) == "indistinguishable"


def test_topk_line_reads_the_matched_sae_at_its_own_l0():
    rows, X, groups = _setup()
    W = torch.ones(1, len(X), dtype=torch.float64)
    st = decision.seed_stats(rows[:1], X, W)[0]
    for name in ("matched_20", "matched_21"):
        assert float(decision.topk_line(st, ["matched_20", "matched_21"], st[name]["l0"], "fve")[0]) == \
            pytest.approx(float(st[name]["fve"][0]))
    mid = decision.topk_line(st, ["matched_20", "matched_21"], torch.tensor([20.5], dtype=torch.float64), "fve")
    assert float(st["matched_20"]["fve"][0]) < float(mid[0]) < float(st["matched_21"]["fve"][0])


def test_seed_spread_and_power_are_reported():
    rows, X, groups = _setup(gain=0.05, seed_noise=0.1)
    d = decision.analyse(rows, X, groups, adaptivek="ada", matched=["matched_20", "matched_21"],
                         others={"shuffled": "shuf"}, n_boot=200)["vs"]["shuffled"]["fve"]
    assert len(d["per_seed"]) == 3 and d["seed_sd"] > 0
    assert d["mde"] == pytest.approx(decision.Z_POWER * d["se"])
    assert d["lo"] <= d["estimate"] <= d["hi"]


def test_seed_resampling_widens_the_interval():
    rows, X, groups = _setup(gain=0.05, seed_noise=0.3)
    one = decision.difference([torch.ones(5)] * 3, decision.seed_weights(3, 4, 0))
    assert one["se"] == pytest.approx(0, abs=1e-12)  # identical seeds: no spread
    wide = decision.analyse(rows, X, groups, adaptivek="ada", matched=["matched_20", "matched_21"],
                            others={"shuffled": "shuf"}, n_boot=200)["vs"]["shuffled"]["fve"]
    calm = decision.analyse(_setup(gain=0.05)[0], X, groups, adaptivek="ada", matched=["matched_20", "matched_21"],
                            others={"shuffled": "shuf"}, n_boot=200)["vs"]["shuffled"]["fve"]
    assert wide["se"] > calm["se"]


@pytest.mark.parametrize("n_docs", [5, 19], ids=["5-docs", "19-docs"])
def test_too_few_documents_is_an_error(n_docs):
    rows, X, groups = _setup(n_docs=n_docs)
    with pytest.raises(ValueError, match="needs at least 20"):
        decision.analyse(rows, X, groups, adaptivek="ada", matched=["matched_20"], others={}, n_boot=10)


def test_no_document_ids_is_an_error():
    rows, X, _ = _setup()
    with pytest.raises(ValueError, match="pass groups_test"):
        decision.analyse(rows, X, None, adaptivek="ada", matched=["matched_20"], others={}, n_boot=10)


def test_precondition_sees_error_that_follows_complexity():
    g = torch.Generator().manual_seed(1)
    n, groups = 2000, torch.arange(100).repeat_interleave(20)
    X = torch.randn(n, 8, generator=g)
    pred = torch.rand(n, generator=g) * 10
    follows = X.pow(2).sum(1) * (0.1 + 0.05 * pred)
    flat = X.pow(2).sum(1) * 0.3 * (1 + 0.1 * torch.randn(n, generator=g))
    up = decision.precondition(follows, X, pred, groups, n_boot=200)
    none = decision.precondition(flat, X, pred, groups, n_boot=200)
    assert up["lo"] > 0.5
    assert none["lo"] < 0 < none["hi"]


def test_family_error_rate():
    assert decision.family_error_rate(1) == pytest.approx(0.05)
    assert decision.family_error_rate(10) == pytest.approx(1 - 0.95**10)


def test_latent_health_counts_dead_and_dense_latents_per_seed():
    seed0 = torch.tensor([0.0, 0.0, 0.05, 0.5])   # 2 dead, 1 dense
    seed1 = torch.tensor([0.0, 0.2, 0.3, 0.01])   # 1 dead, 2 dense
    h = decision.latent_health({"a": [seed0, seed1]})["a"]
    assert h["dead_per_seed"] == [0.5, 0.25] and h["dense_per_seed"] == [0.25, 0.5]
    assert h["dead_frac"] == pytest.approx(0.375) and h["dense_frac"] == pytest.approx(0.375)
    assert decision.latent_health({"a": [seed0]}, dense_threshold=0.01)["a"]["dense_frac"] == 0.5


def test_latent_health_needs_a_seed():
    with pytest.raises(ValueError, match="no firing frequencies for 'a'"):
        decision.latent_health({"a": []})
