"""The oracle allocation bound (adaptivek.oracle) against direct computations and brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from adaptivek import TopKSAE
from adaptivek import oracle as oracle_mod
from adaptivek.evaluation import evaluate
from adaptivek.oracle import (
    ErrorCurves,
    allocation_curves,
    allocation_fve,
    error_curves,
    oracle_allocation,
    rescale_allocation,
    uniform_allocation,
)

K = 10  # the grid 1..K


@pytest.fixture(scope="module")
def dictionary(one_thread):
    """Rows built from 1..8 atoms of an orthonormal TopK dictionary (W_enc = W_decᵀ), so rows need different k."""
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(32, 24, 4, seed=3)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(32, 24, generator=g))  # [32, 24] orthonormal columns
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
    n = 240
    n_atoms = torch.randint(1, 9, (n,), generator=g)  # [n] how many atoms each row uses
    rank = torch.rand(n, 24, generator=g).argsort(1).argsort(1)  # [n, 24] a random rank per atom
    coef = (rank < n_atoms[:, None]) * (1 + 2 * torch.rand(n, 24, generator=g))  # [n, 24] 1..8 non-zeros
    X = coef @ sae.W_dec.detach() + 0.05 * torch.randn(n, 32, generator=g)
    return sae, X, n_atoms


@pytest.fixture(scope="module")
def curves(dictionary):
    sae, X, _ = dictionary
    return error_curves(sae, X, K)


def _random_allocations(n: int, budget: int, count: int, seed: int) -> torch.Tensor:
    """``count`` random allocations [count, n] in 1..K with mean exactly ``budget``: pairs of rows trade k."""
    g = torch.Generator().manual_seed(seed)
    room = min(budget - 1, K - budget)
    out = torch.full((count, n), budget)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(count)])  # [count, n]
    delta = torch.randint(-room, room + 1, (count, n // 2), generator=g)  # [count, n/2]
    out.scatter_(1, perm[:, : n // 2], budget + delta)
    out.scatter_(1, perm[:, n // 2: 2 * (n // 2)], budget - delta)
    return out


def test_curves_match_evaluate(dictionary, curves):
    sae, X, _ = dictionary
    for k in (1, 4, 7, K):
        direct = evaluate(sae, X, k=k, per_row=True)
        assert torch.allclose(curves.errors[:, k - 1], direct["row_sq_err"], rtol=1e-5, atol=1e-6)
        assert curves.fve(torch.full((len(X),), k)) == pytest.approx(direct["fve"], abs=1e-6)
    k_rows = torch.arange(len(X)) % K + 1
    assert allocation_fve(sae, X, k_rows) == pytest.approx(curves.fve(k_rows), abs=1e-6)


def test_curves_do_not_depend_on_chunks_or_grid(dictionary, curves, monkeypatch):
    sae, X, _ = dictionary
    monkeypatch.setattr(oracle_mod, "_ELEMENTS", 24 * 7)  # 7 rows per chunk
    assert torch.allclose(error_curves(sae, X, K).errors, curves.errors, rtol=1e-6, atol=1e-8)
    coarse = error_curves(sae, X, [2, 5, 9])
    assert torch.allclose(coarse.errors, curves.errors[:, [1, 4, 8]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", [2, 4, 7])
def test_oracle_beats_uniform_and_random_allocations(curves, budget):
    n = len(curves.errors)
    o = oracle_allocation(curves, budget)
    uniform = float(curves.row_errors(torch.full((n,), budget)).sum())
    assert o.sse < uniform  # the rows use 1..8 atoms: a per-row k must help
    rand = _random_allocations(n, budget, 200, seed=budget)
    assert torch.equal(rand.sum(1), torch.full((200,), n * budget))
    sse_rand = curves.errors.gather(1, (rand - 1).T).sum(0)  # [200]
    assert o.sse <= float(sse_rand.min())
    assert o.sse_bound <= o.sse + 1e-9


def test_oracle_gives_more_k_to_rows_with_more_atoms(dictionary, curves):
    _, _, n_atoms = dictionary
    o = oracle_allocation(curves, 4)
    from adaptivek.stats import spearman

    assert float(spearman(o.k.double(), n_atoms.double())) > 0.5


@pytest.mark.parametrize("budget", [1, 3.5, 4.25, 6.1, K])
def test_oracle_spends_the_budget_exactly(curves, budget):
    n = len(curves.errors)
    o = oracle_allocation(curves, budget)
    assert int(o.k.sum()) == round(n * budget)
    assert abs(o.mean_k - budget) <= 1 / (2 * n)
    assert int(o.k.min()) >= 1 and int(o.k.max()) <= K


def test_oracle_is_monotone_in_budget(curves):
    budgets = torch.arange(1, K + 0.01, 0.25).tolist()
    sse = [oracle_allocation(curves, b).sse for b in budgets]
    assert all(b <= a + 1e-9 * sse[0] for a, b in zip(sse, sse[1:], strict=False))
    assert sse[-1] < sse[0]


def _toy(errors: torch.Tensor) -> ErrorCurves:
    return ErrorCurves(errors.double(), torch.arange(1, errors.shape[1] + 1), 100.0)


def _brute(errors: torch.Tensor, total: int) -> float:
    G = errors.shape[1]
    best = min(sum(float(errors[i, c]) for i, c in enumerate(cols))
               for cols in itertools.product(range(G), repeat=len(errors)) if sum(cols) + len(errors) == total)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_oracle_equals_brute_force_on_three_rows(seed):
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(3, 5, generator=g).sort(1, descending=True).values * 3  # [3, 5] decreasing gains
    errors = 20 - torch.cat([torch.zeros(3, 1), steps.cumsum(1)], 1)  # [3, 6] convex, decreasing
    curves = _toy(errors)
    for total in range(3, 19):
        o = oracle_allocation(curves, total / 3)
        assert int(o.k.sum()) == total
        assert o.sse == pytest.approx(_brute(curves.errors, total), abs=1e-9)
        assert o.sse_bound <= o.sse + 1e-9


def test_non_convex_toy_stays_between_bound_and_brute_force():
    g = torch.Generator().manual_seed(7)
    errors = 10 * torch.rand(3, 6, generator=g)  # any shape, even error rising with k
    curves = _toy(errors)
    for total in range(3, 19):
        o = oracle_allocation(curves, total / 3)
        brute = _brute(curves.errors, total)
        assert o.sse_bound <= brute + 1e-9 and brute <= o.sse + 1e-9


def test_sae_three_rows_match_brute_force(dictionary):
    sae, X, _ = dictionary
    curves = error_curves(sae, X[:3], 6)
    for total in (4, 9, 13):
        assert oracle_allocation(curves, total / 3).sse == pytest.approx(_brute(curves.errors, total), rel=1e-9)


# ----------------------------------------------------------------------------- allocations and curves
def test_rescale_allocation_keeps_order_and_budget():
    g = torch.Generator().manual_seed(1)
    k = torch.randint(3, 40, (101,), generator=g)
    for budget in (2.0, 5.5, 17.3, 30.0):
        out = rescale_allocation(k, budget, k_min=1, k_max=K * 4)
        assert int(out.sum()) == round(101 * budget)
        assert int(out.min()) >= 1 and int(out.max()) <= K * 4
        order = k.argsort()
        assert (out[order][1:] >= out[order][:-1] - (k[order][1:] == k[order][:-1]).long()).all()
        strictly = k[:, None] > k[None, :]
        assert (out[:, None] >= out[None, :])[strictly].all()


def test_uniform_allocation():
    k = uniform_allocation(10, 3.3, seed=0)
    assert int(k.sum()) == 33 and set(k.tolist()) == {3, 4}
    assert torch.equal(uniform_allocation(7, 5, seed=2), torch.full((7,), 5))


def test_allocation_curves_table(curves, dictionary):
    _, _, n_atoms = dictionary
    table = allocation_curves(curves, [2, 4.5], {"atoms": n_atoms, "shuffled": n_atoms[torch.randperm(len(n_atoms))]})
    assert set(table["method"]) == {"oracle", "uniform", "atoms", "shuffled"}
    for budget, part in table.groupby("budget"):
        by = part.set_index("method")
        assert by.loc["uniform", "delta_fve"] == 0
        assert (by["mean_k"] - budget).abs().max() <= 1 / len(n_atoms)
        assert by.loc["oracle", "fve"] >= by["fve"].max() - 1e-12
        assert by.loc["oracle", "fve_bound"] >= by.loc["oracle", "fve"] - 1e-12
        assert by.loc["atoms", "delta_fve"] > by.loc["shuffled", "delta_fve"]  # the true sparsity helps


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("ks, match", [
    (0, "K is the grid"),
    ([0, 2, 3], "leaves the dictionary"),
    ([1, 2, 25], "leaves the dictionary"),
    ([3, 2], "strictly increasing"),
    ([1.5, 2.0], "sequence of ints"),
], ids=["zero-K", "k-below-1", "k-above-d_sae", "not-increasing", "floats"])
def test_bad_grid(dictionary, ks, match):
    sae, X, _ = dictionary
    with pytest.raises(ValueError, match=match):
        error_curves(sae, X, ks)


@pytest.mark.parametrize("budget", [0.5, K + 0.5, float("nan")], ids=["below-grid", "above-grid", "nan"])
def test_budget_no_oracle_can_meet(curves, budget):
    with pytest.raises(ValueError, match="budget"):
        oracle_allocation(curves, budget)


@pytest.mark.parametrize("k_rows, match", [
    (torch.zeros(240, dtype=torch.long), r"\[1, d_sae=24\]"),
    (torch.full((240,), 25), r"\[1, d_sae=24\]"),
    (torch.ones(239, dtype=torch.long), "one k per row"),
    (torch.ones(240), "one k per row"),
], ids=["k-zero", "k-above-d_sae", "wrong-length", "float-k"])
def test_allocation_fve_bad_k(dictionary, k_rows, match):
    sae, X, _ = dictionary
    with pytest.raises(ValueError, match=match):
        allocation_fve(sae, X, k_rows)


def test_off_grid_allocation_and_non_topk_dictionary(dictionary):
    sae, X, _ = dictionary
    coarse = error_curves(sae, X, [2, 5, 9])
    with pytest.raises(ValueError, match="off the grid"):
        coarse.fve(torch.full((len(X),), 3))
    with pytest.raises(ValueError, match="every integer k"):
        allocation_curves(coarse, [4])
    with pytest.raises(TypeError, match="top-k dictionary"):
        error_curves(torch.nn.Linear(32, 32), X, 4)


@pytest.mark.parametrize("k_rows, budget, match", [
    (torch.tensor([0, 0, 5]), 8.0, "cannot be reached"),
    (torch.tensor([1.0, -1.0, 2.0]), 2.0, "non-negative"),
    (torch.tensor([1, 2, 3]), 50.0, "budget"),
], ids=["zeros-cap-the-mean", "negative-k", "budget-above-k_max"])
def test_rescale_bad_input(k_rows, budget, match):
    with pytest.raises(ValueError, match=match):
        rescale_allocation(k_rows, budget, k_min=1, k_max=10)
