"""Chapter 3's token-level probe and within-source scores: document bootstraps, scores by group, verdicts."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from adaptivek import report
from adaptivek.linear_encoding import (
    SCORE_COLUMNS,
    document_scores,
    grouped_scores,
    position_buckets,
    within_source_scores,
)
from adaptivek.stats import bootstrap_ci, group_bootstrap_ci, group_bootstrap_metrics, pearson, r2, rmse


def _clustered(n_groups=30, size=40, seed=0):
    """Rows whose x and y share a per-group draw (weakly related) plus a little row noise."""
    g = torch.Generator().manual_seed(seed)
    gx = torch.randn(n_groups, generator=g, dtype=torch.float64)
    gy = 0.3 * gx + torch.randn(n_groups, generator=g, dtype=torch.float64)
    groups = np.repeat(np.arange(n_groups), size)
    x = gx[groups] + 0.05 * torch.randn(len(groups), generator=g, dtype=torch.float64)
    y = gy[groups] + 0.05 * torch.randn(len(groups), generator=g, dtype=torch.float64)
    return x, y, groups


# ----------------------------------------------------------------------------- stats.group_bootstrap_ci
def test_each_row_its_own_group_is_the_row_bootstrap():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(60, generator=g, dtype=torch.float64)
    b = a + torch.randn(60, generator=g, dtype=torch.float64)
    rows = bootstrap_ci(pearson, a, b, n_boot=300, seed=5)
    groups = group_bootstrap_ci(pearson, a, b, groups=np.arange(60), n_boot=300, seed=5)
    assert groups == pytest.approx(rows, abs=1e-12)


def test_clustered_rows_give_a_wider_group_interval_than_a_row_interval():
    x, y, groups = _clustered()
    row = bootstrap_ci(pearson, x, y, n_boot=400, seed=0)
    grp = group_bootstrap_ci(pearson, x, y, groups=groups, n_boot=400, seed=0)
    assert grp.estimate == pytest.approx(row.estimate)
    assert (grp.hi - grp.lo) > 3 * (row.hi - row.lo)  # 30 independent groups, not 1200 independent rows


def test_a_drawn_group_brings_all_its_rows():
    sizes = np.array([1, 7, 3, 12])
    groups = np.repeat(np.array(["d", "a", "c", "b"]), sizes)  # ids unsorted, rows grouped
    member = torch.as_tensor(np.unique(groups, return_inverse=True)[1], dtype=torch.float64)
    size_of = torch.as_tensor(np.repeat(sizes, sizes), dtype=torch.float64)

    def complete(m, s):  # 1.0 when every group present has a whole multiple of its size
        counts = torch.bincount(m.long(), minlength=4).double()  # [4] rows of each group in the resample
        return float((counts[m.long()] % s == 0).all())  # checked at every row: s is its group's size

    ci = group_bootstrap_ci(complete, member, size_of, groups=groups, n_boot=200, seed=3)
    assert (ci.estimate, ci.lo, ci.hi) == (1.0, 1.0, 1.0)


def test_group_bootstrap_metrics_match_the_loop_for_the_same_seed():
    x, y, groups = _clustered(seed=2)
    fast = group_bootstrap_metrics(x, y, groups=groups, n_boot=200, seed=7)
    for name, fn in (("pearson", pearson), ("r2", r2), ("rmse", rmse)):
        slow = group_bootstrap_ci(fn, x, y, groups=groups, n_boot=200, seed=7)
        assert fast[name] == pytest.approx(slow, abs=1e-9), name


@pytest.mark.parametrize("call, match", [
    (lambda: group_bootstrap_ci(pearson, torch.ones(4), torch.arange(4.0), groups=[0, 0, 1]), "3 ids for 4 rows"),
    (lambda: group_bootstrap_ci(pearson, torch.randn(4), torch.randn(4), groups=["a"] * 4), "at least 2 groups"),
    (lambda: group_bootstrap_metrics(torch.randn(4), torch.randn(5), groups=[0, 0, 1, 1]), "pred"),
    (lambda: group_bootstrap_ci(pearson, groups=[0, 1]), "at least one array"),
])
def test_group_bootstrap_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- scores by document and group
def test_document_scores_resample_documents_and_need_two_for_an_interval():
    x, y, groups = _clustered()
    out = document_scores(x, y, groups.astype(str), n_boot=200)
    assert list(out) == SCORE_COLUMNS
    assert (out["n"], out["n_documents"]) == (len(x), 30)
    assert out["pearson_lo"] < out["pearson"] < out["pearson_hi"]
    one = document_scores(x[:40], y[:40], ["a"] * 40, n_boot=50)
    assert one["pearson"] == pytest.approx(float(pearson(x[:40], y[:40])))
    assert math.isnan(one["pearson_lo"]) and math.isnan(one["r2_hi"])


def test_grouped_scores_keep_groups_with_enough_rows_and_skip_none():
    x, y, groups = _clustered()
    by = np.where(groups < 10, "early", np.where(groups < 29, "late", "tiny")).astype(object)
    by[:5] = None
    table = grouped_scores(x, y, by, groups, min_n=41, n_boot=50)
    assert list(table.index) == ["early", "late"]  # "tiny" has 40 rows < 41
    late = by == "late"
    assert table.loc["late", "pearson"] == pytest.approx(float(pearson(x[late], y[late])))
    assert table.loc["early", "n"] == 400 - 5
    assert list(table.columns) == SCORE_COLUMNS


def test_position_buckets_label_half_open_ranges():
    out = position_buckets([0, 14, 15, 31, 32, 63, 64, 127, 128], (15, 32, 64, 128))
    assert [None if pd.isna(v) else v for v in out] == [None, None, "15-31", "15-31", "32-63", "32-63",
                                                        "64-127", "64-127", None]
    assert list(out.categories) == ["15-31", "32-63", "64-127"]
    wide = position_buckets(np.arange(2, 300), (2, 16, 128, 256))  # category order, not string order
    table = grouped_scores(torch.arange(298.0) % 7, torch.arange(298.0) % 5, wide, np.arange(298) // 3, n_boot=5)
    assert list(table.index) == ["2-15", "16-127", "128-255"]
    with pytest.raises(ValueError, match="increasing"):
        position_buckets([1], (10, 5))


def _sources(within_weight, seed=0):
    """Three sources with mean labels 2, 5, 8; each row adds within-source variation w; 12 documents per source."""
    g = torch.Generator().manual_seed(seed)
    n = 360
    src = np.repeat(np.array(["a", "b", "c"], dtype=object), n // 3)
    offset = torch.as_tensor(np.repeat([2.0, 5.0, 8.0], n // 3))
    w = torch.randn(n, generator=g, dtype=torch.float64)
    y = offset + w
    pred = offset + 0.1 + within_weight * w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    docs = np.array([f"{s}:{i // 10}" for i, s in enumerate(src)], dtype=object)
    return pred, y, src, docs


@pytest.mark.parametrize("within_weight, verdict", [(1.0, "within a source too"), (0.0, "mostly which source")])
def test_within_source_scores_tell_source_from_within_source_signal(within_weight, verdict):
    pred, y, src, docs = _sources(within_weight)
    tr, te = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    te_t, tr_t = torch.as_tensor(te), torch.as_tensor(tr)
    table = within_source_scores(pred[te_t], y[te_t], src[te], docs[te], train_pred=pred[tr_t], train_y=y[tr_t],
                                 train_sources=src[tr], min_n=20, n_boot=200)
    assert list(table.index) == ["pooled", "a", "b", "c", "pooled, source means removed",
                                 "source's training mean alone"]
    assert table.loc["pooled", "pearson"] > 0.9  # the sources' offsets alone make the pooled number high
    assert table.loc["source's training mean alone", "pearson"] > 0.8
    assert report.within_source_verdict(table).startswith(verdict)
    if within_weight == 0:
        assert abs(table.loc["pooled, source means removed", "pearson"]) < 0.2


def test_within_source_scores_use_training_means_and_skip_unseen_sources():
    pred, y, src, docs = _sources(1.0)
    src_test = src.copy()
    src_test[:5] = "unseen"
    table = within_source_scores(pred, y, src_test, docs, train_pred=pred + 1.0, train_y=y + 2.0,
                                 train_sources=src, min_n=5, n_boot=20)
    assert table.loc["pooled", "n"] == len(y)
    assert table.loc["pooled, source means removed", "n"] == len(y) - 5
    assert "unseen" in table.index  # its own row (5 rows >= min_n) ...
    alone = table.loc["source's training mean alone"]  # ... but no training mean
    known = src_test != "unseen"
    means = pd.Series((y + 2.0).numpy()).groupby(src).mean()
    assert alone["r2"] == pytest.approx(float(r2(torch.tensor(means[src_test[known]].to_numpy()),
                                                   y[torch.as_tensor(known)])))


def test_within_source_scores_check_lengths():
    pred, y, src, docs = _sources(1.0)
    with pytest.raises(ValueError, match="one entry per row"):
        within_source_scores(pred, y, src[:-1], docs, train_pred=pred, train_y=y, train_sources=src)


# ----------------------------------------------------------------------------- report
def test_token_probe_table_formats_both_probes():
    rows = {"last token (paper)": dict(n_train=1200, n_train_documents=300, n_test=300, n_test_documents=80,
                                       pearson=0.7, pearson_lo=0.6, pearson_hi=0.78, r2=0.45,
                                       **{"lambda": 1e5}),
            "every token (prefix labels)": dict(n_train=135000, n_train_documents=300, n_test=34000,
                                                n_test_documents=80, pearson=0.55, pearson_lo=0.5, pearson_hi=0.6,
                                                r2=0.3, **{"lambda": 1e4, "lambda_at_edge": True})}
    t = report.token_probe_table(rows)
    assert t.loc["every token (prefix labels)", "train rows (documents)"] == "135,000 (300)"
    assert t.loc["every token (prefix labels)", "λ"] == "10000 (edge)"
    assert t.loc["last token (paper)", "λ"] == "100000"
    assert t.loc["last token (paper)", "Pearson [95 % CI over documents]"] == "0.70 [0.60, 0.78]"
    rows["last token (paper)"].pop("lambda")
    assert report.token_probe_table(rows).loc["last token (paper)", "λ"] == "-"


def test_within_source_verdict_middle_case():
    table = pd.DataFrame({"pearson": [0.8, 0.2], "pearson_lo": [0.7, 0.05]},
                         index=["pooled", "pooled, source means removed"])
    assert report.within_source_verdict(table).startswith("both, but mostly which source")
