"""adaptivek.report, comparison part (chapter 5): verdicts, tables and figures from a compare results dict.

The results here are built by hand so that every answer is known in advance, plus one real (tiny)
compare run to check that the report reads what compare writes.
"""

from __future__ import annotations

import math

import matplotlib
import pandas as pd
import pytest
import torch

from adaptivek import paper, report, report_decision

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def d(estimate, lo, hi, **extra):
    """A difference entry of the results: estimate with its interval."""
    return {"estimate": estimate, "lo": lo, "hi": hi} | extra


ABOVE, BELOW, ACROSS = d(0.02, 0.01, 0.03), d(-0.02, -0.03, -0.01), d(0.01, -0.01, 0.03)


def _sae(kind, l0, fve, **extra):
    ci = {m: d(v, v - 0.01, v + 0.01) for m, v in (("fve", fve), ("cosine", 0.9), ("mse", 0.1), ("l0", l0))}
    return {"kind": kind, "metrics": {"l0_mean": l0, "fve": fve, "cosine": 0.9, "mse": 0.1}, "ci": ci} | extra


def make_results(ada_fve=(ABOVE, ABOVE), shuffled=ABOVE, length=ACROSS, *, ce=None, batchtopk=True):
    """Two TopK points, AdaptiveK at [2, 8] and [2, 12] (differences ``ada_fve``), the two ablations
    (AdaptiveK minus them: ``shuffled``, ``length``), optionally BatchTopK, and CE differences ``ce``."""
    saes = {"topk_2": _sae("topk", 2.0, 0.4, k=2), "topk_8": _sae("topk", 8.0, 0.6, k=8),
            "adaptivek_2_8": _sae("adaptivek", 4.0, 0.55, k_range=[2, 8]),
            "adaptivek_2_12": _sae("adaptivek", 6.0, 0.6, k_range=[2, 12])}
    if batchtopk:
        saes |= {"batchtopk_4": _sae("batchtopk", 3.0, 0.5, k=4, inference="threshold"),
                 "batchtopk_4_batch": _sae("batchtopk", 4.0, 0.52, k=4, inference="batch rule")}
    saes |= {"shuffled_k": _sae("ablation", 4.0, 0.5), "length_k": _sae("ablation", 4.0, 0.53)}
    vs = {n: {"fve": ACROSS, "cosine": ACROSS, "mse": ACROSS} for n in saes if not n.startswith("topk")}
    for n, v in zip(("adaptivek_2_8", "adaptivek_2_12"), ada_fve, strict=True):
        vs[n] = {"fve": v, "cosine": v, "mse": ACROSS}
    res = {"config": {"k_ranges": [[2, 8], [2, 12]], "d_sae": 32}, "saes": saes, "vs_topk": vs,
           "ablations": {"adaptivek": "adaptivek_2_8",
                         "minus": {n: {"fve": v, "cosine": ACROSS, "mse": ACROSS, "l0": d(0, 0, 0)}
                                   for n, v in (("shuffled_k", shuffled), ("length_k", length))}},
           "downstream": {"skipped": "no language model given"}}
    if ce is not None:
        for n, s in saes.items():
            s["ce"] = {"ce_sae": 3.0, "delta_ce": 0.5, "frac_recovered": 0.8, "l0_mean": s["metrics"]["l0_mean"],
                       "ci": {"ce": d(3.0, 2.9, 3.1), "frac_recovered": d(0.8, 0.7, 0.9)}}
            if n in vs:
                vs[n]["ce"] = ce
        res["downstream"] = {"ce_clean": 2.5, "ce_ablate": 5.0, "n": 10}
    return res


# ---------------------------------------------------------------------------- strings


@pytest.mark.parametrize("diff, digits, want", [
    (d(0.0123, -0.0031, 0.0275), 3, "+0.012 [-0.003, +0.028]"),
    (d(-1.5, -2.25, -0.75), 1, "-1.5 [-2.2, -0.8]"),
    (None, 3, "—"),
    (d(math.nan, math.nan, math.nan), 3, "—"),
], ids=["mixed-signs", "one-digit", "missing", "outside-the-sweep"])
def test_fmt_diff(diff, digits, want):
    assert report.fmt_diff(diff, digits) == want


@pytest.mark.parametrize("diff, higher_better, want", [
    (ABOVE, True, "better than"), (BELOW, True, "worse than"), (ACROSS, True, "indistinguishable from"),
    (ABOVE, False, "worse than"), (BELOW, False, "better than"), (ACROSS, False, "indistinguishable from"),
    (None, True, "not measurable against"), (d(math.nan, math.nan, math.nan), True, "not measurable against"),
], ids=["above-0", "below-0", "across-0", "above-0-lower-better", "below-0-lower-better", "across-0-lower-better",
        "missing", "nan"])
def test_direction(diff, higher_better, want):
    assert report.direction(diff, higher_better) == want


def test_direction_with_own_words():
    words = ("lower", "higher", "no different")
    assert report.direction(BELOW, higher_better=False, words=words) == "lower"
    assert report.direction(ABOVE, higher_better=False, words=words, missing="?") == "higher"
    assert report.direction(None, words=words, missing="?") == "?"


@pytest.mark.parametrize("name, want", [
    ("topk_8", "TopK k=8"), ("adaptivek_2_12", "AdaptiveK [2, 12]"), ("batchtopk_4", "BatchTopK k=4 (threshold)"),
    ("batchtopk_4_batch", "BatchTopK k=4 (batch rule)"), ("shuffled_k", "shuffled k"), ("length_k", "length k"),
])
def test_sae_label(name, want):
    res = make_results()
    assert report.sae_label(name, res["saes"][name]) == want


def test_names_of():
    res = make_results()
    assert report.names_of(res, "adaptivek") == ["adaptivek_2_8", "adaptivek_2_12"]
    assert report.names_of(res, "batchtopk", inference="threshold") == ["batchtopk_4"]


# ---------------------------------------------------------------------------- verdicts


def test_verdict_when_adaptivek_beats_everything():
    v = report.verdict_sentences(make_results())
    assert v["verdict_frontier"].startswith("In FVE, AdaptiveK is better than the TopK frontier at the same mean L0 "
                                            "for 2 of 2 k ranges (AdaptiveK [2, 8]: +0.020 [+0.010, +0.030]")
    assert v["verdict_paper"].startswith("In reconstruction the claim holds here")
    assert "is better than k assigned at random (+0.020 [+0.010, +0.030])" in v["verdict_ablation"]
    assert "the probe's signal is used" in v["verdict_ablation"]
    assert "Text length, a signal that needs no probe" in v["verdict_ablation"]  # length_k is indistinguishable
    assert v["verdict_ce"] == "Not measured in this run."
    assert v["verdict_batchtopk"].startswith("BatchTopK, which adapts the number of latents per input without any "
                                             "probe, is indistinguishable from the frontier with its threshold")


def test_verdict_when_adaptivek_beats_nothing():
    v = report.verdict_sentences(make_results((BELOW, ACROSS), shuffled=ACROSS, length=ABOVE, batchtopk=False))
    assert "worse than the TopK frontier at the same mean L0 for 1 of 2 k ranges; indistinguishable from the TopK " \
           "frontier at the same mean L0 for 1 of 2 k ranges" in v["verdict_frontier"]
    assert "for none of the 2 k ranges here, so that claim is not reproduced" in v["verdict_paper"]
    assert "not measurably better than spreading the same k values at random" in v["verdict_ablation"]
    assert "Text length" not in v["verdict_ablation"]  # AdaptiveK beats the length control
    assert v["verdict_batchtopk"] == "Not trained in this run."


def test_verdict_partial_and_without_the_complexity_signal():
    v = report.verdict_sentences(make_results((ABOVE, ACROSS), shuffled=ACROSS))
    assert "for 1 of 2 k ranges here, and not its shuffled-k control" in v["verdict_paper"]
    assert "only partly reproduced" in v["verdict_paper"]
    assert "rises with k_max (0.550, 0.600)" in v["verdict_paper"]  # FVE by k_max, as the paper's table


def test_verdict_on_next_token_loss():
    v = report.verdict_sentences(make_results(ce=BELOW))  # CE lower than the frontier: better
    assert v["verdict_ce"].startswith("In next-token CE, AdaptiveK is better than the TopK frontier")
    assert report.ce_halfwidth(make_results(ce=d(0.0, -0.2, 0.4))) == pytest.approx(0.3)
    assert math.isnan(report.ce_halfwidth(make_results()))


def _with_bins(low_mse, high_mse):
    res = make_results()
    bins = [{"bin": b, "n": 5, "label_range": [b, b + 1.0], "saes": {n: {"l0": 3.0 + 2 * b} for n in res["saes"]},
             "vs_topk_same_budget": {n: {"mse": m} for n in res["vs_topk"]}} for b, m in ((0, low_mse), (1, high_mse))]
    res["by_complexity"] = {"edges": [0, 1, 2], "bins": bins}
    return res


@pytest.mark.parametrize("low, high, words, sentence", [
    (d(0.01, 0.005, 0.02, frontier=0.1), d(-0.01, -0.02, -0.005, frontier=0.2), ("higher", "lower"), "moves error"),
    (ACROSS | {"frontier": 0.1}, d(-0.01, -0.02, -0.005, frontier=0.2), ("no different", "lower"), "without a measurable"),
    (BELOW | {"frontier": 0.1}, ACROSS | {"frontier": 0.1}, ("lower", "no different"), "buys nothing"),
], ids=["trade", "gain-only", "no-gain"])
def test_bin_summary(low, high, words, sentence):
    s = report.bin_summary(_with_bins(low, high))
    assert (s["bin_low_word"], s["bin_high_word"]) == words
    assert sentence in s["bin_sentence"]
    assert s["bin_low_l0"] == "3" and s["bin_high_l0"] == "5"
    assert s["bin_low_dmse"] == f"{100 * low['estimate'] / low['frontier']:+.1f}%"


def test_bins_table_is_in_percent_of_the_frontier():
    t = report.bins_table(_with_bins(d(0.01, 0.005, 0.02, frontier=0.1), BELOW | {"frontier": 0.2}))
    row = t[(t.SAE == "AdaptiveK [2, 8]") & t.bin.str.startswith("1")].iloc[0]  # two bins: named 0 and 1
    assert (row["ΔMSE %"], row["lo"], row["hi"]) == pytest.approx((-10.0, -15.0, -5.0))
    assert set(t.SAE) == {"AdaptiveK [2, 8]", "AdaptiveK [2, 12]", "shuffled k", "length k"}  # no BatchTopK
    assert len(report.plot_bins(t).axes) == 2


# ---------------------------------------------------------------------------- tables and figures


def test_tables():
    res = make_results(ce=BELOW)
    m = report.matched_table(res)
    assert m.loc["AdaptiveK [2, 8]", "ΔFVE"] == "+0.020 [+0.010, +0.030]"
    assert m.loc["shuffled k", "ΔCE (nats)"] == "-0.020 [-0.030, -0.010]"
    assert "TopK k=2" not in m.index  # the sweep is the reference, not a row
    a = report.ablation_table(res)
    assert list(a.index) == ["shuffled k", "length k"] and a.loc["length k", "ΔFVE"] == "+0.010 [-0.010, +0.030]"
    ds = report.downstream_table(res)
    assert ds.loc["TopK k=8", "loss recovered"] == "0.800 [0.700, 0.900]"
    k = report.k_range_table(res, paper.K_RANGE_ABLATION)
    assert len(k) == 2 and list(k["paper k range"]) == ["[20, 320]", "[20, 480]"]
    assert list(k["our k range"]) == ["[2, 8]", "[2, 12]"]


@pytest.mark.parametrize("ce, panels", [(None, 3), (BELOW, 4)], ids=["reconstruction-only", "with-ce"])
def test_plot_frontier(ce, panels):
    res = make_results(ce=ce)
    fig = report.plot_frontier(res, title="t")
    assert sum(ax.get_visible() for ax in fig.axes) == panels
    assert report.points_table(res)["kind"].tolist().count("TopK") == 2


class CharTokenizer:
    """One token per character: enough to check which context end a latent table shows."""

    def __call__(self, text, truncation=True, max_length=None):
        return {"input_ids": [ord(c) for c in text][:max_length]}

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_latents_follow_the_fixed_rule():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(40, generator=g, dtype=torch.float64) * 10
    codes = torch.rand(40, 6, generator=g) * (torch.rand(40, 6, generator=g) > 0.3)  # noise latents
    codes[:, 2] = y.float()  # follows the label
    codes[:, 4] = (10 - y).float()  # opposes it
    codes[:, 5] = 0.0
    codes[:3, 5] = 100 * y[:3].float()  # perfectly correlated but fires on 3 rows only: not chosen
    chosen = report.complexity_latents(codes, y)
    assert chosen["most complexity-correlated"] == 2 and chosen["most anti-correlated"] == 4
    texts = [f"context {i} ends with X{i % 10}" for i in range(40)]
    table = report.latent_examples(codes, y, texts, CharTokenizer(), {"follows": 2}, max_length=64, top=2)
    top = int(y.argmax())
    assert table.iloc[0]["complexity"] == round(float(y[top]), 1)
    assert table.iloc[0]["context (end)"].endswith(f"[{top % 10}]")
    assert "r = 1.00" in table.index[0][0]


@pytest.mark.parametrize("grouped", [False, True], ids=["no-ids", "document-ids"])
def test_report_reads_a_real_compare_run(tmp_path, grouped):
    from adaptivek.comparison import CompareConfig, compare

    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 16, generator=g) * 2 + 5
    y = ((X[:, :4].sum(1) + torch.randn(120, generator=g)).double() / 2 - 5).clamp(0, 10)  # on the 0-10 scale
    texts = [f"text number {i} " + "word " * (i % 9) for i in range(120)]
    cfg = CompareConfig(d_sae=32, steps=4, batch_size=32, topk_ks=(2, 4, 8), k_ranges=((2, 8), (2, 12)), n_boot=30)
    res = compare(X[:90], y[:90], X[90:], y[90:], out=tmp_path / "r.json", cfg=cfg, texts_train=texts[:90],
                  texts_test=texts[90:], log=None, **({"groups_train": [i // 6 for i in range(90)],
                                                       "groups_test": list(range(100, 130))} if grouped else {})
                  ).results
    assert res["probe"]["k_train_source"] == ("out_of_fold" if grouped else "in_sample")
    assert set(report.verdict_sentences(res)) == {"verdict_frontier", "verdict_ce", "verdict_batchtopk",
                                                  "verdict_ablation", "verdict_paper"}
    assert set(report.bin_summary(res)) >= {"bin_low_word", "bin_high_word", "bin_sentence"}
    assert isinstance(report.matched_table(res), pd.DataFrame) and len(report.k_range_table(res, paper.K_RANGE_ABLATION)) == 2
    assert len(report.bins_table(res)) == 3 * 5  # three bins x (two AdaptiveK + three ablations)
    verdicts = report_decision.decision_verdicts(res)
    assert all(isinstance(v, str) and v for v in verdicts.values()) and len(verdicts) == 10
    if grouped:  # 30 held-out documents: the decisive comparison ran, 3 seeds
        assert res["decision"]["n_seeds"] == 3 and res["decision"]["n_documents"] == 30
        table = report_decision.decision_table(res)
        assert {"AdaptiveK", "shuffled k", "position k", "norm k", "JumpReLU"} <= set(table.index)
        assert table["dead / dense latents"].str.fullmatch(r"\d+\.\d% / \d+\.\d%").all()
        assert len(res["decision"]["health"]["adaptivek"]["dead_per_seed"]) == 3
        assert verdicts["dv_overall"].startswith("Should a reader use AdaptiveK")
        assert not report_decision.oracle_table(res).empty
        report_decision.plot_oracle(res)
    else:
        assert "skipped" in res["decision"] and verdicts["dv_matched"].startswith("Not decided")
    report.plot_frontier(res)
    report.ablation_table(res)
