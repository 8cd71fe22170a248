"""Does an SAE generalise? The checks to run before comparing SAEs with each other.

A comparison between two SAEs only means something when both learned features that carry over to new
data. This module measures that:

- :func:`generalisation_table`: FVE on training vectors vs held-out vectors (equally many of each, so
  the two numbers differ only by which vectors they are), next to PCA with as many components as the
  SAE's mean L0. An SAE that memorised its training set shows a large gap; one that learned nothing
  sparse loses to PCA at the same number of active directions.
- :func:`pca_fve`: held-out FVE of the top principal components of the training vectors.
- :func:`latent_health`: how often each latent fires on held-out vectors; dead (never) and dense
  (more than ``dense_threshold`` of the rows) fractions.
- :class:`HeldOutCurve`: a ``train_sae`` callback that records held-out FVE every few steps (does it
  plateau, or still climb when training stops?).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .checks import finite_number, matrix, positive_int
from .evaluation import evaluate


def pca_fve(X_train: Tensor, X_test: Tensor, n_components: Sequence[int]) -> dict[int, float]:
    """Held-out FVE of reconstructing ``X_test`` from the top principal components of ``X_train``.

    Components and the centring mean come from the training vectors only (float64 covariance, one
    eigendecomposition for every size); FVE = 1 - Σ‖x - x̂‖² / Σ‖x - mean(X_test)‖², the definition
    :func:`~adaptivek.evaluation.evaluate` uses for SAEs.
    """
    d = matrix(X_train, "X_train").shape[1]
    matrix(X_test, "X_test", d=d)
    sizes = [positive_int(int(k), "n_components") for k in n_components]
    if sizes and max(sizes) > d:
        raise ValueError(f"n_components must be at most d={d}, got {max(sizes)}")
    mean = X_train.double().mean(0)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for block in X_train.split(65_536):  # [b, d] float64 a block at a time
        xc = block.double() - mean
        cov += xc.T @ xc
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    vecs = vecs.flip(1)  # [d, d] descending
    xt = X_test.double() - mean  # [n, d]
    sst = (X_test.double() - X_test.double().mean(0)).pow(2).sum()
    proj = xt @ vecs  # [n, d] coordinates in the principal basis
    total = xt.pow(2).sum()
    captured = proj.pow(2).sum(0).cumsum(0)  # [d] Σ‖x̂‖² of the first j+1 components
    return {k: float(1 - (total - captured[k - 1]) / sst) for k in sizes}


def _sample(n: int, size: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:size]


def generalisation_table(saes: Mapping[str, Any], X_train: Tensor, X_test: Tensor, *, n: int | None = 20_000,
                         seed: int = 0, k: Mapping[str, Any] | None = None, batch_size: int = 4096) -> pd.DataFrame:
    """Per SAE: held-out mean L0, FVE on ``n`` training and ``n`` held-out vectors, their gap, and PCA's
    held-out FVE with ``round(L0)`` components.

    ``n``: vectors drawn (without replacement, seeded) from each split; None or more than the smaller
    split: the size of the smaller split. ``k``: optional per-SAE k for :func:`evaluate` (a callable of
    the batch, or an int).
    """
    n = min(len(X_train), len(X_test), n or len(X_test))
    tr, te = X_train[_sample(len(X_train), n, seed)], X_test[_sample(len(X_test), n, seed + 1)]
    rows = []
    for name, sae in saes.items():
        kk = (k or {}).get(name)
        on_test, on_train = (evaluate(sae, x, k=kk, batch_size=batch_size) for x in (te, tr))
        rows.append({"sae": name, "l0": on_test["l0_mean"], "train_fve": on_train["fve"], "test_fve": on_test["fve"],
                     "gap": on_train["fve"] - on_test["fve"], "n": n})
    table = pd.DataFrame(rows)
    pcs = pca_fve(X_train, te, sorted({max(1, round(v)) for v in table["l0"]}))
    table["pca_fve"] = [pcs[max(1, round(v))] for v in table["l0"]]
    table["sae_minus_pca"] = table["test_fve"] - table["pca_fve"]
    return table.set_index("sae")


def latent_health(sae: Any, X: Tensor, *, dense_threshold: float = 0.1, k: Any = None,
                  batch_size: int = 4096) -> dict[str, Any]:
    """Firing frequency of every latent on ``X`` (held-out vectors), and the dead and dense fractions.

    Dead: never fires on ``X``. Dense: fires on more than ``dense_threshold`` of the rows (a latent
    that fires on most inputs is closer to a bias than a feature).
    """
    finite_number(dense_threshold, "dense_threshold", low=0, high=1, low_open=True)
    ev = evaluate(sae, X, k=k, batch_size=batch_size)
    freq = ev["firing_freq"]
    return {"firing_freq": freq, "dead_frac": float((freq == 0).double().mean()),
            "dense_frac": float((freq > dense_threshold).double().mean()), "n": ev["n"],
            "dense_threshold": dense_threshold}


class HeldOutCurve:
    """``train_sae(..., callback=HeldOutCurve(sae, X_heldout, every=50, last=steps))``: held-out FVE every
    ``every`` steps and at step ``last`` (the run's final step, so a run shorter than ``every`` has a point).

    The SAE is switched to inference mode for each measurement (BatchTopK learns its threshold only in
    training mode) and back. ``frame`` holds the rows ``step, heldout_fve, heldout_l0``.
    """

    def __init__(self, sae: Any, X: Tensor, *, every: int = 50, last: int | None = None,
                 batch_size: int = 4096) -> None:
        matrix(X, "X")
        self.sae, self.X, self.every, self.batch_size = sae, X, positive_int(every, "every"), batch_size
        self.last = positive_int(last, "last", allow_none=True)
        self.rows: list[dict[str, float]] = []

    def __call__(self, step: int, row: Mapping[str, Any]) -> None:
        if step % self.every and step != self.last:
            return
        was_training = self.sae.training
        self.sae.eval()
        try:
            with torch.no_grad():
                ev = evaluate(self.sae, self.X, batch_size=self.batch_size)
        finally:
            self.sae.train(was_training)
        self.rows.append({"step": step, "heldout_fve": ev["fve"], "heldout_l0": ev["l0_mean"]})

    @property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["step", "heldout_fve", "heldout_l0"])


__all__ = ["pca_fve", "generalisation_table", "latent_health", "HeldOutCurve"]
