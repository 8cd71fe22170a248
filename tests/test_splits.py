"""Document-grouped splits and folds: no group on two sides, sizes near the fractions, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptivek.stats import (
    check_disjoint_groups,
    group_codes,
    group_kfold,
    group_split,
    validation_folds,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_groups(rng: np.random.Generator, *, strings: bool) -> np.ndarray:
    """Row group ids: 3-80 groups of 1-40 rows each (sizes drawn per case), rows shuffled."""
    sizes = rng.integers(1, rng.integers(2, 41), size=rng.integers(3, 81))
    ids = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(ids)
    return np.array([f"doc-{i}" for i in ids]) if strings else ids


def _group_sets(groups, splits) -> list[set]:
    return [set(np.asarray(groups)[s.numpy()].tolist()) for s in splits]


def _assert_partition(groups, splits) -> None:
    """Every row in exactly one split, no split empty, no group in two splits (checked without the library)."""
    rows = torch.cat(list(splits))
    assert torch.equal(rows.sort().values, torch.arange(len(groups)))
    assert all(len(s) > 0 for s in splits)
    sets = _group_sets(groups, splits)
    assert sum(len(s) for s in sets) == len(set.union(*sets))  # pairwise disjoint


@pytest.mark.parametrize("case", range(12))
def test_group_split_and_kfold_never_share_a_group(case):
    rng = np.random.default_rng(case)
    groups = _random_groups(rng, strings=case % 2 == 0)
    fractions = [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.5, 0.5)][case % 3]
    largest = np.unique(groups, return_counts=True)[1].max()
    for seed in range(3):
        splits = group_split(groups, fractions, seed=seed)
        _assert_partition(groups, splits)
        check_disjoint_groups(groups, *splits)
        if min(fractions) * len(groups) >= largest:  # the documented bound holds whenever no target is below a group
            for s, f in zip(splits, fractions, strict=True):
                assert abs(len(s) - f * len(groups)) <= largest
        folds = group_kfold(groups, 3, seed=seed)
        _assert_partition(groups, folds)
        if len(groups) / 3 >= largest:
            assert max(abs(len(f) - len(groups) / 3) for f in folds) <= largest


def test_singleton_groups_meet_the_fractions_to_one_row():
    splits = group_split(np.arange(1000), (0.7, 0.2, 0.1), seed=3)
    assert [len(s) for s in splits] == [700, 200, 100]  # midpoints at k + 1/2 never sit on a whole-number cut
    assert all(torch.equal(s, s.sort().values) for s in splits)  # sorted indices


def test_assignment_depends_on_groups_not_row_order():
    rng = np.random.default_rng(0)
    groups = _random_groups(rng, strings=True)
    perm = rng.permutation(len(groups))
    a = _group_sets(groups, group_split(groups, seed=5))
    b = _group_sets(groups[perm], group_split(groups[perm], seed=5))
    assert a == b
    assert a != _group_sets(groups, group_split(groups, seed=6))  # the seed matters


def test_a_giant_group_still_leaves_every_split_a_group():
    groups = np.array([0] * 1000 + [1, 2, 3])  # one group holds 99.7% of the rows
    for seed in range(6):
        _assert_partition(groups, group_split(groups, (0.8, 0.1, 0.1), seed=seed))


def test_check_disjoint_groups_names_the_shared_document():
    groups = ["book-a", "book-a", "book-b", "book-c"]
    check_disjoint_groups(groups, [0, 1], [2], [3])
    with pytest.raises(ValueError, match=r"splits 0 and 2 share 1 group\(s\), e.g. \['book-a'\]"):
        check_disjoint_groups(groups, [0], [2], [1, 3])
    with pytest.raises(ValueError, match=r"split 1 holds indices outside \[0, 4\)"):
        check_disjoint_groups(groups, [0], [4])


def test_group_codes_accepts_strings_ints_and_tensors():
    assert group_codes(["b", "a", "b"]).codes.tolist() == [1, 0, 1]
    assert group_codes(torch.tensor([7, 3, 7])).ids.tolist() == [3, 7]
    assert group_codes(np.array([2.0, 1.0])).codes.tolist() == [1, 0]


def test_validation_folds_with_groups():
    groups = np.repeat(np.arange(10), 3)
    folds = validation_folds(5, 30, seed=1, groups=groups)
    _assert_partition(groups, folds)
    with pytest.raises(ValueError, match="share 1 group"):  # explicit folds that cut a document
        validation_folds([[0, 1], [2, 3, 4, 5]], 30, groups=groups)
    validation_folds([[0, 1, 2], [3, 4, 5]], 30, groups=groups)  # whole documents: fine


@pytest.mark.parametrize("call, match", [
    (lambda: group_split(["a", "b"]), r"2 group\(s\) cannot fill 3 splits"),
    (lambda: group_kfold(["a", "a", "b"], 3), r"2 group\(s\) cannot fill 3 folds"),
    (lambda: group_split(["a", None, "b", "c"]), r"1 missing or empty id\(s\) \(rows \[1\]\)"),
    (lambda: group_split([1.0, 2.0, float("nan"), 3.0]), r"missing or empty id\(s\) \(rows \[2\]\)"),
    (lambda: group_split(["a", "b", " ", "c"]), r"missing or empty id\(s\) \(rows \[2\]\)"),
    (lambda: group_split(list("abcd"), (0.8, 0.1)), "summing to 1"),
    (lambda: group_split(list("abcd"), (1.2, -0.2)), "positive numbers"),
    (lambda: group_split(list("abcd"), (1.0,)), ">= 2 positive"),
    (lambda: group_kfold(list("abcd"), 1), "folds must be an int >= 2"),
    (lambda: group_split(np.zeros((3, 2))), "must be 1-D"),
    (lambda: validation_folds(2, 5, groups=list("abcd")), "groups has 4 ids but there are 5 samples"),
], ids=["few_groups_split", "few_groups_kfold", "none_id", "nan_id", "blank_id", "sum_not_1",
        "negative_fraction", "one_fraction", "one_fold", "groups_2d", "length_mismatch"])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- the probes' held-out split
def test_held_out_split_by_document_shares_no_document():
    from adaptivek.linear_encoding import held_out_split

    docs = [f"doc{i // 7}" for i in range(140)]  # 20 documents of 7 rows
    train, test, docs_train = held_out_split(len(docs), test_frac=0.25, seed=3, groups=docs)
    assert not {docs[i] for i in train.tolist()} & {docs[i] for i in test.tolist()}
    assert sorted(train.tolist() + test.tolist()) == list(range(140))
    assert list(docs_train) == [docs[i] for i in train.tolist()]
    by_row = held_out_split(len(docs), test_frac=0.25, seed=3)
    assert by_row.groups_train is None
    assert {docs[i] for i in by_row.train.tolist()} & {docs[i] for i in by_row.test.tolist()}  # rows: shared


def test_held_out_split_refuses_groups_of_the_wrong_length():
    from adaptivek.linear_encoding import held_out_split

    with pytest.raises(ValueError, match="one document id per row"):
        held_out_split(10, groups=["a"] * 9)


def test_probe_functions_take_documents(one_thread):
    from adaptivek.linear_encoding import controls_table, fit_and_score, layer_sweep, permutation_null

    g = torch.Generator().manual_seed(0)
    docs = [f"d{i // 5}" for i in range(100)]
    offset = torch.randn(20, 8, generator=g).repeat_interleave(5, 0)  # rows of a document share an offset
    X = offset + 0.1 * torch.randn(100, 8, generator=g)
    y = X[:, 0] * 2 + 5
    fit = fit_and_score(X, y, groups=docs, n_boot=20)
    assert not {docs[i] for i in fit["train"].tolist()} & {docs[i] for i in fit["test"].tolist()}
    sweep = layer_sweep({0: X, 1: X * 2}, y, groups=docs, n_boot=20)
    assert list(sweep.index) == [0, 1] and sweep["n"].iloc[0] == len(fit["test"])
    table = controls_table(X, y, groups=docs, n_boot=20, mlp=False)
    assert table.loc["ridge probe", "n"] == len(fit["test"])
    assert len(permutation_null(X, y, n_perm=3, groups=docs)) == 3
