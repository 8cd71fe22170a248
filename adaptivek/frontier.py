"""SAEs against the TopK frontier at matched mean L0, with paired bootstrap intervals.

:func:`~adaptivek.comparison.compare` evaluates every SAE on the same held-out rows; this module turns
those per-row numbers into its statistics. A bootstrap replicate is a vector of row counts ``w [n]``
(:func:`~adaptivek.stats.bootstrap_counts`; replicate 0 is a row of ones, the full data), so every
statistic is a matrix product with no Python loop over replicates, and the **same replicates for every
SAE** make their differences paired: the TopK frontier's own noise is part of each interval.

Statistics are held as ``stats[sae][metric] -> [R]`` tensors (index 0 = full data, 1: = replicates).
The frontier at a point's mean L0 is interpolated linearly in log L0 by default (``log=True``): the
sweep is geometric in k, and interpolating a concave curve linearly in L0 would understate TopK between
sweep points and so flatter the point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .stats import bootstrap_counts, interpolate, pareto_mask, percentile_summary

Stats = Mapping[str, Mapping[str, Tensor]]  # sae name -> metric -> [R] (index 0 = the full data)
Rows = Mapping[str, Mapping[str, Tensor]]  # sae name -> per-row quantity -> [n] float64
RECON = ["fve", "cosine", "mse"]  # reconstruction metrics compared with the frontier
CE = ["ce", "frac_recovered"]  # downstream-loss metrics compared with the frontier
HIGHER_BETTER = {"fve": True, "cosine": True, "mse": False, "ce": False, "frac_recovered": True}


def replicate_weights(n: int, n_boot: int, seed: int, groups: Tensor | None = None) -> Tensor:
    """Row weights ``[1 + n_boot, n]`` float64: the full data (ones), then ``n_boot`` bootstrap resamples.

    ``groups`` [n] (int64 codes ``0..G-1``, e.g. each token's document): resample whole groups, every row
    weighted by how often its group was drawn. Tokens of one text are not independent, so a row bootstrap
    would give intervals that are too narrow."""
    if groups is None:
        return torch.cat([torch.ones(1, n, dtype=torch.float64), bootstrap_counts(n, n_boot, seed)])
    groups = torch.as_tensor(groups).long()
    if groups.shape != (n,):
        raise ValueError(f"groups must hold one code per row ({n}), got shape {tuple(groups.shape)}")
    counts = bootstrap_counts(int(groups.max()) + 1, n_boot, seed)  # [n_boot, G]
    return torch.cat([torch.ones(1, n, dtype=torch.float64), counts[:, groups]])


def weighted_sst(W: Tensor, Xc: Tensor) -> Tensor:
    """``Σ w_i‖x_i - m_w‖²`` [R] under each row weighting of ``W [R, n]``, each with its own weighted mean
    ``m_w``: ``Σ w_i‖x_i - m‖² - ‖Σ w_i (x_i - m)‖² / Σ w_i`` from ``Xc [n, d]`` (the vectors minus their mean).
    It does not depend on the SAE: compute it once per set of rows and pass it to :func:`recon_stats`."""
    return W @ Xc.pow(2).sum(1) - (W @ Xc).pow(2).sum(1) / W.sum(1)


def recon_stats(W: Tensor, rows: Mapping[str, Tensor], Xc: Tensor | None = None, *, sst: Tensor | None = None,
                d: int | None = None) -> dict[str, Tensor]:
    """``fve``, ``mse``, ``cosine``, ``l2_ratio``, ``l0`` [R] of one SAE under each row weighting of ``W [R, n]``.

    ``rows``: :func:`~adaptivek.evaluation.evaluate`'s per-row ``sq_err``, ``cosine``, ``l2_ratio`` and
    ``l0`` (float64 [n]); ``Xc [n, d]``: the evaluation vectors minus their mean, or instead ``sst`` (its
    :func:`weighted_sst`, shared by every SAE on the same rows) and ``d``. FVE uses each replicate's own mean.
    """
    if sst is None:
        if Xc is None:
            raise ValueError("recon_stats needs Xc (the vectors minus their mean) or sst= with d=")
        sst, d = weighted_sst(W, Xc), Xc.shape[1]
    elif d is None:
        raise ValueError("recon_stats: with sst= pass d= (the vectors' width, for the per-element MSE)")
    sse = W @ rows["sq_err"]
    tot = W.sum(1)
    return {"fve": 1 - sse / sst, "mse": sse / (tot * d), "cosine": W @ rows["cosine"] / tot,
            "l2_ratio": W @ rows["l2_ratio"] / tot, "l0": W @ rows["l0"] / tot}


def ce_stats(W: Tensor, rows: Mapping[str, Tensor], clean: Tensor, ablate: Tensor) -> dict[str, Tensor]:
    """``ce``, ``frac_recovered``, ``l0`` [R] of one SAE's downstream loss under each weighting ``W [R, n]``
    (``rows``: its per-text ``ce`` and ``l0``; ``clean``, ``ablate`` [n]: the baselines' per-text losses)."""
    tot = W.sum(1)
    ce, c, a = W @ rows["ce"] / tot, W @ clean / tot, W @ ablate / tot
    return {"ce": ce, "frac_recovered": (a - ce) / (a - c), "l0": W @ rows["l0"] / tot}


def summary(stat: Tensor) -> dict[str, float]:
    """``{"estimate", "lo", "hi"}`` of a statistic [R]: its full-data value and 95 % percentile interval."""
    return percentile_summary(stat[:1], stat[1:])


def vs_frontier(stats: Stats, topk: Sequence[str], name: str, metric: str, *, log: bool = True,
                l0_key: str = "l0") -> dict[str, float]:
    """``name``'s ``metric`` minus the TopK frontier's at ``name``'s mean L0, per replicate, summarised.

    ``topk``: the sweep's SAE names (any order). Returns :func:`summary`'s keys for the difference, plus
    the full-data ``frontier``, ``value`` and ``l0``; NaN where the L0 lies outside the sweep.
    """
    xp = torch.stack([stats[t][l0_key] for t in topk], 1)  # [R, m]
    fp = torch.stack([stats[t][metric] for t in topk], 1)
    order = xp[:1].argsort(1).expand_as(xp)  # sort the sweep by its full-data L0
    xp, fp = xp.gather(1, order), fp.gather(1, order)
    front = interpolate(stats[name][l0_key], xp, fp, log=log)
    out = summary(stats[name][metric] - front)
    return out | {"frontier": float(front[0]), "value": float(stats[name][metric][0]),
                  "l0": float(stats[name][l0_key][0])}


def complexity_bins(y: Tensor, n_bins: int) -> tuple[list[float], Tensor]:
    """Quantile bin edges of the labels ``y [n]`` (``n_bins + 1`` values) and each row's bin [n] (int64);
    an unlabelled row (NaN) is in bin -1, in no bin's statistics, and the edges come from the labelled rows."""
    lab = ~torch.isnan(y)
    edges = torch.quantile(y[lab].double(), torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)).tolist()
    bin_of = torch.bucketize(y.double(), torch.tensor(edges[1:-1], dtype=torch.float64), right=True)
    return edges, torch.where(lab, bin_of, -1)


def bin_entry(b: int, sel: Tensor, *, rows: Mapping[str, Mapping[str, Tensor]], stats: Stats, W: Tensor,
              X: Tensor, y: Tensor, edges: Sequence[float], topk: Sequence[str], points: Sequence[str],
              log: bool = True) -> dict[str, Any]:
    """One complexity bin (rows ``sel [n]`` bool): every SAE's metrics there, and each point's distance
    from the TopK frontier in the bin, at the point's overall mean L0 (``vs_topk_same_budget``: the same
    budget, does the allocation help this bin?) and at its mean L0 within the bin (``vs_topk_bin_l0``:
    is the allocation efficient?). ``stats``: the overall statistics (for the overall L0)."""
    n = int(sel.sum())
    if n < 2:
        return {"bin": b, "n": n, "skipped": "fewer than 2 rows"}
    Wb, Xb = W[:, sel], X.double()[sel]
    sst = weighted_sst(Wb, Xb - Xb.mean(0))  # [R], shared by every SAE in the bin
    sb = {name: recon_stats(Wb, {k: v[sel] for k, v in r.items()}, sst=sst, d=Xb.shape[1])
          for name, r in rows.items()}
    glob = {name: s | {"l0_global": stats[name]["l0"]} for name, s in sb.items()}
    return {"bin": b, "n": n, "label_range": [edges[b], edges[b + 1]], "label_mean": float(y[sel].mean()),
            "saes": {name: {m: float(s[m][0]) for m in ("fve", "mse", "cosine", "l0")} for name, s in sb.items()},
            "vs_topk_same_budget": {p: {m: vs_frontier(glob, topk, p, m, log=log, l0_key="l0_global")
                                        for m in ("mse", "cosine")} for p in points},
            "vs_topk_bin_l0": {p: {m: vs_frontier(sb, topk, p, m, log=log) for m in ("fve", "mse", "cosine")}
                               for p in points}}


def analyse_reconstruction(rows: Rows, X: Tensor, y: Tensor, *, topk: Sequence[str], points: Sequence[str],
                           ablations: tuple[str, Sequence[str]], n_boot: int, seed: int, n_bins: int,
                           log: bool = True, groups: Tensor | None = None) -> dict[str, Any]:
    """Every statistic of the held-out reconstructions, from :func:`~adaptivek.evaluation.evaluate`'s rows.

    ``rows``: per SAE ``sq_err``, ``cosine``, ``l2_ratio``, ``l0`` [n]; ``X [n, d]``, ``y [n]``: the
    vectors and labels; ``topk``: the sweep's names; ``points``: the SAEs placed against it;
    ``ablations``: ``(adaptivek, [ablation names])``, compared directly (same k values, paired rows).
    Returns ``stats``, ``vs_topk`` (point -> metric -> :func:`vs_frontier`), ``minus`` (ablation ->
    metric -> :func:`summary` of AdaptiveK minus it), ``by_complexity`` (``edges`` and one
    :func:`bin_entry` per bin) and ``bin_of`` (each row's bin [n]; -1: unlabelled). ``groups``: each row's
    document code, to resample documents instead of rows (:func:`replicate_weights`).
    """
    W = replicate_weights(len(X), n_boot, seed, groups)
    sst = weighted_sst(W, X.double() - X.double().mean(0))  # [R], shared by every SAE
    stats = {name: recon_stats(W, r, sst=sst, d=X.shape[1]) for name, r in rows.items()}
    ada, abl = ablations
    edges, bin_of = complexity_bins(y, n_bins)
    ctx = {"rows": rows, "stats": stats, "W": W, "X": X, "y": y, "edges": edges, "topk": topk, "points": points}
    return {"stats": stats, "bin_of": bin_of,
            "vs_topk": {p: {m: vs_frontier(stats, topk, p, m, log=log) for m in RECON} for p in points},
            "minus": {a: {m: summary(stats[ada][m] - stats[a][m]) for m in [*RECON, "l0"]} for a in abl},
            "by_complexity": {"edges": edges, "bins": [bin_entry(b, bin_of == b, **ctx, log=log)
                                                       for b in range(n_bins)]}}


def analyse_downstream(ce: Mapping[str, Any], y: Tensor, bin_of: Tensor, *, topk: Sequence[str],
                       points: Sequence[str], ablations: tuple[str, Sequence[str]], n_boot: int, seed: int,
                       n_bins: int, log: bool = True) -> dict[str, Any]:
    """The statistics of :func:`~adaptivek.evaluation.downstream_losses`' result ``ce`` on texts with labels
    ``y`` and complexity bins ``bin_of`` [n], as :func:`analyse_reconstruction` (``vs_topk``, ``minus``),
    plus per SAE its losses with intervals (``saes``) and the results JSON's ``downstream`` block (``block``)."""
    rows = {name: {"ce": s["rows"], "l0": s["l0"].double()} for name, s in ce["saes"].items()}
    W = replicate_weights(ce["n"], n_boot, seed)
    stats = {name: ce_stats(W, r, ce["rows_clean"], ce["rows_ablate"]) for name, r in rows.items()}
    ada, abl = ablations
    by_bin = [{"bin": b, "n": int((bin_of == b).sum()), "ce_clean": float(ce["rows_clean"][bin_of == b].mean()),
               "saes": {nm: float(r["ce"][bin_of == b].mean()) for nm, r in rows.items()}}
              for b in range(n_bins) if int((bin_of == b).sum()) > 0]
    block = {"n": ce["n"], "ce_clean": ce["ce_clean"], "ce_ablate": ce["ce_ablate"], "by_bin": by_bin,
             "mean_ablation": "mean training activation (model units)", "label_mean": float(y.nanmean()),
             "position": "splice at the second-to-last real token, score the last real token"}
    saes = {name: {m: s[m] for m in ("ce_sae", "delta_ce", "frac_recovered", "l0_mean")}
            | {"ci": {m: summary(stats[name][m]) for m in CE}} for name, s in ce["saes"].items()}
    return {"block": block, "saes": saes,
            "vs_topk": {p: {m: vs_frontier(stats, topk, p, m, log=log) for m in CE} for p in points},
            "minus": {a: {m: summary(stats[ada][m] - stats[a][m]) for m in CE} for a in abl}}


def frontier_curve(names: Sequence[str], l0: Sequence[float], values: Sequence[float], metric: str
                   ) -> dict[str, Any]:
    """The TopK sweep as one curve of the results JSON: names, mean L0s, values and which are Pareto-optimal."""
    hb = HIGHER_BETTER[metric]
    return {"names": list(names), "l0": list(l0), "value": list(values), "pareto": pareto_mask(l0, values, hb),
            "higher_better": hb}


def results_json(meta: Mapping[str, dict[str, Any]], ev: Mapping[str, Mapping[str, Any]],
                 recon: Mapping[str, Any], downstream: Mapping[str, Any] | None, *, topk: Sequence[str],
                 adaptivek: str) -> dict[str, Any]:
    """The statistical part of :func:`~adaptivek.comparison.compare`'s results JSON.

    ``meta``: per SAE what compare records about its training; ``ev``: per SAE
    :func:`~adaptivek.evaluation.evaluate`'s result; ``recon``, ``downstream``: :func:`analyse_reconstruction`'s
    and :func:`analyse_downstream`'s results (None: no downstream loss); ``adaptivek``: the SAE the ablations
    are compared with. Keys: ``saes``, ``frontier``, ``vs_topk``, ``ablations``, ``by_complexity``,
    ``downstream``, ``higher_better``.
    """
    ce, stats = downstream or {}, recon["stats"]
    q = torch.tensor([0, 0.1, 0.5, 0.9, 1], dtype=torch.float64)
    saes = {name: meta[name] | ({"ce": ce["saes"][name]} if ce and name in ce["saes"] else {}) | {
        "metrics": {m: e[m] for m in ("mse", "fve", "cosine", "l2_ratio", "l0_mean", "l0_std", "dead_frac",
                                      "ever_fired_frac", "n")},
        "ci": {m: summary(stats[name][m]) for m in ("fve", "cosine", "mse", "l0")},
        "l0_quantiles": torch.quantile(e["l0"].double(), q).tolist()} for name, e in ev.items()}
    curves = {m: frontier_curve(topk, [ev[t]["l0_mean"] for t in topk], [ev[t][m] for t in topk], m) for m in RECON}
    if ce:
        tce = [ce["saes"][t] for t in topk]
        curves |= {m: frontier_curve(topk, [c["l0_mean"] for c in tce], [c["ce_sae" if m == "ce" else m] for c in tce],
                                     m) for m in CE}
    return {"saes": saes, "frontier": curves, "by_complexity": recon["by_complexity"], "higher_better": HIGHER_BETTER,
            "vs_topk": {p: v | ce.get("vs_topk", {}).get(p, {}) for p, v in recon["vs_topk"].items()},
            "ablations": {"adaptivek": adaptivek,
                          "minus": {a: v | ce.get("minus", {}).get(a, {}) for a, v in recon["minus"].items()}},
            "downstream": ce.get("block", {"skipped": "no language model given"})}


__all__ = ["HIGHER_BETTER", "replicate_weights", "weighted_sst", "recon_stats", "ce_stats", "summary", "vs_frontier",
           "complexity_bins", "bin_entry", "analyse_reconstruction", "analyse_downstream", "frontier_curve",
           "results_json"]
