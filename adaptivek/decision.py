"""Does AdaptiveK beat TopK, and every other way of choosing k? Paired differences over seeds and documents.

:func:`~adaptivek.comparison.compare` trains AdaptiveK and the SAEs it is compared with directly (TopK at
the two integers around its mean k, the shuffled / position / norm ablations, BatchTopK, JumpReLU) under
several training seeds. This module turns their per-row held-out errors into differences with intervals:

* one **bootstrap replicate** draws held-out *documents* with replacement (tokens of one text are not
  independent) and, independently, *seeds* with replacement; a difference is averaged over the drawn seeds
  and weighted by the drawn documents, so its interval holds both sources of variation;
* the seed-to-seed spread is reported on its own (each seed's full-data difference);
* **power**: with standard error ``se`` (the replicates' sd), the smallest difference the run detects with
  80 % power at a two-sided 5 % level is about ``2.8 · se``;
* **TopK at AdaptiveK's budget**: TopK's metric is a line (in log L0) through the two matched SAEs, read at
  the other SAE's own mean L0 in every replicate.

Replicate 0 is always the full data (every document and seed once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .frontier import recon_stats, replicate_weights, summary, weighted_sst
from .stats import bootstrap_counts, group_bootstrap_metrics, pearson

MIN_DOCUMENTS = 20
"""Fewer held-out documents than this give no cluster-bootstrap interval worth reporting: an error."""
Z_POWER = 2.8
"""``z(0.975) + z(0.80)``: a true difference of ``Z_POWER · se`` is detected 80 % of the time at 5 % two-sided."""
METRICS = ("fve", "cosine", "mse")


def seed_weights(n_seeds: int, n_boot: int, seed: int) -> Tensor:
    """Seed counts ``[1 + n_boot, n_seeds]``: ones, then each replicate's draw of seeds with replacement."""
    return torch.cat([torch.ones(1, n_seeds, dtype=torch.float64), bootstrap_counts(n_seeds, n_boot, seed + 7)])


def seed_stats(rows: Sequence[Mapping[str, Mapping[str, Tensor]]], X: Tensor, W: Tensor
               ) -> list[dict[str, dict[str, Tensor]]]:
    """Per seed, per SAE: :func:`~adaptivek.frontier.recon_stats` [R] under the document weights ``W``."""
    sst = weighted_sst(W, X.double() - X.double().mean(0))  # [R], the same for every SAE and seed
    return [{name: recon_stats(W, r, sst=sst, d=X.shape[1]) for name, r in per_seed.items()} for per_seed in rows]


def topk_line(stats: Mapping[str, Mapping[str, Tensor]], matched: Sequence[str], l0: Tensor, metric: str) -> Tensor:
    """TopK's ``metric`` at mean L0 ``l0`` [R]: the line in log L0 through the matched SAEs (one: its value)."""
    if len(matched) == 1:
        return stats[matched[0]][metric]
    (a, b) = matched[0], matched[-1]
    xa, xb = stats[a]["l0"].log(), stats[b]["l0"].log()
    t = (l0.log() - xa) / (xb - xa)
    return stats[a][metric] + t * (stats[b][metric] - stats[a][metric])


def combine(per_seed: Sequence[Tensor], S: Tensor) -> Tensor:
    """Each replicate's seed-weighted mean of per-seed statistics ``[R]`` (``S [R, n_seeds]`` seed counts)."""
    stacked = torch.stack(list(per_seed), 1)  # [R, n_seeds]
    return (stacked * S).sum(1) / S.sum(1)


def difference(per_seed: Sequence[Tensor], S: Tensor) -> dict[str, Any]:
    """A difference over seeds and documents: estimate and 95 % interval, ``se``, the smallest detectable
    difference ``mde`` (80 % power), each seed's full-data value and their sd."""
    both = combine(per_seed, S)
    boot = both[1:][torch.isfinite(both[1:])]
    se = float(boot.std()) if boot.numel() > 1 else float("nan")
    seeds = [float(d[0]) for d in per_seed]
    spread = float(torch.tensor(seeds).std()) if len(seeds) > 1 else float("nan")
    return summary(both) | {"se": se, "mde": Z_POWER * se, "per_seed": seeds, "seed_sd": spread}


def verdict(d: Mapping[str, float], higher_better: bool = True) -> str:
    """"better", "worse" or "indistinguishable": where the interval of (AdaptiveK minus other) lies."""
    lo, hi = (d["lo"], d["hi"]) if higher_better else (-d["hi"], -d["lo"])
    return "better" if lo > 0 else "worse" if hi < 0 else "indistinguishable"


def check_documents(groups: Tensor | None) -> None:
    """Refuse fewer than :data:`MIN_DOCUMENTS` held-out documents (or none given), naming the fix."""
    n = int(torch.unique(groups).numel()) if groups is not None else 0
    if n < MIN_DOCUMENTS:
        raise ValueError(f"the decisive comparison resamples held-out documents and needs at least {MIN_DOCUMENTS}; "
                         f"got {n if groups is not None else 'no document ids'}: pass groups_test (each held-out row's "
                         f"document) and hold out more documents (a larger test split or more texts)")


def analyse(rows: Sequence[Mapping[str, Mapping[str, Tensor]]], X: Tensor, groups: Tensor | None, *,
            adaptivek: str, matched: Sequence[str], others: Mapping[str, str], n_boot: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    """AdaptiveK against TopK at its budget and against each of ``others`` (label -> SAE name), per metric.

    ``rows``: per seed, per SAE the per-row ``sq_err``, ``cosine``, ``l2_ratio``, ``l0`` [n] of the held-out
    vectors ``X [n, d]``; ``groups [n]``: each row's document code. Returns ``vs_topk`` (AdaptiveK, and
    every other SAE, minus TopK at its own L0), ``vs`` (AdaptiveK minus each other SAE), ``saes`` (mean
    over seeds of each SAE's metrics, with per-seed values) and the settings."""
    check_documents(groups)
    W = replicate_weights(len(X), n_boot, seed, groups)  # [R, n]
    S = seed_weights(len(rows), n_boot, seed)  # [R, n_seeds]
    st = seed_stats(rows, X, W)
    names = {"adaptivek": adaptivek} | dict(others)
    vs_topk = {label: {m: difference([s[n][m] - topk_line(s, matched, s[n]["l0"], m) for s in st], S) for m in METRICS}
               for label, n in names.items()}
    vs = {label: {m: difference([s[adaptivek][m] - s[n][m] for s in st], S) for m in METRICS + ("l0",)}
          for label, n in others.items()}
    everyone = names | {m: m for m in matched}
    saes = {label: {m: summary(combine([s[n][m] for s in st], S)) | {"per_seed": [float(s[n][m][0]) for s in st]}
                    for m in METRICS + ("l0",)} for label, n in everyone.items()}
    return {"vs_topk": vs_topk, "vs": vs, "saes": saes, "n_seeds": len(rows), "n_boot": n_boot,
            "n_documents": int(torch.unique(groups).numel()), "n_rows": len(X), "matched": list(matched),
            "names": names, "n_comparisons": len(vs_topk) + len(vs)}


def precondition(sq_err: Tensor, X: Tensor, pred: Tensor, groups: Tensor, *, n_boot: int = 1000, seed: int = 0
                 ) -> dict[str, float]:
    """Is a fixed-k SAE's error larger where predicted complexity is higher? Pearson r between each row's
    relative error ``‖x - x̂‖² / ‖x‖²`` and the probe's prediction, with a document-bootstrap interval."""
    rel = (sq_err / X.double().pow(2).sum(1)).double()
    ci = group_bootstrap_metrics(pred.double(), rel, groups=groups, n_boot=n_boot, seed=seed)["pearson"]  # per-group sums
    return {"estimate": float(pearson(rel, pred.double())), "lo": ci.lo, "hi": ci.hi, "n": len(rel)}


DENSE_THRESHOLD = 0.1
"""A latent firing on more than this share of held-out tokens counts as dense (as in :mod:`adaptivek.regime`)."""


def latent_health(firing: Mapping[str, Sequence[Tensor]], dense_threshold: float = DENSE_THRESHOLD
                  ) -> dict[str, dict[str, Any]]:
    """Dead (never fires on the held-out rows) and dense (fires on more than ``dense_threshold`` of them)
    fractions of each SAE's latents, per seed and averaged: ``firing`` maps a label to one firing-frequency
    vector [d_sae] per seed (``evaluate(...)["firing_freq"]``)."""
    out = {}
    for label, per_seed in firing.items():
        if not per_seed:
            raise ValueError(f"latent_health: no firing frequencies for {label!r} (one [d_sae] vector per seed)")
        dead = [float((f == 0).double().mean()) for f in per_seed]
        dense = [float((f > dense_threshold).double().mean()) for f in per_seed]
        out[label] = {"dead_frac": sum(dead) / len(dead), "dense_frac": sum(dense) / len(dense),
                      "dead_per_seed": dead, "dense_per_seed": dense, "dense_threshold": dense_threshold}
    return out


def family_error_rate(n_comparisons: int, alpha: float = 0.05) -> float:
    """Chance of at least one interval excluding 0 by luck among ``n_comparisons`` independent ones."""
    return 1 - (1 - alpha) ** n_comparisons


__all__ = ["analyse", "check_documents", "difference", "verdict", "precondition", "seed_weights", "topk_line", "combine",
           "family_error_rate", "MIN_DOCUMENTS", "Z_POWER"]
