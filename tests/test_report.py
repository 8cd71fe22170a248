"""adaptivek.report, general part: formatting, verdict sentences, tables and figures the chapters show."""

from __future__ import annotations

import json
import math

import matplotlib
import pandas as pd
import pytest
import torch

from adaptivek import paper, report

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


# ---------------------------------------------------------------------------- strings


@pytest.mark.parametrize("args, kw, want", [
    ((0.7234, 0.65, 0.781), {}, "0.72 [0.65, 0.78]"),
    ((0.0312, -0.0104, 0.07), {"digits": 3, "signed": True}, "+0.031 [-0.010, +0.070]"),
    ((-1.0, -2.5, 0.0), {"digits": 1, "signed": True}, "-1.0 [-2.5, +0.0]"),
    ((12.0, 10.0, 14.0), {"digits": 0}, "12 [10, 14]"),
])
def test_fmt_ci(args, kw, want):
    assert report.fmt_ci(*args, **kw) == want


def test_row_ci_reads_the_lo_and_hi_columns():
    row = pd.Series({"pearson": 0.5, "pearson_lo": 0.41, "pearson_hi": 0.588, "dpearson": -0.02,
                     "dpearson_lo": -0.1, "dpearson_hi": 0.05})
    assert report.row_ci(row, "pearson") == "0.50 [0.41, 0.59]"
    assert report.row_ci(row, "dpearson", signed=True) == "-0.02 [-0.10, +0.05]"
    with pytest.raises(KeyError):
        report.row_ci(pd.Series({"r2": 0.1}), "r2")


@pytest.mark.parametrize("lo, hi, ref, want", [
    (0.6, 0.8, 0.72, "consistent with"), (0.72, 0.8, 0.72, "consistent with"), (0.6, 0.72, 0.72, "consistent with"),
    (0.5, 0.7, 0.72, "below"), (0.73, 0.9, 0.72, "above"),
])
def test_relation(lo, hi, ref, want):
    assert report.relation(lo, hi, ref) == want


@pytest.mark.parametrize("lo, hi, want", [(0.01, 0.2, "up"), (-0.2, -0.01, "down"), (-0.1, 0.1, "tie"),
                                          (0.0, 0.1, "tie"), (-0.1, 0.0, "tie")])
def test_sign_phrase(lo, hi, want):
    assert report.sign_phrase(lo, hi, positive="up", negative="down", neither="tie") == want


def test_sign_phrase_default_tie():
    assert report.sign_phrase(-1, 1, positive="a", negative="b") == "no clear difference"


def test_format_context():
    row = pd.Series({"complexity": 4.256, "source": "brown", "genre": "learned", "book": None, "year": float("nan"),
                     "lexical": 3.04, "syntactic": 7.0, "text": "word " * 30})
    got = report.format_context(row, ["lexical", "syntactic"], chars=22, width=12)
    assert got == "complexity 4.26 | brown: learned\n  lexi 3.0  synt 7.0\n    word word\n    word word wo\n"


# ---------------------------------------------------------------------------- probe interface, data


def test_fixed_predictions_in_the_probe_interface():
    import numpy as np

    from adaptivek import onestop_transfer

    scores = np.array([1.0, 2.0, 3.0, 1.5, 2.5, 3.5, 3.0, 2.0, 1.0])
    fixed = report.FixedPredictions(scores)
    X = torch.zeros(9, 4)
    assert fixed.predict(X).dtype == torch.float64 and fixed.predict(X).tolist() == scores.tolist()
    with pytest.raises(ValueError, match="holds 9 scores but was asked for 2 rows"):
        fixed.predict(X[:2])
    got = onestop_transfer(fixed, X, [0, 1, 2] * 3, ["a"] * 3 + ["b"] * 3 + ["c"] * 3, n_boot=20)
    assert got["n_topics"] == 3 and got["ordered_share"] == pytest.approx(2 / 3)


def test_contexts_and_labels_pairs_by_text_and_rebuilds_what_is_missing(tmp_path, smol_tokenizer, monkeypatch):
    import adaptivek.corpus

    texts = ["A short one.", "The second context, a bit longer than the first.", "Third."]
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "texts.parquet")
    pd.DataFrame({"text": texts[::-1], "complexity": [3.0, float("nan"), 1.0]}).to_parquet(tmp_path / "labels.parquet")
    got, y, source = report.contexts_and_labels(tmp_path, smol_tokenizer)
    assert got == texts and "labels.parquet" in source
    assert y[0] == 1.0 and math.isnan(y[1]) and y[2] == 3.0  # by text, not by row; a failed label stays NaN

    pd.DataFrame({"text": [texts[0], "a text of another run"], "complexity": [1.0, 2.0]}).to_parquet(
        tmp_path / "labels.parquet")
    with pytest.raises(ValueError, match="different runs"):
        report.contexts_and_labels(tmp_path, smol_tokenizer)

    (tmp_path / "labels.parquet").unlink()
    got, y, source = report.contexts_and_labels(tmp_path, smol_tokenizer)
    assert got == texts and "rubric" in source and bool(((y >= 0) & (y <= 10)).all())

    (tmp_path / "texts.parquet").unlink()  # nothing ran: chapter 1's sample is rebuilt from the corpus
    calls = []

    def fake_corpus(name, n, seed):
        calls.append((name, n, seed))
        return {"text": ["word " * 50, "Tiny text."]}

    monkeypatch.setattr(adaptivek.corpus, "load_corpus", fake_corpus)
    got, y, _ = report.contexts_and_labels(tmp_path, smol_tokenizer, corpus="embedded", n_texts=2, seed=7, max_length=8)
    assert calls == [("embedded", 2, 7)]
    assert len(smol_tokenizer(got[0])["input_ids"]) <= 8 and got[1] == "Tiny text." and len(y) == 2


# ---------------------------------------------------------------------------- chapter 3 verdicts and tables


def _controls() -> pd.DataFrame:
    rows = {  # pearson, lo, hi, dpearson, lo, hi
        "ridge probe": (0.70, 0.62, 0.77, 0.0, 0.0, 0.0),
        "shuffled labels": (0.10, -0.05, 0.25, 0.60, 0.45, 0.72),
        "text length": (0.65, 0.55, 0.72, 0.05, -0.02, 0.11),
        "mean input embeddings": (0.80, 0.74, 0.85, -0.10, -0.16, -0.04),
    }
    cols = ["pearson", "pearson_lo", "pearson_hi", "dpearson", "dpearson_lo", "dpearson_hi"]
    return pd.DataFrame.from_dict(rows, orient="index", columns=cols).assign(rmse=1.0, spearman=0.6,
                                                                                spearman_lo=0.5, spearman_hi=0.7)


def test_controls_verdict_and_its_sentence():
    names = ["shuffled labels", "text length", "mean input embeddings"]
    v = report.controls_verdict(_controls(), names)
    assert list(v.index) == names
    assert v["result"].tolist() == ["probe better", "no clear difference", "control better"]
    assert v["CIs do not overlap"].tolist() == [True, False, False]
    assert v.loc["text length", "probe - control"] == "0.05 [-0.02, 0.11]"
    assert v.loc["shuffled labels", "control Pearson"] == "0.10 [-0.05, 0.25]"
    assert report.beats_all_sentence(v) == ("No: it beats shuffled labels with non-overlapping intervals, but not "
                                            "text length, mean input embeddings")
    assert report.beats_all_sentence(v.loc[["shuffled labels"]]) == \
        "Yes: it beats every control with non-overlapping intervals"
    assert report.beats_all_sentence(v.loc[["text length"]]).startswith("No: it beats none with")


def test_paper_probe_table_puts_ours_beside_table_1():
    c = _controls()
    sweep = pd.DataFrame({"pearson": [0.3, 0.81, 0.7]}, index=pd.Index([0, 1, 2], name="layer"))
    t = report.paper_probe_table(c.loc["ridge probe"], c.loc["text length"], sweep, label_sd=2.0, ours="ours (m, layer 1)")
    assert list(t.index) == ["linear probe", "MLP", "best Pearson over layers"]
    assert t.loc["linear probe", "paper (Pythia-70M)"] == "RMSE 1.41 / r 0.72 / ρ 0.76"
    assert t.loc["linear probe", "ours (m, layer 1)"] == "RMSE 1.00 / r 0.70 [0.62, 0.77] / ρ 0.60 [0.50, 0.70]"
    assert t.loc["MLP", "paper RMSE / label sd (implied)"] == f"{math.sqrt(1 - 0.74 ** 2):.2f}"
    assert t.loc["MLP", "ours RMSE / label sd"] == "0.50"
    assert t.loc["best Pearson over layers", "paper (Pythia-70M)"] == "0.814 (Gemma-2-2B, layer 22)"
    assert t.loc["best Pearson over layers", "ours (m, layer 1)"].startswith("0.81 (layer 1;")


def test_k_map_table_matches_the_maps_known_values():
    t = report.k_map_table()
    assert t.loc["k ∈ [20, 320]", 0] == 34 and t.loc["k ∈ [20, 320]", 5] == 170 and t.loc["k ∈ [20, 320]", 10] == 306
    assert t.loc["k ∈ [20, 640]", 8] == 552 and list(t.columns) == [0, 2, 4, 5, 6, 8, 10]


def test_onestop_table_keeps_the_summary_columns():
    row = {"spearman": 0.3, "spearman_lo": 0.1, "spearman_hi": 0.5, "ordered_share": 0.4, "pairwise_share": 0.6,
           "n_topics": 10, "n": 30, "mean_by_level": [1, 2, 3]}
    t = report.onestop_table({"probe": row, "rubric": row})
    assert list(t.index) == ["probe", "rubric"] and "n" not in t and t.loc["probe", "n_topics"] == 10.0


# ---------------------------------------------------------------------------- figures


def test_plot_curves_one_panel_per_column_with_the_shaded_phase():
    hist = pd.DataFrame({"step": range(10), "mse": [1.0 / (s + 1) for s in range(10)], "fve": [0.1 * s for s in range(10)]})
    fig = report.plot_curves(hist, {"mse": "MSE", "fve": "FVE"}, shade=(7, 9), shade_label="phase 3", logy=("mse",))
    a, b = fig.axes
    assert (a.get_title(), b.get_title()) == ("MSE", "FVE")
    assert a.get_yscale() == "log" and b.get_yscale() == "linear"
    assert len(a.patches) == 1 and a.patches[0].get_label() == "phase 3"
    assert a.lines[0].get_ydata().tolist() == hist["mse"].tolist()


def test_plot_layer_sweep_draws_each_sweep_offset_around_the_layer():
    df = pd.DataFrame({m: [0.1, 0.5] for m in ("pearson", "pearson_lo", "pearson_hi", "r2", "r2_lo", "r2_hi")},
                      index=pd.Index([0, 1], name="layer"))
    fig = report.plot_layer_sweep({"a": df, "b": df}, 1, title="t")
    left, right = fig.axes
    xs = [line.get_xdata().tolist() for line in left.lines[:2]]
    assert xs == [[-0.15, 0.85], [0.15, 1.15]]
    assert left.get_ylabel() == "Pearson r (test)" and right.get_ylabel() == "R² (test)"
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["a", "b", "best layer by CV: 1"]


def test_plot_controls_lists_every_row():
    c = _controls()
    fig = report.plot_controls(c, (-0.1, 0.2), n_perm=50, n_test=40, best_layer=3)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(c.index)
    assert ax.get_xlabel() == "Pearson r on the 40 test texts (95 % bootstrap CI)"
    assert ax.get_title() == "Ridge probe at layer 3 vs controls"


def test_plot_k_maps_and_onestop():
    k = torch.tensor([34, 100, 200, 306])
    fig = report.plot_k_maps(k, k.flip(0), layer=5)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "k ∈ [20, 320]", "k ∈ [20, 480]", "k ∈ [20, 640]", "base_k = 80 (unused)"]
    assert fig.axes[1].get_title() == "k for our 4 contexts, k ∈ [20, 320]"
    g = report.plot_onestop([0, 1, 2, 0, 1, 2], {"probe": [1, 2, 3, 2, 3, 4], "rubric": [3, 4, 5, 3, 4, 6]},
                            max_length=64)
    assert [ax.get_title() for ax in g.axes.flat] == ["scorer = probe", "scorer = rubric"]


# ---------------------------------------------------------------------------- the paper's deviations


def test_deviations_table_filters_by_kind_and_chapter():
    full = report.deviations_table()
    assert len(full) == len(paper.DEVIATIONS) and str(full["flaw"].dtype) == "Int64"
    bugs = report.deviations_table(kind=paper.BUG)
    assert set(bugs["kind"]) == {paper.BUG} and len(bugs) == sum(d.kind == paper.BUG for d in paper.DEVIATIONS)
    assert full.set_index("topic").loc["failed labels", "flaw"] == 10
    assert pd.isna(full.set_index("topic").loc["batch order", "flaw"])
    ch4 = report.deviations_table(chapter="04_training")
    assert set(ch4["where"]) == {"04_training"}
    two = report.deviations_table(chapter=["03_linear_encoding", "04_training"])
    assert set(two["where"]) == {"03_linear_encoding", "04_training"} and len(two) > len(ch4)
    assert report.deviations_table(chapter="nowhere").empty
    with pytest.raises(ValueError, match="kind must be one of"):
        report.deviations_table(kind="bug")


# ---------------------------------------------------------------------------- runs (chapter 6)


def _results(dfve=(0.02, 0.01, 0.03)) -> dict:
    est, lo, hi = dfve
    return {"quick": {"run": "quick",
                      "probe": {"layer": 7, "pearson": 0.7, "spearman": 0.6, "rmse": 1.0, "pearson_lo": 0.65,
                                "pearson_hi": 0.75, "label_source": "rubric", "n_train": 90},
                      "adaptivek": [{"sae": "adaptivek_2_8", "k_min": 2, "k_max": 8, "l0_mean": 5.0, "fve": 0.6,
                                     "cosine": 0.8, "l2_ratio": 0.9, "dfve_vs_topk": est, "dfve_lo": lo, "dfve_hi": hi}],
                      "topk": [{"sae": "topk_2", "k": 2, "l0_mean": 2.0, "fve": 0.4},
                               {"sae": "topk_8", "k": 8, "l0_mean": 8.0, "fve": 0.7}]}}


def test_runs_tables_add_the_papers_rows():
    probe = report.probe_runs_table(_results())
    assert list(probe.index) == ["quick", "paper (Pythia-70M)", "paper (Gemma-2-2B)"]
    assert probe.loc["quick", "95% CI"] == "[0.650, 0.750]" and probe.loc["paper (Gemma-2-2B)", "Pearson"] == 0.814
    sae = report.adaptivek_runs_table(_results())
    assert sae.loc[("quick", "2-8"), "ΔFVE vs TopK"] == "+0.020 [+0.010, +0.030]"
    assert sae.loc[("paper", "20-320"), "mean L0 (paper: mean k)"] == 214
    assert report.adaptivek_runs_table(_results((None, None, None))).loc[("quick", "2-8"), "ΔFVE vs TopK"] == "—"


@pytest.mark.parametrize("dfve, sign", [((0.02, 0.01, 0.03), "better"), ((-0.02, -0.03, -0.01), "worse"),
                                        ((0.0, -0.01, 0.01), "indistinguishable")])
def test_frontier_signs(dfve, sign):
    assert report.frontier_signs(_results(dfve)) == [sign]


def test_frontier_signs_skip_missing_intervals():
    assert report.frontier_signs(_results((None, None, None))) == []
    assert report.frontier_signs(_results((0.1, float("nan"), 0.2))) == []


@pytest.mark.parametrize("signs, phrase, start", [
    ([], "none measured", "Not measured in this build"),
    (["better", "better"], "2 better", "Agree, at our scale: every one of our 2 AdaptiveK SAEs beats"),
    (["worse", "better", "indistinguishable"], "1 better, 1 indistinguishable, 1 worse",
     "Partly agree, at our scale: 1 of our 3 AdaptiveK SAEs beat the TopK frontier at matched sparsity "
     "(1 better, 1 indistinguishable, 1 worse, section 3)."),
    (["worse", "indistinguishable"], "1 indistinguishable, 1 worse",
     "Disagree, at our scale: none of our 2 AdaptiveK SAEs beats fixed-k TopK at matched sparsity "
     "(1 indistinguishable, 1 worse, section 3)."),
])
def test_count_phrase_and_claim2_verdict(signs, phrase, start):
    assert report.count_phrase(signs) == phrase
    got = report.claim2_verdict(signs)
    assert got.startswith(start) and got.endswith("run exactly this test at the paper's scale.")


def test_plot_runs_one_panel_per_run_and_the_paper():
    fig = report.plot_runs(_results())
    assert [ax.get_title() for ax in fig.axes] == ["quick", "paper (k-range table)"]
    assert fig.axes[0].lines[0].get_xdata().tolist() == [2.0, 8.0]  # the TopK frontier, sorted by L0


@pytest.mark.slow
def test_find_and_collect_results_from_a_real_compare_run(tmp_path):
    from adaptivek.comparison import CompareConfig, compare

    run = tmp_path / "artifacts" / "quick"
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 16, generator=g) * 2 + 5
    y = ((X[:, :4].sum(1) + torch.randn(120, generator=g)).double() / 2 - 5).clamp(0, 10)  # on the 0-10 scale
    cfg = CompareConfig(d_sae=32, steps=4, batch_size=32, topk_ks=(2, 4, 8), k_ranges=((2, 8),), n_boot=50,
                        batchtopk="none")
    compare(X[:90], y[:90], X[90:], y[90:], out=run / "comparison" / "results.json", cfg=cfg, log=None)
    (run / "linear_encoding").mkdir()
    (run / "linear_encoding" / "summary.json").write_text(json.dumps(
        {"best_layer": 7, "best": {"pearson": 0.7, "spearman": 0.6, "rmse": 1.0, "r2": 0.4, "lambda_": 10.0},
         "label_source": "rubric", "n_train": 90}))
    pd.DataFrame({"layer": [6, 7], "pearson_lo": [0.1, 0.65], "pearson_hi": [0.2, 0.75]}).to_csv(
        run / "linear_encoding" / "layer_sweep.csv", index=False)
    (tmp_path / "artifacts" / "gemma-2-2b-dry").mkdir()

    runs = report.find_runs(tmp_path / "artifacts").set_index("run")
    assert runs.loc["quick", "comparison"] and runs.loc["quick", "probe"] and not runs.loc["quick", "dry_run"]
    assert runs.loc["gemma-2-2b-dry", "dry_run"] and runs.loc["gemma-2-2b-dry", "profile"] == "gemma-2-2b"
    assert not runs.loc["gemma-2-2b-dry", "comparison"]

    got = report.collect_results(run)
    assert got["probe"]["layer"] == 7 and (got["probe"]["pearson_lo"], got["probe"]["pearson_hi"]) == (0.65, 0.75)
    res = json.loads((run / "comparison" / "results.json").read_text())
    (ada,) = got["adaptivek"]
    assert (ada["sae"], ada["k_min"], ada["k_max"]) == ("adaptivek_2_8", 2, 8)
    assert ada["fve"] == res["saes"]["adaptivek_2_8"]["metrics"]["fve"]
    assert ada["dfve_vs_topk"] == res["vs_topk"]["adaptivek_2_8"]["fve"]["estimate"]
    assert [t["sae"] for t in got["topk"]] == ["topk_2", "topk_4", "topk_8"]
    assert report.collect_results(tmp_path / "artifacts" / "gemma-2-2b-dry")["adaptivek"] is None
    assert report.find_runs(tmp_path / "nowhere").empty


def test_runs_helpers_with_no_runs_show_the_paper_only():
    assert list(report.probe_runs_table({}).index) == ["paper (Pythia-70M)", "paper (Gemma-2-2B)"]
    assert set(report.adaptivek_runs_table({}).index.get_level_values("run")) == {"paper"}
    assert report.frontier_signs({}) == [] and report.claim2_verdict([]).startswith("Not measured")
    assert [ax.get_title() for ax in report.plot_runs({}).axes] == ["paper (k-range table)"]


def test_context_documents_reads_chapter_1_or_falls_back_with_a_warning(tmp_path):
    texts = ["one context", "another context"]
    pd.DataFrame({"text": texts, "source": ["a", "b"], "document": ["a:1", "b:7"]}).to_parquet(tmp_path / "texts.parquet")
    assert report.context_documents(tmp_path, texts) == ["a:1", "b:7"]
    with pytest.warns(UserWarning, match="each context is its own document"):
        assert report.context_documents(tmp_path, texts[::-1], n_texts=2) == ["context:0", "context:1"]


def test_context_documents_rebuilds_from_the_corpus_sample(tmp_path):
    from adaptivek import load_corpus

    sample = load_corpus("embedded", n=3, seed=5)
    prefixes = [t[:20] for t in sample["text"]]  # chapter 1's contexts are prefixes of the sampled texts
    assert report.context_documents(tmp_path, prefixes, n_texts=3, seed=5) == list(sample["document"])
