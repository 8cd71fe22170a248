"""AdaptiveK vs TopK on equal terms: one data set, one set of formulas, held-out evaluation, paired CIs.

:func:`compare` is the whole comparison as a short sequence of named steps: train the TopK sweep,
AdaptiveK, the BatchTopK baseline and the ablations (:mod:`adaptivek.lineup`, one shared
:class:`TrainConfig`), evaluate every SAE on held-out vectors never used for training, compare each with
the TopK frontier at its mean L0 overall and per complexity bin with paired bootstrap intervals
(:mod:`adaptivek.frontier`), measure the downstream next-token loss with each SAE spliced into the model,
and write one results JSON atomically (:func:`load_results` reads it).

With document ids (``groups_train``, ``groups_test``) no document may be in both splits, AdaptiveK's
phase-1 probe is cross-validated by document, and its training k comes from out-of-fold predictions
(:func:`~adaptivek.lineup.fit_phase1_probe`); the ablations and BatchTopK follow those k values.

Activations are multiplied by ``scale = sqrt(d_in / mean‖x_train‖²)`` before training (SAELens'
convention), so MSE is in those units; FVE and cosine do not depend on it.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import checks, decision, frontier, lineup, oracle
from .evaluation import downstream_losses, evaluate, splice_intervals, splice_metrics
from .io import nan_for_null, write_json
from .lineup import Lineup, rank_match
from .stats import GroupCodes, group_codes, group_split, split_indices
from .training import TrainConfig

RESULTS_FORMAT = 1


@dataclass
class CompareConfig:
    """Settings of :func:`compare`; the defaults are the paper's sizes, TopK sweep and k ranges."""

    d_sae: int = 16384
    """Dictionary size shared by every SAE."""
    topk_ks: Sequence[int] = (20, 40, 80, 160, 320, 640)
    """The TopK sweep that draws the frontier (at least 2 values; kept sorted, without repeats)."""
    k_ranges: Sequence[tuple[int, int]] = ((20, 320), (20, 480), (20, 640))
    """AdaptiveK's ``(k_min, k_max)`` settings, one SAE each."""
    batchtopk: Literal["all", "first", "none"] = "all"
    """A BatchTopK at the mean training k of "all" AdaptiveK ranges, of the "first" one, or "none"."""
    ablation_range: tuple[int, int] | None = None
    """The k range whose k values the shuffled and length ablations reuse (None: ``k_ranges[0]``)."""
    steps: int | None = None
    """Training steps of every SAE, overriding ``train_cfg.steps`` (None: keep it)."""
    batch_size: int | None = None
    """Training batch size, overriding ``train_cfg.batch_size`` (None: keep it)."""
    train_cfg: TrainConfig | None = None
    """The :class:`TrainConfig` every SAE shares (None: its defaults); ``seed`` replaces its seed."""
    seed: int = 0
    """Seed of SAE initialisation, batch order, shuffles and bootstrap resamples."""
    scale: float | Literal["auto"] = "auto"
    """Activation scale factor, or "auto": ``sqrt(d_in / mean‖x_train‖²)`` (as chapter 4)."""
    n_boot: int = 1000
    """Bootstrap replicates of every interval."""
    n_bins: int = 3
    """Complexity bins (quantiles of ``y_test``) of the per-bin comparison."""
    interp: Literal["log", "linear"] = "log"
    """Interpolate the TopK frontier linearly in "log" L0 (the sweep is geometric in k) or in "linear" L0."""
    layer: int | None = None
    """With ``lm``: the block whose output the SAEs reconstruct, where the downstream loss splices."""
    max_length: int = 128
    """Tokens per text of the downstream loss (longer texts are truncated)."""
    n_ce: int = 200
    """The downstream loss runs on the first ``n_ce`` test texts."""
    ce_batch_size: int = 32
    """Texts per batch of the one-position downstream loss."""
    splice_batch_size: int = 8
    """Texts per batch of the every-position splice (texts of similar length share a batch; each batch holds
    a few [its tokens, vocab] float32 tensors, so a large vocabulary wants a smaller batch)."""
    eval_batch_size: int = 4096
    """Rows per batch of :func:`~adaptivek.evaluation.evaluate`."""
    device: str | torch.device | None = None
    """Where the SAEs train (None: "cpu")."""
    progress: bool = False
    """Show progress bars while training and splicing."""
    n_seeds: int = 3
    """Training seeds (``seed``, ``seed + 1``, ...) of AdaptiveK at ``ablation_range`` and of every SAE
    compared with it directly: TopK at its mean k, the ablations, BatchTopK, JumpReLU (the sweep and the
    other k ranges train under ``seed`` only)."""
    jumprelu: bool = True
    """Train a JumpReLU SAE (learned per-latent thresholds) landing at AdaptiveK's mean L0, every seed."""
    val_frac: float = 0.1
    """Share of the training documents (rows without ``groups_train``) no SAE trains on: BatchTopK's
    threshold is calibrated there and JumpReLU's L0 checked there. 0: calibrate on training vectors."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "n_boot", "n_bins", "max_length", "n_ce", "ce_batch_size", "splice_batch_size",
                     "eval_batch_size"):
            checks.positive_int(getattr(self, name), name)
        checks.positive_int(self.steps, "steps", allow_none=True)
        checks.positive_int(self.batch_size, "batch_size", allow_none=True)
        checks.non_negative_int(self.seed, "seed")
        checks.non_negative_int(self.layer, "layer", allow_none=True)
        checks.one_of(self.batchtopk, "batchtopk", ("all", "first", "none"))
        checks.one_of(self.interp, "interp", ("log", "linear"))
        checks.positive_int(self.n_seeds, "n_seeds")
        if not (isinstance(self.val_frac, (int, float)) and 0 <= self.val_frac < 0.5):
            raise ValueError(f"val_frac must be in [0, 0.5) (a share of the training documents), got {self.val_frac!r}")
        if self.scale != "auto" and not (isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool)
                                         and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be 'auto' or a finite number > 0, got {self.scale!r}")
        self.topk_ks = tuple(sorted({int(k) for k in self.topk_ks}))
        if len(self.topk_ks) < 2:
            raise ValueError(f"topk_ks needs at least 2 values to draw a frontier, got {list(self.topk_ks)}")
        self.k_ranges = tuple((int(a), int(b)) for a, b in self.k_ranges)
        if not self.k_ranges:
            raise ValueError("k_ranges is empty; give at least one (k_min, k_max)")
        for a, b in self.k_ranges:
            if not 1 <= a <= b <= self.d_sae:
                raise ValueError(f"k range ({a}, {b}) must satisfy 1 <= k_min <= k_max <= d_sae={self.d_sae}")
        if max(self.topk_ks) > self.d_sae:
            raise ValueError(f"TopK k={max(self.topk_ks)} exceeds d_sae={self.d_sae}")
        if self.ablation not in self.k_ranges:
            raise ValueError(f"ablation_range {self.ablation} must be one of k_ranges {list(self.k_ranges)}")

    @property
    def ablation(self) -> tuple[int, int]:
        """The ablations' k range: ``ablation_range``, or the first of ``k_ranges``."""
        return tuple(self.ablation_range) if self.ablation_range is not None else self.k_ranges[0]


@dataclass
class Comparison:
    """What :func:`compare` returns: the JSON ``results``, the trained ``saes`` and per-row test metrics."""

    results: dict[str, Any]
    saes: dict[str, Any]
    rows: pd.DataFrame  # one row per (sae, test row): sq_err, cosine, l2_ratio, l0, complexity, bin
    scale: float
    path: Path


def compare(X_train: Tensor, y_train: Any, X_test: Tensor, y_test: Any, *, out: str | Path,
            cfg: CompareConfig | None = None, texts_train: Sequence[str] | None = None,
            texts_test: Sequence[str] | None = None, lm: Any = None, log: Callable[..., Any] | None = print,
            groups_train: Any = None, groups_test: Any = None, lengths_train: Any = None, lengths_test: Any = None,
            ce_texts: Sequence[str] | None = None, ce_rows: Any = None, splice: Mapping[str, Any] | None = None
            ) -> Comparison:
    """Train and compare TopK, AdaptiveK, BatchTopK and the ablations; write ``out`` (JSON) atomically.

    ``X_train, y_train``: training vectors [n, d_in] (model units) and their complexity labels;
    ``X_test, y_test``: held-out vectors and labels, never used for training. ``out``: the results JSON,
    checked before any training and written once at the end (a failed run leaves no file).
    ``texts_train, texts_test``: the texts behind the rows (the length ablation and the downstream loss
    need them; without them those parts are skipped and the JSON says so). ``lm``: the model for the
    downstream loss, spliced at ``cfg.layer``. ``log``: a print-like function for progress (None: silent).
    ``groups_train, groups_test``: the document id of each row (strings or ints). With ``groups_train``,
    AdaptiveK's probe is cross-validated by document (grid extended while its edge wins) and its training k
    comes from out-of-fold predictions (``k_train_source`` in the JSON; without: "in_sample", the paper's
    way). With both, a document in both splits is an error; the JSON config counts the documents per split,
    and every bootstrap interval of the reconstruction resamples test documents, not rows.

    Token-level data (rows are tokens, several per text): NaN labels mark unlabelled rows, allowed with
    ``TrainConfig(unlabelled="reconstruct_only")`` in ``cfg.train_cfg`` (they train and test every SAE but
    never fit the probe, and sit in no complexity bin). Instead of per-row texts give ``lengths_train``,
    ``lengths_test`` (how much each row has read, e.g. its position + 1: the length ablation) and
    ``ce_texts`` with ``ce_rows`` (the test row spliced in each text: its second-to-last token), for the
    downstream loss; the ablations' k is tied to test rows, so they get a downstream loss only then.

    ``splice`` (with ``lm``): SAEBench's core downstream metrics instead of the one-position loss: every SAE
    compared with AdaptiveK directly (seed ``cfg.seed``) spliced at every kept position of held-out texts
    (:func:`~adaptivek.evaluation.splice_metrics`): ``{"texts": [...], "documents": [one id per text],
    "max_norm": the exclusion threshold in model units or None, "drop_first": 1}``; CE loss recovered against
    zero and mean ablation and KL to the clean model, with intervals over documents, in ``results["splice"]``.
    """
    t_start = time.perf_counter()
    out = _check_out(out)
    cfg = cfg if cfg is not None else CompareConfig()
    data = _inputs(texts_train, texts_test, lengths_train, lengths_test, ce_texts, ce_rows)
    if splice is not None and (lm is None or cfg.layer is None or not splice.get("texts")):
        raise ValueError("splice needs lm, cfg.layer and splice['texts'] (held-out texts) together")
    lu, cfg, mean_train = _prepare(X_train, y_train, X_test, y_test, cfg, data, lm if splice is None else None, log)
    lu.groups_train, lu.documents, groups_test = _check_groups(groups_train, groups_test, lu, lu.train.probe_folds)
    _hold_out_validation(lu, data, cfg)
    decide = _can_decide(groups_test, lu)  # before any training: a warning when it cannot
    lineup.train_topk_sweep(lu, cfg.topk_ks)
    lineup.train_adaptivek(lu, cfg.k_ranges)
    lineup.train_batchtopk(lu, lu.names["adaptivek"][: {"all": None, "first": 1, "none": 0}[cfg.batchtopk]])
    skipped = lineup.train_ablations(lu, _ablated(cfg), data["lengths_train"], data["lengths_test"])
    seeds = _train_direct(lu, cfg, data)
    ev, recon = _evaluate(lu, cfg, groups_test)
    ce = _downstream(lu, cfg, lm, data, mean_train, recon["bin_of"]) if lm is not None and splice is None else None
    results = {"format": RESULTS_FORMAT, "config": _config(lu, cfg), "probe": lu.probe, "skipped": skipped} | (
        frontier.results_json(lu.meta, ev, recon, ce, topk=lu.names["topk"], adaptivek=_ablated(cfg)))
    results["decision"] = _decide(seeds, ev, recon["rows"], cfg, groups_test) if decide is True else {"skipped": decide}
    if splice is not None and lm is not None:
        results["splice"] = _splice(lu, cfg, lm, splice, mean_train)
    results["seconds"] = time.perf_counter() - t_start
    write_json(out, results)
    lu.say(f"wrote {out} ({results['seconds']:.0f} s)")
    per_row = pd.concat([pd.DataFrame({"sae": name, "row": np.arange(len(lu.Xte))} | {m: r[m].numpy() for m in r}
                                      | {"complexity": lu.y_test.numpy(), "bin": recon["bin_of"].numpy()})
                         for name, r in recon["rows"].items()], ignore_index=True)
    return Comparison(results=results, saes=lu.saes, rows=per_row, scale=cfg.scale, path=out)


def _check_out(out: str | Path) -> Path:
    """The results path, refused before any training if it is a directory or its folder is not writable."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"out={str(out)!r} is a directory; give the path of the results JSON file")
    folder = next(p for p in out.absolute().parents if p.exists())  # the deepest existing folder
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: {folder} is not a writable folder")
    return out


def _check_xy(X: Tensor, y: Any, name: str, unlabelled: bool) -> tuple[Tensor, Tensor]:
    checks.matrix(X, f"X_{name}")
    y = torch.as_tensor(np.asarray(y, dtype=np.float64)).flatten()
    checks.same_length(y, X, f"y_{name}", f"X_{name}")
    if unlabelled:  # NaN marks an unlabelled row (TrainConfig.unlabelled="reconstruct_only")
        checks.finite_rows(y[~torch.isnan(y)], f"y_{name}", "only NaN may mark an unlabelled row")
    else:
        checks.finite_rows(y, f"y_{name}", "a failed label has no complexity: drop those rows before comparing "
                           "(or, for token rows that should train the SAEs but not the probe, "
                           "TrainConfig(unlabelled='reconstruct_only'))")
    checks.finite_rows(X, f"X_{name}", "drop those rows before comparing")
    return X.float(), y


def _check_groups(groups_train: Any, groups_test: Any, lu: Lineup, folds: int
                  ) -> tuple[GroupCodes | None, dict[str, int | None], Tensor | None]:
    """The training rows' document codes, the documents per split (None: no ids given) and the test rows'
    document codes, after checking one id per row, no document in both splits, and enough training
    documents for the grouped probe."""
    codes = {}
    for nm, groups, X in (("train", groups_train, lu.Xtr), ("test", groups_test, lu.Xte)):
        if groups is not None:
            codes[nm] = group_codes(groups, f"groups_{nm}")
            checks.same_length(codes[nm].codes, X, f"groups_{nm}", f"X_{nm}")
    if len(codes) == 2:
        shared = set(codes["train"].ids.tolist()) & set(codes["test"].ids.tolist())
        if shared:
            raise ValueError(f"groups_train and groups_test share {len(shared)} document(s), e.g. "
                             f"{sorted(shared, key=str)[:5]}: a document in both splits lets the test score "
                             f"near-copies of training rows; split by document (adaptivek.stats.group_split)")
    n_docs = len(codes["train"].ids) if "train" in codes else None
    if n_docs is not None and not 3 <= folds <= n_docs:
        raise ValueError(f"with groups_train, AdaptiveK's probe uses probe_folds={folds} document-grouped folds "
                         f"and its out-of-fold k needs 3 <= probe_folds <= the {n_docs} training document(s); "
                         f"set TrainConfig(probe_folds=...) in that range or give rows from more documents")
    test = torch.as_tensor(codes["test"].codes).long() if "test" in codes else None
    return (codes.get("train"), {f"n_documents_{nm}": len(codes[nm].ids) if nm in codes else None
                                 for nm in ("train", "test")}, test)


def _inputs(texts_train: Sequence[str] | None, texts_test: Sequence[str] | None, lengths_train: Any,
            lengths_test: Any, ce_texts: Sequence[str] | None, ce_rows: Any) -> dict[str, Any]:
    """What the length ablation and the downstream loss use: per-row lengths (given, or the texts' lengths in
    characters), the downstream texts and the test row spliced in each (given, or one text per test row)."""
    if (texts_train is not None or texts_test is not None) and (lengths_train is not None or ce_texts is not None):
        raise ValueError("give per-row texts (texts_train, texts_test) or token-level inputs (lengths_train, "
                         "lengths_test, ce_texts, ce_rows), not both")
    if (ce_texts is None) != (ce_rows is None):
        raise ValueError("ce_texts and ce_rows go together: the texts of the downstream loss and the test row "
                         "spliced in each")
    chars = [None if t is None else torch.tensor([len(x) for x in t], dtype=torch.float64)
             for t in (texts_train, texts_test)]
    lengths = [chars[i] if lens is None else torch.as_tensor(np.asarray(lens, dtype=np.float64))
               for i, lens in enumerate((lengths_train, lengths_test))]
    rows = None if ce_rows is None else torch.as_tensor(np.asarray(ce_rows)).long()
    if rows is not None and (rows.ndim != 1 or len(rows) != len(ce_texts)):
        raise ValueError(f"ce_rows must hold one test row per text of ce_texts ({len(ce_texts)}), got shape "
                         f"{tuple(rows.shape)}")
    return {"lengths_train": lengths[0], "lengths_test": lengths[1], "texts_train": texts_train,
            "texts_test": texts_test, "ce_texts": list(ce_texts) if ce_texts is not None else texts_test,
            "ce_rows": rows, "per_row_texts": ce_texts is None}


def _prepare(X_train: Tensor, y_train: Any, X_test: Tensor, y_test: Any, cfg: CompareConfig, data: dict[str, Any],
             lm: Any, log: Any) -> tuple[Lineup, CompareConfig, Tensor]:
    """Check the data and scale it: the lineup (with the training config every SAE shares), ``cfg`` with
    its numeric scale, and the mean training vector [d] in model units (the mean-ablation baseline)."""
    train = replace(cfg.train_cfg or TrainConfig(), seed=cfg.seed,
                    **({"steps": cfg.steps} if cfg.steps is not None else {}),
                    **({"batch_size": cfg.batch_size} if cfg.batch_size is not None else {}))
    unl = train.unlabelled == "reconstruct_only"
    (X_train, y_train), (X_test, y_test) = (_check_xy(X_train, y_train, "train", unl),
                                            _check_xy(X_test, y_test, "test", unl))
    checks.matrix(X_test, "X_test", d=X_train.shape[1])
    if len(X_test) < 2:
        raise ValueError("X_test needs at least 2 rows (FVE is undefined on one vector)")
    for nm, X in (("train", X_train), ("test", X_test)):
        for what in ("texts", "lengths"):
            if data[f"{what}_{nm}"] is not None:
                checks.same_length(data[f"{what}_{nm}"], X, f"{what}_{nm}", f"X_{nm}")
    if data["ce_rows"] is not None and len(data["ce_rows"]) and not 0 <= int(data["ce_rows"].min()) <= int(
            data["ce_rows"].max()) < len(X_test):
        raise ValueError(f"ce_rows must index rows of X_test (0..{len(X_test) - 1})")
    if lm is not None and (cfg.layer is None or data["ce_texts"] is None):
        raise ValueError("the downstream loss needs lm, cfg.layer and texts_test (or ce_texts) together")
    if cfg.scale == "auto":
        cfg = replace(cfg, scale=float((X_train.shape[1] / X_train.double().pow(2).sum(1).mean()).sqrt()))
    cfg, scale = replace(cfg, scale=float(cfg.scale)), float(cfg.scale)
    lu = Lineup(X_train * scale, X_test * scale, y_train, y_test, train, cfg.d_sae, cfg.seed,
                torch.device(cfg.device or "cpu"), cfg.progress, log or (lambda *_: None))
    return lu, cfg, X_train.mean(0)


def _hold_out_validation(lu: Lineup, data: dict[str, Any], cfg: CompareConfig) -> None:
    """Set ``cfg.val_frac`` of the training documents (rows, without ids) aside as ``lu.Xval``: no SAE trains
    on them. The lineup's training rows, labels and document codes and ``data``'s per-row entries are cut."""
    if not cfg.val_frac:
        return
    if lu.groups_train is not None:
        codes = torch.as_tensor(lu.groups_train.codes)
        keep, val = group_split(codes, (1 - cfg.val_frac, cfg.val_frac), seed=cfg.seed)
        lu.groups_train = group_codes(lu.groups_train.ids[codes[keep].numpy()], "groups_train")  # ids left
        lu.documents |= {"n_documents_train": len(lu.groups_train.ids),
                         "n_documents_val": int(codes[val].unique().numel())}
    else:
        val, keep = split_indices(len(lu.Xtr), test_frac=cfg.val_frac, seed=cfg.seed)
        keep, val = keep.sort().values, val.sort().values
    for key in ("lengths_train", "texts_train"):
        if data[key] is not None:
            data[key] = data[key][keep] if isinstance(data[key], Tensor) else [data[key][i] for i in keep.tolist()]
    lu.Xval, lu.Xtr, lu.y_train = lu.Xtr[val], lu.Xtr[keep], lu.y_train[keep]
    lu.documents["n_val"] = len(val)


def _train_direct(lu: Lineup, cfg: CompareConfig, data: dict[str, Any]) -> list[Lineup]:
    """TopK at AdaptiveK's mean k and JumpReLU under ``cfg.seed``, then AdaptiveK at ``ablation_range`` and
    every SAE compared with it directly under each further seed; returns one lineup per seed."""
    ada = _ablated(cfg)
    lineup.train_matched_topk(lu, ada)
    if cfg.jumprelu:
        lineup.train_jumprelu(lu, ada)
    seeds = [lu]
    for seed in range(cfg.seed + 1, cfg.seed + cfg.n_seeds):
        lu.say(f"seed {seed}")
        s = lineup.for_seed(lu, seed)
        lineup.train_adaptivek(s, [cfg.ablation])
        if cfg.batchtopk != "none":
            lineup.train_batchtopk(s, [ada], batch_rule=False)  # only its threshold is compared seed by seed
        lineup.train_ablations(s, ada, data["lengths_train"], data["lengths_test"])
        lineup.train_matched_topk(s, ada)
        if cfg.jumprelu:
            lineup.train_jumprelu(s, ada)
        seeds.append(s)
    return seeds


def _direct_names(lu: Lineup, cfg: CompareConfig) -> dict[str, str]:
    """The SAEs compared with AdaptiveK directly: label -> name (the same in every seed's lineup)."""
    btk = [n for n in lu.names.get("batchtopk", []) if lu.meta[n].get("matched_to") == _ablated(cfg)
           and lu.meta[n]["inference"] == "threshold"]
    return ({a: a for a in lu.names.get("ablation", [])} | ({"batchtopk": btk[0]} if btk else {})
            | ({"jumprelu": "jumprelu"} if "jumprelu" in lu.saes else {}))


def _decide(seeds: list[Lineup], ev0: dict[str, Any], rows0: dict[str, Any], cfg: CompareConfig,
            groups_test: Tensor | None) -> dict[str, Any]:
    """AdaptiveK against TopK at its budget and every direct competitor, over seeds and test documents
    (:mod:`adaptivek.decision`), their dead and dense latents per seed (``ev0``: seed ``cfg.seed``'s
    evaluations), and the precondition: does TopK's error follow predicted complexity?"""
    lu, ada = seeds[0], _ablated(cfg)
    others, matched = _direct_names(lu, cfg), lu.names["matched"]
    names = [ada, *matched, *others.values()]
    rows, fired = [{n: rows0[n] for n in names}], [{n: ev0[n]["firing_freq"] for n in names}]
    for s in seeds[1:]:
        ev = {n: evaluate(s.saes[n], s.Xte, batch_size=cfg.eval_batch_size, k=s.eval_k[n], per_row=True)
              for n in names}
        rows.append({n: {"sq_err": e["row_sq_err"], "cosine": e["row_cosine"], "l2_ratio": e["row_l2_ratio"],
                         "l0": e["l0"].double()} for n, e in ev.items()})
        fired.append({n: e["firing_freq"] for n, e in ev.items()})
    res = decision.analyse(rows, lu.Xte, groups_test, adaptivek=ada, matched=matched, others=others,
                           n_boot=cfg.n_boot, seed=cfg.seed)
    res["health"] = decision.latent_health({label: [f[n] for f in fired] for label, n in
                                            ({"adaptivek": ada} | others | {m: m for m in matched}).items()})
    pred = lu.probe_model.predict(lu.Xte).float()
    res["precondition"] = decision.precondition(rows0[matched[0]]["sq_err"], lu.Xte, pred, groups_test,
                                                n_boot=cfg.n_boot, seed=cfg.seed) | {"sae": matched[0]}
    res["oracle"] = _oracle(lu, ada, matched[0])
    res["seeds"] = [s.seed for s in seeds]
    res["meta"] = {n: {k: v for k, v in lu.meta[n].items() if isinstance(v, (int, float, str, list))}
                   for n in names}
    return res


def _oracle(lu: Lineup, ada: str, topk: str) -> dict[str, Any]:
    """With ``topk``'s dictionary: the best per-row allocation of k at budgets around AdaptiveK's mean k,
    AdaptiveK's allocation and a norm allocation (rescaled to each budget), as ΔFVE over the same k for all."""
    sae, m = lu.saes[ada], lu.meta[ada]["k_test_mean"]
    k_te = sae.k_from_complexity(sae.probe.predict(lu.Xte).float())  # AdaptiveK's k per held-out row
    K = int(min(lu.d_sae, max(int(k_te.max()), math.ceil(2 * m))))
    curves = oracle.error_curves(lu.saes[topk], lu.Xte, K)
    budgets = sorted({float(b) for b in (0.5 * m, 0.75 * m, m, 1.5 * m, 2 * m) if 1 <= b <= K})
    allocs = {"AdaptiveK's k": k_te, "norm k": rank_match(lu.Xte.norm(dim=1), k_te)}
    table = oracle.allocation_curves(curves, budgets, allocs, seed=lu.seed)
    at = table[(table["budget"] - m).abs() < 1e-6].set_index("method")["delta_fve"]
    return {"k": lu.meta[topk]["k"], "budget": m, "k_grid_max": K, "table": table.to_dict(orient="records"),
            "headroom": float(at["oracle"]), "probe": float(at["AdaptiveK's k"]), "norm": float(at["norm k"])}


def _splice(lu: Lineup, cfg: CompareConfig, lm: Any, splice: Mapping[str, Any], mean_train: Tensor
            ) -> dict[str, Any]:
    """CE loss recovered and KL at every kept position of held-out texts for AdaptiveK, the matched TopK
    nearest its budget, BatchTopK and JumpReLU (the ablations' k belongs to test rows, so they are not
    spliced; each spliced SAE costs the blocks after the layer over every token), with intervals that
    resample documents and paired differences to AdaptiveK."""
    t0, ada = time.perf_counter(), _ablated(cfg)
    matched = lu.names.get("matched", [])
    nearest = min(matched, key=lambda n: abs(lu.meta[n]["k"] - lu.meta[n]["target_k"]), default=None)
    names = [ada, *([nearest] if nearest else []), *[n for lbl, n in _direct_names(lu, cfg).items()
                                                     if lbl in ("batchtopk", "jumprelu")]]
    lu.say(f"splicing {len(names)} SAEs at every position of {len(splice['texts'])} held-out texts")
    res = splice_metrics(lm, {n: lu.saes[n] for n in names}, list(splice["texts"]), cfg.layer, scale=cfg.scale,
                         mean=mean_train, max_norm=splice.get("max_norm"), drop_first=splice.get("drop_first", 1),
                         max_length=cfg.max_length, batch_size=cfg.splice_batch_size, progress=cfg.progress)
    table = splice_intervals(res, list(splice["documents"]), reference=ada, n_boot=cfg.n_boot, seed=cfg.seed)
    keep = ("ce_sae", "delta_ce", "frac_recovered_zero", "frac_recovered_mean", "kl", "l0_mean")
    return {"n_tokens": res["n_tokens"], "n_texts": res["n_texts"], "counts": res["counts"],
            "ce_clean": res["ce_clean"], "ce_zero_ablate": res["ce_zero_ablate"],
            "ce_mean_ablate": res["ce_mean_ablate"], "adaptivek": ada,
            "saes": {n: {key: res["saes"][n][key] for key in keep} for n in names},
            "intervals": table.to_dict(orient="records"), "seconds": time.perf_counter() - t0,
            "not_run": {n: "k tied to test rows" for n in lu.names.get("ablation", [])}}


def _can_decide(groups_test: Tensor | None, lu: Lineup) -> bool | str:
    """True, or why the decisive comparison (intervals over held-out documents) is skipped, with a warning."""
    try:
        decision.check_documents(groups_test)
    except ValueError as e:
        warnings.warn(f"compare: the decisive comparison is skipped: {e}", UserWarning, stacklevel=3)
        lu.say(f"decisive comparison skipped: {e}")
        return str(e)
    return True


def _ablated(cfg: CompareConfig) -> str:
    """The AdaptiveK SAE whose k values the ablations reuse."""
    return "adaptivek_{}_{}".format(*cfg.ablation)


def _evaluate(lu: Lineup, cfg: CompareConfig, groups_test: Tensor | None
              ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every SAE on the held-out vectors; the distances from the TopK frontier, overall and per bin
    (bootstrap over test documents when their ids are given)."""
    lu.say("evaluating on held-out vectors")
    ev = {name: evaluate(sae, lu.Xte, batch_size=cfg.eval_batch_size, k=lu.eval_k[name], per_row=True)
          for name, sae in lu.saes.items()}
    rows = {name: {"sq_err": e["row_sq_err"], "cosine": e["row_cosine"], "l2_ratio": e["row_l2_ratio"],
                   "l0": e["l0"].double()} for name, e in ev.items()}
    recon = frontier.analyse_reconstruction(
        rows, lu.Xte, lu.y_test, topk=lu.names["topk"], points=lu.points, n_boot=cfg.n_boot, seed=cfg.seed,
        ablations=(_ablated(cfg), lu.names["ablation"]), n_bins=cfg.n_bins, log=cfg.interp == "log",
        groups=groups_test)
    return ev, recon | {"rows": rows}


def _downstream(lu: Lineup, cfg: CompareConfig, lm: Any, data: dict[str, Any], mean_train: Tensor,
                bin_of: Tensor) -> dict[str, Any]:
    """Next-token CE with each SAE spliced in, on the first ``n_ce`` downstream texts, with paired intervals.
    Per-row k (the ablations) follows the spliced test row; with token-level inputs only SAEs that set their
    own k (or a batch rule) run, since an ablation's k belongs to a test row, not to a new prefix."""
    texts, n = data["ce_texts"], min(cfg.n_ce, len(data["ce_texts"]))
    rows = data["ce_rows"][:n] if data["ce_rows"] is not None else torch.arange(n)
    t0 = time.perf_counter()
    saes = {nm: s for nm, s in lu.saes.items() if data["per_row_texts"] or lu.eval_k[nm] is None or nm in lu.ce_k}
    lu.say(f"downstream loss on {n} held-out texts ({len(saes)} SAEs)")
    ce = downstream_losses(lm, saes, list(texts[:n]), cfg.layer, max_length=cfg.max_length,
                           batch_size=cfg.ce_batch_size, scale=cfg.scale, mean=mean_train, progress=cfg.progress,
                           k={nm: kk[rows] for nm, kk in lu.eval_k.items() if kk is not None and nm in saes}
                           | {nm: f for nm, f in lu.ce_k.items() if nm in saes})
    ablations = [a for a in lu.names["ablation"] if a in saes]
    out = frontier.analyse_downstream(ce, lu.y_test[rows], bin_of[rows], topk=lu.names["topk"],
                                      points=[p for p in lu.points if p in saes],
                                      ablations=(_ablated(cfg), ablations), n_boot=cfg.n_boot,
                                      seed=cfg.seed + 1, n_bins=cfg.n_bins, log=cfg.interp == "log")
    out["block"]["seconds"] = time.perf_counter() - t0
    if len(saes) < len(lu.saes):
        out["block"]["not_run"] = {nm: "k tied to test rows (token-level inputs)" for nm in lu.saes if nm not in saes}
    return out


def _config(lu: Lineup, cfg: CompareConfig) -> dict[str, Any]:
    """The settings as the results JSON records them."""
    return {"d_in": lu.Xtr.shape[1], "d_sae": cfg.d_sae, "topk_ks": list(cfg.topk_ks),
            "k_ranges": [list(r) for r in cfg.k_ranges], "ablation_range": list(cfg.ablation), "seed": cfg.seed,
            "scale": cfg.scale, "n_train": len(lu.Xtr), "n_test": len(lu.Xte), "n_boot": cfg.n_boot,
            "n_bins": cfg.n_bins, "interp": cfg.interp, "layer": cfg.layer, "max_length": cfg.max_length,
            "train": asdict(lu.train), "device": str(lu.device),
            "n_unlabelled_train": int(lu.y_train.isnan().sum()), "n_unlabelled_test": int(lu.y_test.isnan().sum())
            } | lu.documents


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results JSON written by :func:`compare`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no comparison results at {path}; run adaptivek.compare(..., out={str(path)!r})")
    res = json.loads(path.read_text())
    if res.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} has results format {res.get('format')!r}; this adaptivek reads {RESULTS_FORMAT}")
    # write_json stores NaN as null (strict JSON): the numeric sections get their NaN back
    return {k: v if k in ("format", "config", "skipped") else nan_for_null(v) for k, v in res.items()}


__all__ = ["CompareConfig", "compare", "Comparison", "load_results", "rank_match", "RESULTS_FORMAT"]
