"""The SAEs of a comparison, trained on equal terms: one function per kind.

A :class:`Lineup` holds the (scaled) training and test vectors, the one :class:`TrainConfig` that every
SAE shares (same dictionary size, steps, batch order and initial weights) and every SAE trained so far,
with what :func:`~adaptivek.comparison.compare` reports about it. Each ``train_*`` function adds one
kind of SAE, so a new baseline is one more such function:

* :func:`train_topk_sweep`: TopK at several k, the frontier every other SAE is measured against;
* :func:`train_adaptivek`: AdaptiveK per ``(k_min, k_max)``, each from the same phase-1 probe
  (:func:`fit_phase1_probe`; with document ids its training k comes from out-of-fold predictions);
* :func:`train_batchtopk`: BatchTopK at AdaptiveK's mean k; it also varies the number of active latents
  per input, but learns how from the data instead of from a complexity probe;
* :func:`train_ablations`: TopK SAEs given AdaptiveK's k values per row without the complexity signal
  (shuffled across rows; rank-matched to text length, i.e. token position for token rows; rank-matched to
  the vector's norm). If AdaptiveK's gain comes from allocating k by complexity, it should beat all of them;
* :func:`train_matched_topk`: TopK at the two integers around AdaptiveK's mean k, compared with it seed by
  seed (interpolated exactly at its mean L0);
* :func:`train_jumprelu`: JumpReLU (learned per-latent thresholds) trained to land at AdaptiveK's mean L0;
* :func:`for_seed`: the same lineup for another training seed (same data, probe and k values), so that
  every directly compared SAE can be trained under several seeds.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .probe import RidgeProbe, out_of_fold_predict
from .sae import AdaptiveKSAE, BatchTopKSAE, TopKSAE
from .stats import GroupCodes, regression_metrics
from .training import TrainConfig, train_sae


@dataclass
class Lineup:
    """Training data, shared settings, and every SAE trained so far with its facts."""

    Xtr: Tensor  # [n_train, d] training vectors (scaled)
    Xte: Tensor  # [n_test, d] held-out vectors (scaled)
    y_train: Tensor  # [n_train] complexity labels
    y_test: Tensor  # [n_test]
    train: TrainConfig  # shared by every SAE
    d_sae: int
    seed: int  # SAE initialisation and the ablations' shuffles
    device: torch.device
    progress: bool = False
    say: Callable[..., Any] = lambda *_: None
    groups_train: GroupCodes | None = None  # the document of each training row (None: rows independent)
    documents: dict[str, int | None] = field(default_factory=dict)  # documents per split, as the JSON records
    saes: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # per SAE: what the results JSON reports
    eval_k: dict[str, Tensor | None] = field(default_factory=dict)  # per test row k (None: the SAE's own)
    ce_k: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)  # k as a function of a CE batch
    names: dict[str, list[str]] = field(default_factory=dict)  # kind -> SAE names, in training order
    probe: dict[str, Any] = field(default_factory=dict)  # the phase-1 probe's fit (AdaptiveK)
    pred_train: Tensor | None = None  # [n_train] the predictions AdaptiveK's training k comes from
    k_train: dict[str, Tensor] = field(default_factory=dict)  # per AdaptiveK SAE: its k per training row [n_train]
    probe_model: RidgeProbe | None = None  # the phase-1 probe every AdaptiveK SAE starts from
    Xval: Tensor | None = None  # [n_val, d] validation vectors (training documents no SAE trains on), scaled

    @property
    def points(self) -> list[str]:
        """The SAEs placed against the TopK frontier: AdaptiveK, BatchTopK and the ablations."""
        return [n for kind in ("adaptivek", "batchtopk", "ablation") for n in self.names.get(kind, [])]

    def add(self, name: str, sae: Any, y: Tensor | None = None, *, k_rows: Tensor | None = None, **info: Any) -> Any:
        """Train ``sae`` with the shared config (``k_rows``: a per-row k [n_train]), switch it to inference
        (``eval()``) and record it as ``name`` with ``info`` and its training time and last-batch FVE / L0."""
        t0 = time.perf_counter()
        sae, hist = train_sae(sae.to(self.device), self.Xtr, y, self.train, k=k_rows, progress=self.progress)
        sae.eval()
        self.saes[name], self.eval_k[name], last = sae, None, hist.iloc[-1]
        self.meta[name] = info | {"train_seconds": time.perf_counter() - t0,
                                  "train_fve_last_batch": float(last["fve"]), "train_l0_last_batch": float(last["l0"])}
        self.say(f"  trained {name:<24s} in {self.meta[name]['train_seconds']:5.1f} s  (last-batch FVE "
                 f"{last['fve']:.3f}, L0 {last['l0']:.1f})")
        return sae


def train_topk_sweep(lineup: Lineup, ks: Sequence[int]) -> list[str]:
    """One TopK SAE per k (``topk_K``): the frontier."""
    names = lineup.names.setdefault("topk", [])
    for k in ks:
        lineup.add(f"topk_{k}", TopKSAE(lineup.Xtr.shape[1], lineup.d_sae, k, seed=lineup.seed), kind="topk", k=k)
        names.append(f"topk_{k}")
    return names


def fit_phase1_probe(lineup: Lineup) -> RidgeProbe:
    """AdaptiveK's phase-1 probe; sets ``lineup.probe`` (its fit, as the JSON records it) and
    ``lineup.pred_train``, the predictions on the training vectors that AdaptiveK's training k comes from.

    Without document ids: the paper's fit (row k-fold CV over ``probe_lambdas``) and its in-sample
    predictions. With ``lineup.groups_train``: CV grouped by document on the grid CV prefers (extended
    while its edge wins), and out-of-fold predictions (each row predicted by a probe that never saw its
    document): in-sample predictions sit closer to the labels than anything the probe gives on new data,
    so AdaptiveK would train with a wider, more label-aligned k than it is tested with.
    """
    lu, tc, grouped = lineup, lineup.train, lineup.groups_train is not None
    lab, lab_te = ~lu.y_train.isnan(), ~lu.y_test.isnan()  # unlabelled token rows never fit or score the probe
    groups = lu.groups_train.codes[lab] if grouped else None
    probe = RidgeProbe.fit(lu.Xtr[lab], lu.y_train[lab], lambdas=tc.probe_lambdas, folds=tc.probe_folds,
                           seed=lu.seed, groups=groups, extend_grid=grouped)
    lu.probe = {"lambda": probe.lambda_, "lambda_at_edge": probe.lambda_at_edge,
                "grid_extensions": probe.grid_extensions, "k_train_source": "out_of_fold" if grouped else "in_sample",
                "train": probe.evaluate(lu.Xtr[lab], lu.y_train[lab]),  # in-sample
                "test": probe.evaluate(lu.Xte[lab_te], lu.y_test[lab_te]),
                "n_labelled_train": int(lab.sum()), "n_labelled_test": int(lab_te.sum())}
    lu.probe_model, lu.pred_train = probe, probe.predict(lu.Xtr).float()
    if grouped:
        lu.pred_train = out_of_fold_predict(lu.Xtr, lu.y_train, groups=lu.groups_train, folds=tc.probe_folds,
                                            lambdas=tc.probe_lambdas, seed=lu.seed, extend_grid=True,
                                            unlabelled="predict" if not bool(lab.all()) else "error").float()
        lu.probe["train_out_of_fold"] = regression_metrics(lu.pred_train[lab].double(), lu.y_train[lab])
    return probe


def train_adaptivek(lineup: Lineup, k_ranges: Sequence[tuple[int, int]]) -> list[str]:
    """AdaptiveK per ``(k_min, k_max)`` (``adaptivek_MIN_MAX``): one probe fit (phase 1,
    :func:`fit_phase1_probe`) starts every SAE, each trains its own copy; records the probe's fit and each
    SAE's k on the training and test vectors. With document ids, phase 2 trains with the k of the
    out-of-fold predictions (``train_sae(..., k=...)``); without, with the probe's own k (as the paper)."""
    lu = lineup
    probe = lu.probe_model if lu.probe_model is not None else fit_phase1_probe(lu)
    names = lu.names.setdefault("adaptivek", [])
    for lo, hi in k_ranges:
        sae = AdaptiveKSAE(lu.Xtr.shape[1], lu.d_sae, copy.deepcopy(probe), k_min=lo, k_max=hi, seed=lu.seed)
        name = f"adaptivek_{lo}_{hi}"
        k_tr = lu.k_train[name] = sae.k_from_complexity(lu.pred_train)
        sae = lu.add(name, sae, lu.y_train, k_rows=k_tr if lu.groups_train is not None else None, kind="adaptivek",
                     k_range=[lo, hi], k_train_source=lu.probe["k_train_source"],
                     k_train_mean=float(k_tr.float().mean()), k_train_min=int(k_tr.min()), k_train_max=int(k_tr.max()))
        k_te = sae.k_from_complexity(sae.probe.predict(lu.Xte).float())
        lab = ~lu.y_test.isnan()
        lu.meta[name] |= {"k_test_mean": float(k_te.float().mean()), "k_test_min": int(k_te.min()),
                          "k_test_max": int(k_te.max()),
                          "probe_test_after_training": sae.probe.evaluate(lu.Xte[lab], lu.y_test[lab])}
        names.append(name)
    return names


def train_batchtopk(lineup: Lineup, matched_to: Sequence[str], batch_rule: bool = True) -> list[str]:
    """BatchTopK at the mean training k of each AdaptiveK SAE in ``matched_to``, recorded twice: with its
    threshold (``batchtopk_K``; calibrated by ``freeze`` on the validation vectors, documents no SAE
    trained on, or on the training vectors without them) and, with ``batch_rule``, with its batch rule
    applied to the held-out set as one batch (``batchtopk_K_batch``: mean L0 = k exactly)."""
    names = lineup.names.setdefault("batchtopk", [])
    for ada in matched_to:
        k = max(1, round(lineup.meta[ada]["k_train_mean"]))
        name, batch = f"batchtopk_{k}", f"batchtopk_{k}_batch"
        if name in lineup.saes:
            continue
        sae = lineup.add(name, BatchTopKSAE(lineup.Xtr.shape[1], lineup.d_sae, k, seed=lineup.seed),
                         kind="batchtopk", k=k, matched_to=ada, inference="threshold")
        on = "validation" if lineup.Xval is not None else "training"
        sae.freeze(lineup.Xval if lineup.Xval is not None else lineup.Xtr, seed=lineup.seed)
        lineup.meta[name] |= {"threshold": float(sae.threshold), "threshold_ema": sae.threshold_ema,
                              "calibrated_on": on}
        names.append(name)
        if not batch_rule:
            continue
        lineup.saes[batch], lineup.meta[batch] = sae, lineup.meta[name] | {"inference": "batch rule"}
        lineup.eval_k[batch] = sae.batch_k(lineup.Xte).clamp(min=1)
        lineup.ce_k[batch] = lambda x, sae=sae: sae.batch_k(x).clamp(min=1)  # the rule per downstream batch
        names.append(batch)
    return names


def train_ablations(lineup: Lineup, adaptivek: str, lengths_train: Tensor | None = None,
                    lengths_test: Tensor | None = None) -> dict[str, str]:
    """TopK SAEs trained and evaluated with exactly ``adaptivek``'s k values per row, reassigned:
    ``shuffled_k`` at random, ``length_k`` by how much each row has read (``lengths_*`` [n]: a text's
    characters for last-token rows, a token's position + 1 for token rows; needs both), ``norm_k`` by the
    vector's norm ‖x‖ (largest norm, largest k). Returns the ablations skipped, with why."""
    ada = lineup.saes[adaptivek]
    k_tr = lineup.k_train[adaptivek]  # the k values AdaptiveK trained with (in-sample or out-of-fold)
    k_te = ada.k_from_complexity(ada.probe.predict(lineup.Xte).float())
    g = torch.Generator().manual_seed(lineup.seed)
    perm_tr, perm_te = torch.randperm(len(k_tr), generator=g), torch.randperm(len(k_te), generator=g)
    ablations = {"shuffled_k": (k_tr[perm_tr], k_te[perm_te], "AdaptiveK's k, randomly permuted across rows")}
    skipped = {}
    if lengths_train is not None and lengths_test is not None:
        ablations["length_k"] = (rank_match(lengths_train, k_tr), rank_match(lengths_test, k_te),
                                 "AdaptiveK's k values reassigned by the length of what each row has read "
                                 "(longest, largest)")
    else:
        skipped["length_k"] = "no texts or lengths given"
    ablations["norm_k"] = (rank_match(lineup.Xtr.norm(dim=1), k_tr), rank_match(lineup.Xte.norm(dim=1), k_te),
                           "AdaptiveK's k values reassigned by the vector's norm (largest norm, largest k)")
    names = lineup.names.setdefault("ablation", [])
    for name, (ktr, kte, what) in ablations.items():
        lineup.add(name, TopKSAE(lineup.Xtr.shape[1], lineup.d_sae, int(ktr.max()), seed=lineup.seed), k_rows=ktr,
                   kind="ablation", what=what, of=adaptivek)
        lineup.eval_k[name] = kte
        names.append(name)
    return skipped


def train_matched_topk(lineup: Lineup, adaptivek: str) -> list[str]:
    """TopK at ``floor`` and ``ceil`` of ``adaptivek``'s mean k on the held-out vectors (``matched_K``; one
    SAE when that mean is a whole number): a line between them gives TopK exactly at AdaptiveK's budget."""
    m = lineup.meta[adaptivek]["k_test_mean"]
    names = lineup.names.setdefault("matched", [])
    for k in sorted({max(1, math.floor(m)), min(lineup.d_sae, max(1, math.ceil(m)))}):
        name, same = f"matched_{k}", f"topk_{k}"
        if same in lineup.saes:  # the sweep trained this very SAE (same k, seed, data and settings): reuse it
            lineup.saes[name], lineup.eval_k[name] = lineup.saes[same], None
            lineup.meta[name] = lineup.meta[same] | {"kind": "matched", "matched_to": adaptivek, "target_k": m,
                                                     "same_as": same}
        else:
            lineup.add(name, TopKSAE(lineup.Xtr.shape[1], lineup.d_sae, k, seed=lineup.seed), kind="matched", k=k,
                       matched_to=adaptivek, target_k=m)
        names.append(name)
    return names


def train_jumprelu(lineup: Lineup, adaptivek: str) -> list[str]:
    """JumpReLU (per-latent learned thresholds, an L0 penalty whose weight is steered during training) at
    ``adaptivek``'s mean k on the held-out vectors as its target L0 (``jumprelu``); its L0 on the validation vectors (or
    the training vectors) is recorded next to the target."""
    from .sae import JumpReLUSAE

    target = lineup.meta[adaptivek]["k_test_mean"]
    sae = lineup.add("jumprelu", JumpReLUSAE(lineup.Xtr.shape[1], lineup.d_sae, target_l0=target, seed=lineup.seed),
                     kind="jumprelu", target_l0=target, matched_to=adaptivek)
    X = lineup.Xval if lineup.Xval is not None else lineup.Xtr
    with torch.no_grad():
        l0 = float(sae.encode(X[:4096].to(lineup.device)).gt(0).sum(1).float().mean())
    lineup.meta["jumprelu"] |= {"l0_check": l0, "l0_check_on": "validation" if lineup.Xval is not None else "training"}
    lineup.names.setdefault("jumprelu", []).append("jumprelu")
    return ["jumprelu"]


def for_seed(lineup: Lineup, seed: int) -> Lineup:
    """A lineup with the same data, probe, k values and settings whose SAEs will train under ``seed``
    (initial weights and batch order); no SAE trained yet."""
    from dataclasses import replace

    return replace(lineup, seed=seed, train=replace(lineup.train, seed=seed), saes={}, meta={}, eval_k={},
                   ce_k={}, names={})


def rank_match(values: Tensor, target: Tensor) -> Tensor:
    """``target``'s values reassigned so that their order follows ``values`` (largest value, largest k)."""
    out = torch.empty_like(target)
    out[torch.argsort(torch.as_tensor(values), stable=True)] = torch.sort(target, stable=True).values
    return out


__all__ = ["Lineup", "train_topk_sweep", "fit_phase1_probe", "train_adaptivek", "train_batchtopk", "train_ablations",
           "train_matched_topk", "train_jumprelu", "for_seed", "rank_match"]
