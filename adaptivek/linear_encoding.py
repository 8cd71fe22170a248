"""Is complexity linearly encoded? Layer sweep, controls and OneStopEnglish transfer.

Everything here scores predictions on one held-out test split, drawn once from ``seed``, so every row of a sweep or a controls table is computed on the same
texts, and the bootstrap (also seeded) resamples the same test rows for every row: the CIs are
paired and :func:`controls_table` can report the CI of the *difference* to the probe. With ``groups``
(the source document of each row) the split is by document (:func:`~adaptivek.stats.group_split`: no
document on both sides) and so are the probes' cross-validation folds; without, by row
(:func:`~adaptivek.stats.split_indices`). ``extend_grid`` widens the λ grid while CV picks its edge.

The controls ask what else could explain a good probe:
* shuffled labels (the probe's capacity to fit noise). Read its R² and RMSE: its *Pearson* need
  not be near 0. A probe fitted to permuted labels is shrunk almost to a constant, but what is
  left of it tends to point along the highest-variance directions of X, and if those carry
  complexity the near-constant predictions still correlate with it, with a random sign (see
  :func:`permutation_null` for the spread over many permutations),
* text length only (n tokens, n words, n chars): complexity ratings often track length,
* the embedding layer at the last token (the identity of the last token alone),
* the mean of the input embeddings (a bag of words, no context processing),
* a small MLP on the same activations (how much a nonlinear reader adds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from .checks import finite_rows, int_at_least, real_tensor
from .probe import _NOT_FINITE, LAMBDAS, RidgeProbe, _check_xy, fit_many
from .stats import (
    bootstrap_ci,
    group_bootstrap_metrics,
    group_split,
    ordered_share,
    pearson,
    r2,
    rmse,
    spearman,
    split_indices,
)

METRICS = {"rmse": rmse, "pearson": pearson, "spearman": spearman, "r2": r2}


# ----------------------------------------------------------------------------- scores
def score_predictions(pred: Any, y: Any, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """``rmse``, ``pearson``, ``spearman``, ``r2`` with ``*_lo``/``*_hi`` percentile-bootstrap CIs, and ``n``."""
    p, t = real_tensor(pred, "pred").cpu().flatten(), real_tensor(y, "y").cpu().flatten()
    if len(p) != len(t):
        raise ValueError(f"predictions and labels have different lengths: {len(p)} vs {len(t)}")
    out: dict[str, Any] = {}
    for name, fn in METRICS.items():
        ci = bootstrap_ci(fn, p, t, n_boot=n_boot, seed=seed, alpha=alpha)
        out.update({name: ci.estimate, f"{name}_lo": ci.lo, f"{name}_hi": ci.hi})
    out["n"] = len(t)
    return out


class Split(NamedTuple):
    """One held-out split: row indices, and the training rows' groups (None: split by row)."""

    train: torch.Tensor
    test: torch.Tensor
    groups_train: Any


def held_out_split(n: int, *, test_frac: float = 0.2, seed: int = 0, groups: Any = None) -> Split:
    """The split every function here uses: by document with ``groups`` [n], else by row."""
    if groups is None:
        return Split(*split_indices(n, test_frac=test_frac, seed=seed), None)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} rows; give one document id per row")
    train, test = group_split(groups, (1 - test_frac, test_frac), seed=seed)
    return Split(train, test, np.asarray(groups, dtype=object)[train.numpy()])


def _ridge_row(X, y, split, *, lambdas, folds, seed, n_boot, standardize, extend_grid=False, shuffle=False):
    """Fit a ridge probe on the train rows (labels permuted if ``shuffle``), score on the test rows."""
    train, test = split.train, split.test
    y_train = y[train]
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) + 1)
        y_train = y_train[torch.randperm(len(y_train), generator=g)]
    probe = RidgeProbe.fit(X[train], y_train, lambdas=lambdas, folds=folds, seed=seed, standardize=standardize,
                           groups=split.groups_train, extend_grid=extend_grid)
    pred = probe.predict(X[test]).double().cpu()
    row = score_predictions(pred, y[test], n_boot=n_boot, seed=seed)
    row.update(lambda_=probe.lambda_, cv_rmse=float(probe.cv_rmse.min()), n_train=len(train),
               lambda_at_edge=bool(probe.lambda_at_edge))
    return row, pred, probe


def fit_and_score(X: Any, y: Any, *, test_frac: float = 0.2, seed: int = 0, n_boot: int = 1000,
                  lambdas: Sequence[float] = LAMBDAS, folds: int = 5, standardize: bool = False,
                  groups: Any = None, extend_grid: bool = False) -> dict:
    """Ridge probe on one split: ``{"metrics": row, "probe", "pred" [n_test], "y_test", "test" (indices)}``."""
    X, y = _check_xy(X, y)
    X, y = X.cpu(), y.cpu()
    split = held_out_split(len(y), test_frac=test_frac, seed=seed, groups=groups)
    row, pred, probe = _ridge_row(X, y, split, lambdas=lambdas, folds=folds, seed=seed, n_boot=n_boot,
                                  standardize=standardize, extend_grid=extend_grid)
    return {"metrics": row, "probe": probe, "pred": pred, "y_test": y[split.test], "test": split.test,
            "train": split.train}


def layer_sweep(acts_by_layer: dict[int, Any], y: Any, *, test_frac: float = 0.2, seed: int = 0,
                n_boot: int = 1000, lambdas: Sequence[float] = LAMBDAS, folds: int = 5,
                standardize: bool = False, groups: Any = None, extend_grid: bool = False) -> pd.DataFrame:
    """Ridge probe quality at every layer, on one shared held-out split.

    Args:
        acts_by_layer: ``{layer: [n, d]}``, e.g. ``extract(lm, texts, layers)``.
        y: [n] complexity labels (finite: drop failed labels first).
    Returns one row per layer (index ``layer``): ``rmse``, ``pearson``, ``spearman``, ``r2`` with
    ``_lo``/``_hi`` bootstrap CIs over test rows, the chosen ``lambda_``, its ``cv_rmse``, ``n_train``, ``n``.
    """
    if not acts_by_layer:
        raise ValueError("acts_by_layer is empty; pass {layer: activations [n, d]}")
    y = finite_rows(real_tensor(y, "y").cpu().flatten(), "y", _NOT_FINITE)
    split = held_out_split(len(y), test_frac=test_frac, seed=seed, groups=groups)
    rows = []
    for layer in sorted(acts_by_layer):
        X, _ = _check_xy(acts_by_layer[layer], y)
        row, _, _ = _ridge_row(X.cpu(), y, split, lambdas=lambdas, folds=folds, seed=seed, n_boot=n_boot,
                               standardize=standardize, extend_grid=extend_grid)
        rows.append({"layer": int(layer), **row})
    return pd.DataFrame(rows).set_index("layer")


# ----------------------------------------------------------------------------- control features
def length_features(texts: Sequence[str], tokenizer=None, *, max_length: int | None = None) -> torch.Tensor:
    """Length-only features [n, 6]: n tokens, n words, n chars and their log1p (so a linear fit can bend).

    Pass the texts the model actually read (see ``activations.truncate_to_tokens``). Tokens are
    counted with ``tokenizer`` (truncated to ``max_length`` when given); without a tokenizer the
    token columns are dropped ([n, 4]).
    """
    texts = _texts(texts)
    cols = []
    if tokenizer is not None:
        enc = tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
        cols.append([len(ids) for ids in enc])
    cols.append([len(t.split()) for t in texts])
    cols.append([len(t) for t in texts])
    raw = torch.tensor(cols, dtype=torch.float64).T  # [n, 2 or 3]
    return torch.cat([raw, raw.log1p()], dim=1)


def _texts(texts: Sequence[str]) -> list[str]:
    from .activations import _check_texts

    return _check_texts(texts)


def _token_ids(lm, texts: list[str], max_length: int) -> list[list[int]]:
    int_at_least(max_length, "max_length")
    ids = lm.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]  # as extract() tokenises
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"texts[{i}] tokenises to zero tokens; drop it")
    return ids


@torch.inference_mode()
def mean_input_embeddings(lm, texts: Sequence[str], max_length: int = 128, *, batch_size: int = 256) -> torch.Tensor:
    """Bag-of-token-embeddings control: mean input embedding of each text's tokens, [n, d] float32 CPU.

    Uses the model's own input-embedding module (so e.g. Gemma's embedding scale is applied) on
    the same tokens ``extract`` reads (truncated to ``max_length``); no context processing at all.
    """
    texts = _texts(texts)
    emb = lm._module.get_input_embeddings()
    device = emb.weight.device
    out = []
    for start in range(0, len(texts), batch_size):
        ids = _token_ids(lm, texts[start:start + batch_size], max_length)
        lengths = torch.tensor([len(r) for r in ids])
        flat = torch.tensor([t for r in ids for t in r], device=device)  # [n_tokens]
        vecs = emb(flat).float()  # [n_tokens, d]
        seg = torch.repeat_interleave(torch.arange(len(ids)), lengths).to(device)  # token -> text
        sums = torch.zeros(len(ids), vecs.shape[1], device=device).index_add_(0, seg, vecs)  # [B, d]
        out.append((sums / lengths.to(device)[:, None]).cpu())
    return torch.cat(out)


@torch.inference_mode()
def last_token_embeddings(lm, texts: Sequence[str], max_length: int = 128) -> torch.Tensor:
    """Embedding-layer control: input embedding of each text's last token, [n, d] float32 CPU.

    For rotary-position models (SmolLM2, Llama, Gemma, Pythia, Qwen) this is exactly the embedding-layer
    output (``hidden_states[0]``) at the last token; for models with learned absolute positions
    (GPT-2) it leaves out the position vector.
    """
    texts = _texts(texts)
    emb = lm._module.get_input_embeddings()
    last = torch.tensor([r[-1] for r in _token_ids(lm, texts, max_length)], device=emb.weight.device)
    return emb(last).float().cpu()


def mean_pool(acts: torch.Tensor, text_index: torch.Tensor, n_texts: int) -> torch.Tensor:
    """Mean over each text's tokens of ``extract(..., token="all")`` output: [n_tokens, d] -> [n_texts, d]."""
    counts = torch.bincount(text_index, minlength=n_texts)  # [n_texts]
    if (counts == 0).any():
        raise ValueError(f"text {int((counts == 0).nonzero()[0])} has no tokens in text_index")
    sums = torch.zeros(n_texts, acts.shape[1], dtype=acts.dtype).index_add_(0, text_index, acts)
    return sums / counts[:, None]


# ----------------------------------------------------------------------------- MLP probe
class MLPProbe:
    """Small nonlinear probe: d -> hidden -> hidden -> 1 (GELU), AdamW, early stopping on a validation split.

    Inputs and targets are z-scored with training statistics; predictions are clamped to the
    training label range like the ridge probe. Seeded: the same data and seed give the same probe.
    """

    def __init__(self, net: torch.nn.Module, x_mean, x_scale, y_mean: float, y_scale: float,
                 y_min: float, y_max: float, history: list[dict]) -> None:
        self.net, self.x_mean, self.x_scale = net, x_mean, x_scale
        self.y_mean, self.y_scale, self.y_min, self.y_max = y_mean, y_scale, y_min, y_max
        self.history = history

    @classmethod
    def fit(cls, X: Any, y: Any, *, hidden: int = 256, val_frac: float = 0.15, lr: float = 1e-3,
            weight_decay: float = 1e-2, dropout: float = 0.1, batch_size: int = 256, max_epochs: int = 300,
            patience: int = 20, seed: int = 0) -> MLPProbe:
        X, y = _check_xy(X, y)
        X, y = X.float().cpu(), y.float().cpu()
        n_val = max(1, int(round(val_frac * len(y))))
        if len(y) - n_val < 2:
            raise ValueError(f"{len(y)} samples are too few for an MLP probe with val_frac={val_frac}")
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(len(y), generator=g)
        val, tr = perm[:n_val], perm[n_val:]
        x_mean, x_std = X[tr].mean(0), X[tr].std(0, correction=0)
        x_scale = torch.where(x_std > 0, x_std, torch.ones_like(x_std))
        y_mean, y_scale = float(y[tr].mean()), float(y[tr].std(correction=0)) or 1.0
        Xs, ys = (X - x_mean) / x_scale, (y - y_mean) / y_scale
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = torch.nn.Sequential(
                torch.nn.Linear(X.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden, 1))
            opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
            best, best_state, bad, history = math.inf, None, 0, []
            for epoch in range(max_epochs):
                net.train()
                for idx in tr[torch.randperm(len(tr), generator=g)].split(batch_size):
                    loss = torch.nn.functional.mse_loss(net(Xs[idx])[:, 0], ys[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                net.eval()
                with torch.no_grad():
                    val_rmse = float(((net(Xs[val])[:, 0] - ys[val]) ** 2).mean().sqrt()) * y_scale
                history.append({"epoch": epoch, "val_rmse": val_rmse})
                if val_rmse < best - 1e-6:
                    best, bad = val_rmse, 0
                    best_state = {k: v.clone() for k, v in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= patience:
                        break
        net.load_state_dict(best_state)
        net.eval()
        return cls(net, x_mean, x_scale, y_mean, y_scale, float(y.min()), float(y.max()), history)

    @torch.no_grad()
    def predict(self, X: Any) -> torch.Tensor:
        """Predicted complexity [n] (float32, CPU) for X [n, d]."""
        t = (torch.as_tensor(np.asarray(X)) if not isinstance(X, torch.Tensor) else X).detach().float().cpu()
        out = self.net((t - self.x_mean) / self.x_scale)[:, 0] * self.y_scale + self.y_mean
        return out.clamp(self.y_min, self.y_max)


# ----------------------------------------------------------------------------- controls table
def controls_table(X: Any, y: Any, *, features: dict[str, Any] | None = None, test_frac: float = 0.2,
                   seed: int = 0, n_boot: int = 1000, lambdas: Sequence[float] = LAMBDAS, folds: int = 5,
                   standardize: bool = False, standardize_features: bool = True,
                   mlp: bool | dict = True, return_predictions: bool = False, groups: Any = None,
                   extend_grid: bool = False):
    """The probe on ``X`` against its controls, all on the same held-out split.

    Rows (index ``model``): ``ridge probe`` (on X), ``shuffled labels`` (same probe, training labels
    permuted; scored against the true test labels), one ridge row per entry of ``features``
    (e.g. ``{"text length": length_features(...), "embedding layer": last_token_embeddings(...),
    "mean input embeddings": mean_input_embeddings(...)}``, z-scored when ``standardize_features``)
    and ``MLP probe`` (on X; ``mlp`` may be a dict of :meth:`MLPProbe.fit` arguments).
    Columns: the metrics with CIs as in :func:`layer_sweep`, plus ``dpearson``/``dpearson_lo``/
    ``dpearson_hi``: the probe's Pearson minus the row's, with a paired bootstrap CI (CI above 0:
    the probe beats that row). With ``return_predictions`` also returns ``({model: pred}, y_test)``.
    """
    X, y = _check_xy(X, y)
    X, y = X.cpu(), y.cpu()
    split = held_out_split(len(y), test_frac=test_frac, seed=seed, groups=groups)
    train, test = split.train, split.test
    kw = dict(lambdas=lambdas, folds=folds, seed=seed, n_boot=n_boot, extend_grid=extend_grid)
    rows, preds = {}, {}
    rows["ridge probe"], preds["ridge probe"], _ = _ridge_row(X, y, split, standardize=standardize, **kw)
    rows["shuffled labels"], preds["shuffled labels"], _ = _ridge_row(X, y, split, standardize=standardize,
                                                                      shuffle=True, **kw)
    for name, F in (features or {}).items():
        F, _ = _check_xy(F, y)
        rows[name], preds[name], _ = _ridge_row(F.cpu(), y, split, standardize=standardize_features, **kw)
    if mlp:
        m = MLPProbe.fit(X[train], y[train], seed=seed, **(mlp if isinstance(mlp, dict) else {}))
        preds["MLP probe"] = m.predict(X[test]).double()
        rows["MLP probe"] = score_predictions(preds["MLP probe"], y[test], n_boot=n_boot, seed=seed)
        rows["MLP probe"].update(n_train=len(train), epochs=len(m.history))
    y_test = y[test]
    base = preds["ridge probe"]
    for name, row in rows.items():
        d = bootstrap_ci(lambda a, b, t: pearson(a, t) - pearson(b, t), base, preds[name], y_test,
                         n_boot=n_boot, seed=seed)
        row.update(dpearson=d.estimate, dpearson_lo=d.lo, dpearson_hi=d.hi)
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model"
    return (df, preds, y_test) if return_predictions else df


def permutation_null(X: Any, y: Any, *, n_perm: int = 20, test_frac: float = 0.2, seed: int = 0,
                     lambdas: Sequence[float] = LAMBDAS, folds: int = 5, standardize: bool = False,
                     groups: Any = None) -> pd.DataFrame:
    """Test metrics of ridge probes fitted to ``n_perm`` permutations of the training labels.

    Same split as :func:`controls_table`; one row per permutation (``rmse``, ``pearson``,
    ``spearman``, ``r2``, ``lambda_``). Its spread is the null a real probe must clear, wider
    than a bootstrap CI of one permutation (which ignores the permutation's own randomness).
    """
    X, y = _check_xy(X, y)
    X, y = X.cpu(), y.cpu()
    train, test, groups_train = held_out_split(len(y), test_frac=test_frac, seed=seed, groups=groups)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    y_train = y[train]
    Y = torch.stack([y_train[torch.randperm(len(train), generator=g)] for _ in range(n_perm)], 1)  # [n_train, P]
    probes = fit_many(X[train], Y, lambdas=lambdas, folds=folds, seed=seed, standardize=standardize,
                      groups=groups_train)
    rows = []
    for i, probe in enumerate(probes):
        pred = probe.predict(X[test]).double()
        rows.append({"perm": i, **{k: float(fn(pred, y[test])) for k, fn in METRICS.items()},
                     "lambda_": probe.lambda_})
    return pd.DataFrame(rows).set_index("perm")


# ----------------------------------------------------------------------------- OneStopEnglish
def onestop_transfer(probe: Any, acts: Any, levels: Any, topics: Sequence[Any], *, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """How a probe trained on rubric labels orders OneStopEnglish's human reading levels.

    Args:
        probe: anything with ``.predict(acts) -> [n]`` (a :class:`RidgeProbe`).
        acts: [n, d] activations of the OneStopEnglish texts; levels: [n] in {0, 1, 2}
            (elementary, intermediate, advanced); topics: [n] article ids (one article, three levels).
    Returns ``spearman`` (with level, bootstrap ``_lo``/``_hi``), ``ordered_share`` (share of topics
    with all three levels whose mean predictions are strictly elementary < intermediate < advanced),
    ``pairwise_share`` (share of within-topic level pairs ordered correctly), ``n_topics``, ``n`` and
    ``mean_by_level`` (mean prediction per level).
    """
    pred = real_tensor(probe.predict(acts), "predictions").cpu().flatten()
    lev = real_tensor(levels, "levels").cpu().flatten()
    topics = list(topics)
    if not (len(pred) == len(lev) == len(topics)):
        raise ValueError(f"acts, levels and topics have different lengths: {len(pred)}, {len(lev)}, {len(topics)}")
    if not bool(torch.isin(lev, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)).all()):
        raise ValueError("levels must be 0 (elementary), 1 (intermediate) or 2 (advanced)")
    ci = bootstrap_ci(spearman, pred, lev, n_boot=n_boot, seed=seed)
    df = pd.DataFrame({"pred": pred.numpy(), "level": lev.numpy().astype(int), "topic": topics})
    table = df.groupby(["topic", "level"])["pred"].mean().unstack("level").reindex(columns=[0, 1, 2])
    full = table.dropna().to_numpy()  # [n_topics, 3]: mean prediction per level
    pairs = np.stack([full[:, 1] > full[:, 0], full[:, 2] > full[:, 1], full[:, 2] > full[:, 0]], 1)
    return {"spearman": ci.estimate, "spearman_lo": ci.lo, "spearman_hi": ci.hi,
            "ordered_share": ordered_share(df["pred"], df["level"], df["topic"], levels=(0, 1, 2)),
            "pairwise_share": float(pairs.mean()) if len(full) else math.nan,
            "n_topics": len(full), "n": len(pred),
            "mean_by_level": df.groupby("level")["pred"].mean().reindex([0, 1, 2]).tolist()}


# ----------------------------------------------------------------------------- token-level probe, scores by group
SCORE_COLUMNS = ["n", "n_documents", "pearson", "pearson_lo", "pearson_hi", "r2", "r2_lo", "r2_hi",
                 "rmse", "rmse_lo", "rmse_hi"]  # document_scores' keys, in order


def document_scores(pred: Any, y: Any, documents: Sequence[Any], *, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> dict[str, Any]:
    """``pearson``, ``r2`` and ``rmse`` with ``_lo``/``_hi`` CIs that resample documents, ``n``, ``n_documents``.

    The tokens (or contexts) of one document are not independent: the bootstrap draws whole documents
    (:func:`~adaptivek.stats.group_bootstrap_metrics`). With a single document the CIs are NaN.
    """
    p, t = real_tensor(pred, "pred").cpu().flatten(), real_tensor(y, "y").cpu().flatten()
    docs = np.asarray(documents, dtype=object)
    if not (len(p) == len(t) == len(docs)):
        raise ValueError(f"pred, y and documents have different lengths: {len(p)}, {len(t)}, {len(docs)}; "
                         f"pass one document id per row")
    n_docs = len(set(docs.tolist()))
    if n_docs >= 2:
        cis = group_bootstrap_metrics(p, t, groups=docs, n_boot=n_boot, seed=seed, alpha=alpha)
    else:
        cis = {k: (float(fn(p, t)), math.nan, math.nan) for k, fn in (("pearson", pearson), ("r2", r2), ("rmse", rmse))}
    out: dict[str, Any] = {"n": len(t), "n_documents": n_docs}
    for name, (est, lo, hi) in cis.items():
        out.update({name: est, f"{name}_lo": lo, f"{name}_hi": hi})
    return out


def grouped_scores(pred: Any, y: Any, by: Sequence[Any], documents: Sequence[Any], *, min_n: int = 2,
                   n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """:func:`document_scores` within each value of ``by`` (a source, a position bucket), one row per value.

    Values with fewer than ``min_n`` rows are left out, and so are rows whose ``by`` is missing (None,
    NaN). Index: the values of ``by`` in sorted order, or in category order for a ``pd.Categorical``
    (e.g. :func:`position_buckets`).
    """
    int_at_least(min_n, "min_n", 2, why="a correlation needs two rows")
    p, t = real_tensor(pred, "pred").cpu().flatten(), real_tensor(y, "y").cpu().flatten()
    key = pd.Series(by) if isinstance(by, pd.Categorical) else pd.Series(np.asarray(by, dtype=object))
    docs = np.asarray(documents, dtype=object)
    if not (len(p) == len(t) == len(key) == len(docs)):
        raise ValueError(f"pred, y, by and documents have different lengths: {len(p)}, {len(t)}, {len(key)}, "
                         f"{len(docs)}; pass one value of each per row")
    sizes = key.value_counts()
    values = list(key.cat.categories) if isinstance(key.dtype, pd.CategoricalDtype) else sorted(sizes.index)
    rows = {}
    for value in (v for v in values if sizes.get(v, 0) >= min_n):  # a loop over groups, not rows
        sel = torch.as_tensor((key == value).to_numpy(dtype=bool, copy=True))  # [n] (a writable copy)
        rows[value] = document_scores(p[sel], t[sel], docs[sel.numpy()], n_boot=n_boot, seed=seed)
    return pd.DataFrame.from_dict(rows, orient="index", columns=SCORE_COLUMNS)


def position_buckets(position: Any, edges: Sequence[int]) -> pd.Categorical:
    """Bucket ``"a-b"`` of each token's position, for ``[edges[i], edges[i + 1])``; missing outside all of them.

    An ordered ``pd.Categorical`` [n] whose categories are the buckets from first to last, so that
    :func:`grouped_scores` lists them in position order.
    """
    pos = np.asarray(position, dtype=np.int64)
    e = np.asarray(list(edges), dtype=np.int64)
    if e.ndim != 1 or len(e) < 2 or (np.diff(e) <= 0).any():
        raise ValueError(f"edges must be >= 2 increasing positions, e.g. (15, 32, 64, 128), got {list(edges)}")
    names = [f"{a}-{b - 1}" for a, b in zip(e[:-1], e[1:], strict=True)]
    j = np.searchsorted(e, pos, side="right") - 1  # [n] bucket of each position (-1: before the first edge)
    codes = np.where((j >= 0) & (j < len(names)), j, -1)  # -1: missing
    return pd.Categorical.from_codes(codes, categories=names, ordered=True)


def within_source_scores(pred: Any, y: Any, sources: Sequence[Any], documents: Sequence[Any], *, train_pred: Any,
                         train_y: Any, train_sources: Sequence[Any], min_n: int = 20, n_boot: int = 1000,
                         seed: int = 0) -> pd.DataFrame:
    """Does a probe track complexity within a source, or mostly which source a text comes from?

    Held-out ``pred`` and labels ``y`` with each row's ``sources`` and ``documents``; the training split's
    predictions, labels and sources give the source means (never the test split). Rows of the table
    (:func:`document_scores` columns, CIs resampling documents):

    - ``pooled``: all held-out rows;
    - one row per source with at least ``min_n`` held-out rows: the probe within that source;
    - ``pooled, source means removed``: labels minus their source's training mean label, predictions
      minus their source's training mean prediction; what is left is within-source variation only;
    - ``source's training mean alone``: the training mean label of each row's source as the prediction,
      the best a predictor that only knows the source can do.

    Held-out rows of a source with no training rows are left out of the last two rows (see ``n``).
    """
    p, t = real_tensor(pred, "pred").cpu().flatten(), real_tensor(y, "y").cpu().flatten()
    src, docs = np.asarray(sources, dtype=object), np.asarray(documents, dtype=object)
    tp, ty = real_tensor(train_pred, "train_pred").cpu().flatten(), real_tensor(train_y, "train_y").cpu().flatten()
    tsrc = np.asarray(train_sources, dtype=object)
    if not (len(p) == len(t) == len(src) == len(docs)) or not (len(tp) == len(ty) == len(tsrc)):
        raise ValueError(f"held-out pred, y, sources, documents ({len(p)}, {len(t)}, {len(src)}, {len(docs)}) and "
                         f"training pred, y, sources ({len(tp)}, {len(ty)}, {len(tsrc)}) must each have one entry per row")
    means = pd.DataFrame({"pred": tp.numpy(), "y": ty.numpy(), "source": tsrc}).groupby("source")[["pred", "y"]].mean()
    known = np.isin(src, means.index.to_numpy())
    m = means.reindex(src[known])  # [n_known, 2] training means of each held-out row's source
    m_pred, m_y = (torch.tensor(m[c].to_numpy(dtype=np.float64)) for c in ("pred", "y"))  # [n_known] each
    pk, tk, dk = p[known], t[known], docs[known]
    kw = dict(n_boot=n_boot, seed=seed)
    rows = {"pooled": document_scores(p, t, docs, **kw)}
    rows |= grouped_scores(p, t, src, docs, min_n=min_n, **kw).to_dict(orient="index")
    rows["pooled, source means removed"] = document_scores(pk - m_pred, tk - m_y, dk, **kw)
    rows["source's training mean alone"] = document_scores(m_y, tk, dk, **kw)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "held-out rows"
    return table

