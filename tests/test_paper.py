"""adaptivek.paper: the paper's settings against our profiles, and reading runs back for chapter 6."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from adaptivek import book, paper

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["pythia-70m", "pythia-160m", "gemma-2-2b"])
def test_paper_profiles_run_every_chapter_with_the_papers_settings(name):
    table = paper.profile_vs_paper(book.effective_parameters(name, ROOT)).set_index("setting")
    differs = set(table.index[~table["same"]])
    # the labels are the one thing an offline default cannot copy (GPT-4.1-mini); everything else must match
    assert differs == {"complexity labels"}, table[~table["same"]]
    model = book.effective_parameters(name, ROOT)["01_activations"]["model"]
    assert table.loc["SAE layer", "profile"] == paper.SETTINGS["layers"][model]


def test_dry_runs_keep_the_architecture_and_sizes_but_not_the_data_scale():
    table = paper.profile_vs_paper(book.effective_parameters("gemma-2-2b", ROOT, dry_run=True)).set_index("setting")
    assert table.loc["model", "profile"] == "random:google/gemma-2-2b" and table.loc["model", "same"]
    assert table.loc[["dictionary size", "k range", "dtype", "SAE layer"], "same"].all()
    assert not table.loc["contexts (train + test)", "same"]


def test_quick_profile_is_reported_as_scaled_down():
    table = paper.profile_vs_paper(book.effective_parameters("quick", ROOT)).set_index("setting")
    assert table.loc["model", "profile"] == "smollm2-135m" and not table.loc["model", "same"]
    assert table.loc["dictionary size", "profile"] == "4 x d_model"  # from the chapter's own default


def test_parameter_defaults_reads_literals_and_skips_expressions(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("a = 1\nb = [1, (2, 3)]\nc = None  # comment = x\nd = len('x')",
                                          metadata={"tags": ["parameters"]})]
    nbformat.write(nb, str(tmp_path / "n.ipynb"))
    assert book.parameter_defaults(tmp_path / "n.ipynb") == {"a": 1, "b": [1, (2, 3)], "c": None}


def test_every_deviation_names_a_real_chapter_and_says_why():
    chapters = {p.stem for p in book.toc_chapters(ROOT)}
    table = paper.deviations_table()
    assert len(table) == len(paper.DEVIATIONS) >= 10
    for d in paper.DEVIATIONS:
        assert d.where in chapters, d
        assert all(len(getattr(d, f)) > 3 for f in ("topic", "reference", "ours", "why")), d
    assert table["topic"].is_unique
    assert set(table["kind"]) == set(paper.DEVIATION_KINDS)
    assert list(table["kind"].cat.codes) == sorted(table["kind"].cat.codes)  # grouped, in DEVIATION_KINDS order


def test_find_and_collect_results_from_a_real_compare_run(tmp_path):
    import torch

    from adaptivek.comparison import compare

    run = tmp_path / "artifacts" / "quick"
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 16, generator=g) * 2 + 5
    y = (X[:, :4].sum(1) + torch.randn(120, generator=g)).double() / 2 + 5
    compare(X[:90], y[:90], X[90:], y[90:], out=run / "comparison" / "results.json", d_sae=32, steps=4,
            batch_size=32, topk_ks=(2, 4, 8), k_ranges=((2, 8),), n_boot=50, batchtopk="none", log=None)
    (run / "linear_encoding").mkdir()
    (run / "linear_encoding" / "summary.json").write_text(json.dumps(
        {"best_layer": 7, "best": {"pearson": 0.7, "spearman": 0.6, "rmse": 1.0, "r2": 0.4, "lambda_": 10.0},
         "label_source": "rubric", "n_train": 90}))
    pd.DataFrame({"layer": [6, 7], "pearson_lo": [0.1, 0.65], "pearson_hi": [0.2, 0.75]}).to_csv(
        run / "linear_encoding" / "layer_sweep.csv", index=False)
    (tmp_path / "artifacts" / "gemma-2-2b-dry").mkdir()

    runs = paper.find_runs(tmp_path / "artifacts").set_index("run")
    assert runs.loc["quick", "comparison"] and runs.loc["quick", "probe"] and not runs.loc["quick", "dry_run"]
    assert runs.loc["gemma-2-2b-dry", "dry_run"] and runs.loc["gemma-2-2b-dry", "profile"] == "gemma-2-2b"
    assert not runs.loc["gemma-2-2b-dry", "comparison"]

    got = paper.collect_results(run)
    assert got["probe"]["layer"] == 7 and (got["probe"]["pearson_lo"], got["probe"]["pearson_hi"]) == (0.65, 0.75)
    res = json.loads((run / "comparison" / "results.json").read_text())
    (ada,) = got["adaptivek"]
    assert (ada["sae"], ada["k_min"], ada["k_max"]) == ("adaptivek_2_8", 2, 8)
    assert ada["fve"] == res["saes"]["adaptivek_2_8"]["metrics"]["fve"]
    assert ada["dfve_vs_topk"] == res["vs_topk"]["adaptivek_2_8"]["fve"]["estimate"]
    assert [t["sae"] for t in got["topk"]] == ["topk_2", "topk_4", "topk_8"]
    assert paper.collect_results(tmp_path / "artifacts" / "gemma-2-2b-dry")["adaptivek"] is None
    assert paper.find_runs(tmp_path / "nowhere").empty
