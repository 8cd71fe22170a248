"""What the chapters need to present results: formatting, computed verdict sentences, plots, run files.

Chapters stay short because the presentation logic lives here, tested, instead of being re-defined in
each notebook. Nothing here trains or measures anything: every function turns numbers that a chapter
already computed into a string, a table or a figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .io import nan_for_null

# ============================================================================ general (chapters 1-4, 6)


def fmt_ci(estimate: float, lo: float, hi: float, *, digits: int = 2, signed: bool = False) -> str:
    """``"0.72 [0.65, 0.78]"``: an estimate with its interval, all to ``digits`` decimals.

    ``signed=True`` writes a ``+`` on positive numbers (for differences: ``"+0.03 [-0.01, +0.07]"``).
    """
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{estimate:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def row_ci(row, metric: str, *, digits: int = 2, signed: bool = False) -> str:
    """:func:`fmt_ci` of ``row[metric]`` with ``row[metric + "_lo"]`` and ``row[metric + "_hi"]``.

    The column layout of :func:`adaptivek.layer_sweep` and :func:`adaptivek.controls_table`.
    """
    return fmt_ci(row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"], digits=digits, signed=signed)


def relation(lo: float, hi: float, reference: float) -> str:
    """Where an interval lies relative to a reference value (the paper's number), as words.

    ``"consistent with"`` when ``lo <= reference <= hi``, else ``"below"`` or ``"above"``: written to fit
    "our Pearson is ___ the paper's 0.72".
    """
    if lo <= reference <= hi:
        return "consistent with"
    return "below" if hi < reference else "above"


def sign_phrase(lo: float, hi: float, *, positive: str, negative: str, neither: str = "no clear difference") -> str:
    """Which side of 0 the interval of a difference lies on: ``positive`` when ``lo > 0``, ``negative``
    when ``hi < 0``, else ``neither`` (the interval contains 0)."""
    if lo > 0:
        return positive
    return negative if hi < 0 else neither


def format_context(row, dims: list[str], *, chars: int = 600, width: int = 100) -> str:
    """One labelled context as text: its complexity, source metadata, dimension scores, and the text.

    ``row`` is a row of chapter 2's labels table (``complexity``, ``source``, optional ``genre``/``book``/
    ``year``, one column per name in ``dims``); the text is cut to ``chars`` characters, wrapped at ``width``.
    """
    import textwrap

    scores = "  ".join(f"{d[:4]} {row[d]:.1f}" for d in dims)
    meta = " ".join(str(row[c]) for c in ("genre", "book", "year") if c in row and not pd.isna(row[c]))
    body = textwrap.indent(textwrap.fill(row["text"][:chars], width), "    ")
    return f"complexity {row['complexity']:.2f} | {row['source']}: {meta}\n  {scores}\n{body}\n"


class FixedPredictions:
    """Scores computed elsewhere, in the probe interface: ``predict(X)`` returns them unchanged.

    Lets a function that evaluates a probe (e.g. :func:`adaptivek.onestop_transfer`) evaluate any other
    scorer, such as the label source itself, on the same rows. ``X`` is only checked for its length.
    """

    def __init__(self, values):
        import numpy as np
        import torch

        self.values = torch.as_tensor(np.array(values))  # a writable copy; keeps the values' dtype (float64 from numpy)

    def predict(self, X):
        if len(X) != len(self.values):
            raise ValueError(f"FixedPredictions holds {len(self.values)} scores but was asked for {len(X)} rows; "
                             "build it from the scores of exactly these rows")
        return self.values


def contexts_and_labels(
    artifacts_dir: str | Path,
    tokenizer,
    *,
    corpus: str = "embedded",
    n_texts: int = 1000,
    seed: int = 0,
    max_length: int = 64,
):
    """Chapter 1's contexts and chapter 2's labels, as chapters 3-5 use them: ``(texts, y, source)``.

    Reads ``texts.parquet`` and ``labels.parquet`` from ``artifacts_dir``. Where a chapter has not run
    (a lone notebook, e.g. on Colab) it rebuilds what that chapter would have written with the same
    parameters: the corpus sample cut to ``max_length`` tokens, labelled by the offline RubricScorer.
    Labels are paired with texts by their text, never by position alone. ``y`` is float64 with NaN for
    a context without a label (a failed LLM call, counted in a warning); callers that need finite
    labels drop them (``torch.isfinite(y)``) and say how many. ``source`` says where labels came from.
    Raises when ``labels.parquet`` labels texts that are not chapter 1's (the files come from different runs).
    """
    import torch

    artifacts = Path(artifacts_dir)
    texts_path, labels_path = artifacts / "texts.parquet", artifacts / "labels.parquet"
    labels = pd.read_parquet(labels_path) if labels_path.is_file() else None
    texts = _chapter1_texts(texts_path, labels, tokenizer, corpus=corpus, n_texts=n_texts, seed=seed,
                            max_length=max_length)
    if labels is None:
        from .complexity import RubricScorer

        y = torch.tensor(RubricScorer().score(texts)["complexity"].to_numpy(dtype=float), dtype=torch.float64)
        return texts, y, "the offline rubric, computed here (chapter 2 has not run: no labels.parquet)"
    y = torch.tensor(_labels_by_text(texts, labels, texts_path, labels_path), dtype=torch.float64)
    return texts, y, "chapter 2's labels (labels.parquet)"


def context_documents(artifacts_dir: str | Path, texts: list[str], *, corpus: str = "embedded", n_texts: int = 1000,
                      seed: int = 0) -> list[str]:
    """The source document of each of chapter 1's contexts, for splits that never share a document.

    From chapter 1's ``texts.parquet`` (its ``document`` column), else from the corpus sample that chapter 1
    drew with the same parameters (each context is a prefix of its sample's text, in the same order). If
    neither matches ``texts``, each context is its own document, with a warning: a split by row, not by
    document, which can leak a document's style across the split.
    """
    import warnings

    path = Path(artifacts_dir) / "texts.parquet"
    if path.is_file():
        frame = pd.read_parquet(path)
        if "document" in frame and frame["text"].tolist() == list(texts):
            return frame["document"].astype(str).tolist()
    from .corpus import load_corpus

    sample = load_corpus(corpus, n=n_texts, seed=seed)
    if len(sample) == len(texts) and all(full.startswith(t) for full, t in zip(sample["text"], texts, strict=True)):
        return [str(d) for d in sample["document"]]
    warnings.warn(f"no document ids for these {len(texts)} contexts ({path} has no matching 'document' column and "
                  f"the corpus sample differs): each context is its own document, so splits are by row; rerun "
                  f"chapter 1 to split by document", stacklevel=2)
    return [f"context:{i}" for i in range(len(texts))]


def _labels_by_text(texts: list[str], labels: pd.DataFrame, texts_path: Path, labels_path: Path) -> list[float]:
    """Each context's label from ``labels`` (by text), NaN where chapter 2 could not label it.

    A label for a text that is not among the contexts means the files come from different runs (an
    error). A context with a NaN label, or with no row at all while every row belongs to a context (a
    chapter 2 older than this one dropped the contexts it failed to label), is carried as NaN and counted.
    """
    import warnings

    by_text = dict(zip(labels["text"], labels["complexity"].astype(float), strict=True))
    stray = len(set(by_text) - set(texts))
    if stray:
        raise ValueError(f"{labels_path} labels {stray} texts that are not among the {len(texts)} contexts of "
                         f"{texts_path}: the two files come from different runs; rerun chapters 1 and 2 "
                         f"(adaptivek book run --only 01_activations --only 02_complexity)")
    y = [by_text.get(t, float("nan")) for t in texts]
    no_row = sum(t not in by_text for t in texts)
    failed = sum(v != v for v in y) - no_row  # NaN != NaN
    if failed or no_row:
        dropped = (f" ({no_row} of them have no row: an older chapter 2 dropped the contexts it failed to label; "
                   f"rerun chapter 2 to keep them as NaN)") if no_row else ""
        warnings.warn(f"{failed + no_row} of the {len(texts)} contexts failed to label in chapter 2 and carry NaN"
                      f"{dropped}; drop them with torch.isfinite(y) where finite labels are needed", stacklevel=3)
    return y


def _chapter1_texts(texts_path: Path, labels, tokenizer, *, corpus: str, n_texts: int, seed: int,
                    max_length: int) -> list[str]:
    """Chapter 1's contexts: its ``texts.parquet``, else the labels' texts, else rebuilt from the corpus."""
    if texts_path.is_file():
        return pd.read_parquet(texts_path)["text"].tolist()
    if labels is not None:
        return labels["text"].tolist()
    # chapter 1 has not run here: its contexts, rebuilt the same way
    from .activations import truncate_to_tokens
    from .corpus import load_corpus

    return truncate_to_tokens(tokenizer, load_corpus(corpus, n=n_texts, seed=seed)["text"], max_length)


# ---------------------------------------------------------------------------- figures (chapters 3 and 4)


def plot_curves(df: pd.DataFrame, columns: dict[str, str], *, x: str = "step", shade: tuple[float, float] | None = None,
                shade_label: str | None = None, logy: tuple[str, ...] = (), figsize=None):
    """One panel per column of ``df`` against ``x`` (training histories), titled by ``columns``' values.

    ``shade=(start, end)`` shades that span of ``x`` on every panel (chapter 4: phase 3); ``logy`` names
    the columns drawn on a log scale. Returns the figure; its axes follow ``columns``' order.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=figsize or (4.3 * len(columns), 3.4), squeeze=False)
    for ax, (col, title) in zip(axes[0], columns.items(), strict=True):
        ax.plot(df[x], df[col], lw=1)
        if shade is not None:
            ax.axvspan(*shade, color="C1", alpha=0.15, label=shade_label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        if col in logy:
            ax.set_yscale("log")
    fig.tight_layout()
    return fig


def plot_layer_sweep(sweeps: dict[str, pd.DataFrame], best_layer: int, *, title: str,
                     metrics: dict[str, str] | None = None):
    """Probe quality per layer with 95 % intervals, one line per sweep (:func:`adaptivek.layer_sweep` tables).

    ``metrics`` maps a column (with ``_lo``/``_hi`` columns beside it) to its axis label; the sweeps are
    drawn side by side, slightly offset, and ``best_layer`` is marked. Returns the figure.
    """
    import matplotlib.pyplot as plt

    metrics = metrics or {"pearson": "Pearson r (test)", "r2": "R² (test)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 3.8), squeeze=False)
    axes = axes[0]
    for i, (name, df) in enumerate(sweeps.items()):
        off = (i - (len(sweeps) - 1) / 2) * 0.3
        for ax, m in zip(axes, metrics, strict=True):
            (line,) = ax.plot(df.index + off, df[m], "o-", ms=3.5, label=name)
            # the interval as computed (a percentile bootstrap interval need not contain the estimate)
            ax.vlines(df.index + off, df[m + "_lo"], df[m + "_hi"], color=line.get_color(), lw=1)
    for ax, (m, label) in zip(axes, metrics.items(), strict=True):
        ax.axvline(best_layer, c="C3", ls=":", label=f"best layer by CV: {best_layer}")
        ax.set_xlabel("layer (output of decoder block)")
        ax.set_ylabel(label)
        if m == "r2":  # below 0: worse than predicting the mean
            ax.axhline(0, c="k", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_controls(controls: pd.DataFrame, null_band: tuple[float, float], *, n_perm: int, n_test: int,
                  best_layer: int, probe: str = "ridge probe"):
    """Pearson with its 95 % interval for the probe and every control (:func:`adaptivek.controls_table`) on
    ``n_test`` test texts, over the shuffled-label null band ``null_band`` (95 % of ``n_perm`` permutations)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 3.8))
    ypos = np.arange(len(controls))[::-1]
    ax.axvspan(*null_band, color="0.85", label=f"shuffled-label null, 95 % of {n_perm} permutations")
    ax.hlines(ypos, controls["pearson_lo"], controls["pearson_hi"], color="C0", lw=1.5)
    ax.plot(controls["pearson"], ypos, "o", color="C0")
    ax.set_yticks(ypos, list(controls.index))
    ax.axvline(controls.loc[probe, "pearson"], c="C3", ls=":", lw=1)
    ax.set_xlabel(f"Pearson r on the {n_test} test texts (95 % bootstrap CI)")
    ax.set_title(f"Ridge probe at layer {best_layer} vs controls")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


LEVEL_NAMES = ("elementary", "intermediate", "advanced")  #: OneStopEnglish's levels 0, 1, 2


def plot_onestop(levels, scores: dict[str, object], *, max_length: int):
    """Box plots of each scorer's scores by OneStopEnglish reading level, one panel per scorer.

    ``levels`` are 0/1/2 (elementary/intermediate/advanced); ``scores`` maps a scorer's name to its scores
    of the same texts. Returns seaborn's FacetGrid.
    """
    import numpy as np
    import seaborn as sns

    levels = np.asarray(levels)
    df = pd.concat([pd.DataFrame({"level": levels, "score": np.asarray(v), "scorer": name})
                    for name, v in scores.items()])
    df["level"] = df["level"].map(dict(enumerate(LEVEL_NAMES)))
    g = sns.catplot(data=df, x="level", y="score", col="scorer", kind="box", height=3.4, aspect=1.3,
                    sharey=False, color="#7aa6c2")
    g.fig.suptitle(f"OneStopEnglish, first {max_length} tokens of each text", y=1.04)
    return g


def onestop_table(rows: dict[str, dict]) -> pd.DataFrame:
    """:func:`adaptivek.onestop_transfer` results, one row per scorer: Spearman with its interval, the shares
    of articles and of within-article pairs in the right order, and the number of articles."""
    cols = ["spearman", "spearman_lo", "spearman_hi", "ordered_share", "pairwise_share", "n_topics"]
    return pd.DataFrame(rows).T[cols].astype(float)


def k_map_table(complexities=(0, 2, 4, 5, 6, 8, 10), k_maxes=(320, 480, 640), *, k_min: int = 20) -> pd.DataFrame:
    """The paper's complexity-to-k map at a few complexities (columns) for a few k ranges (rows)."""
    from . import complexity_to_k

    cs = list(complexities)
    return pd.DataFrame({f"k ∈ [{k_min}, {m}]": complexity_to_k(cs, k_min=k_min, k_max=m).tolist() for m in k_maxes},
                        index=pd.Index(cs, name="c")).T


def plot_k_maps(k_label, k_pred, *, layer: int, k_maxes=(320, 480, 640), k_min: int = 20, base_k: int = 80):
    """Left: the paper's map from complexity to k for each ``k_max`` (with the unused ``base_k``). Right: the
    k that ``k_label`` (from the labels) and ``k_pred`` (from the probe at ``layer``) give our contexts, at
    the first of ``k_maxes``. Returns the figure."""
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from . import complexity_to_k

    c = torch.linspace(0, 10, 201)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for k_max in k_maxes:
        axes[0].plot(c, complexity_to_k(c, k_min=k_min, k_max=k_max), label=f"k ∈ [{k_min}, {k_max}]")
    axes[0].axhline(base_k, c="0.4", ls="--", lw=1, label=f"base_k = {base_k} (unused)")
    axes[0].axhline(k_min, c="0.7", lw=0.8)
    axes[0].set(xlabel="complexity c", ylabel="k", title="The paper's complexity → k map (s = 6)")
    axes[0].legend(fontsize=8)
    bins = np.arange(k_min, k_maxes[0] + 5, 10)
    axes[1].hist(np.asarray(k_label), bins=bins, alpha=0.55, label="from the labels")
    axes[1].hist(np.asarray(k_pred), bins=bins, alpha=0.55, label=f"from the probe (layer {layer})")
    axes[1].axvline(base_k, c="0.4", ls="--", lw=1)
    axes[1].set(xlabel="k", ylabel="texts", title=f"k for our {len(k_label)} contexts, k ∈ [{k_min}, {k_maxes[0]}]")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- verdicts (chapter 3)


def controls_verdict(controls: pd.DataFrame, names: list[str], *, probe: str = "ridge probe") -> pd.DataFrame:
    """Does the probe beat each control? One row per name in ``names`` (rows of :func:`adaptivek.controls_table`).

    Columns: the control's Pearson and the paired difference (probe - control) with intervals, whether the
    two Pearson intervals are disjoint, whether the paired interval is above 0, and ``result``
    ("probe better", "control better" or "no clear difference", from the paired interval).
    """
    p = controls.loc[probe]
    rows = []
    for name in names:
        row = controls.loc[name]
        rows.append({"control": name, "control Pearson": row_ci(row, "pearson"), "probe - control": row_ci(row, "dpearson"),
                     "CIs do not overlap": bool(p["pearson_lo"] > row["pearson_hi"]),
                     "paired CI > 0": bool(row["dpearson_lo"] > 0),
                     "result": sign_phrase(row["dpearson_lo"], row["dpearson_hi"], positive="probe better",
                                           negative="control better")})
    return pd.DataFrame(rows).set_index("control")


def beats_all_sentence(verdict: pd.DataFrame) -> str:
    """Answers "does the probe beat every control with non-overlapping intervals?" from :func:`controls_verdict`."""
    beaten = [n for n, ok in verdict["CIs do not overlap"].items() if ok]
    not_beaten = [n for n, ok in verdict["CIs do not overlap"].items() if not ok]
    if not not_beaten:
        return "Yes: it beats every control with non-overlapping intervals"
    return (f"No: it beats {', '.join(beaten) or 'none'} with non-overlapping intervals, but not "
            f"{', '.join(not_beaten)}")


def paper_probe_table(linear, mlp, sweep: pd.DataFrame, *, label_sd: float, ours: str) -> pd.DataFrame:
    """Our linear and MLP probes beside the paper's Table 1, and our best layer beside the paper's best.

    ``linear`` / ``mlp`` are rows of :func:`adaptivek.controls_table` (``rmse``, ``pearson``, ``spearman``
    with ``_lo``/``_hi``); ``sweep`` is the :func:`adaptivek.layer_sweep` table; ``label_sd`` is the test
    labels' standard deviation; ``ours`` heads our column. "RMSE / label sd" puts both on one scale: for
    the paper it is implied by its Pearson, sqrt(1 - r²), assuming calibrated predictions.
    """
    import math

    from .paper import MAX_PEARSON, PROBE_TABLE

    rows = []
    for name, r, p in (("linear probe", linear, PROBE_TABLE[0]), ("MLP", mlp, PROBE_TABLE[1])):
        rows.append({"predictor": name,
                     "paper (Pythia-70M)": f"RMSE {p['rmse']:.2f} / r {p['pearson']:.2f} / ρ {p['spearman']:.2f}",
                     ours: f"RMSE {r['rmse']:.2f} / r {row_ci(r, 'pearson')} / ρ {row_ci(r, 'spearman')}",
                     "paper RMSE / label sd (implied)": f"{math.sqrt(1 - p['pearson'] ** 2):.2f}",
                     "ours RMSE / label sd": f"{r['rmse'] / label_sd:.2f}"})
    rows.append({"predictor": "best Pearson over layers",
                 "paper (Pythia-70M)": f"{MAX_PEARSON['pearson']} ({MAX_PEARSON['model']}, layer {MAX_PEARSON['layer']})",
                 ours: f"{sweep['pearson'].max():.2f} (layer {int(sweep['pearson'].idxmax())}; chosen on the test "
                       "split, optimistic)",
                 "paper RMSE / label sd (implied)": "", "ours RMSE / label sd": ""})
    return pd.DataFrame(rows).set_index("predictor")


# ---------------------------------------------------------------------------- the paper and the runs (chapter 6)


def deviations_table(kind: str | None = None, chapter: str | list[str] | None = None) -> pd.DataFrame:
    """:data:`adaptivek.paper.DEVIATIONS` as a table, one row per difference, grouped by kind in
    :data:`~adaptivek.paper.DEVIATION_KINDS` order.

    ``kind`` keeps one kind, ``chapter`` the rows of one or more chapters (notebook stems). ``flaw`` is the
    reference-code flaw a row addresses, numbered as in the book's appendix (``book/reference_code.md``).
    """
    from .paper import DEVIATION_KINDS, DEVIATIONS

    if kind is not None and kind not in DEVIATION_KINDS:
        raise ValueError(f"kind must be one of {DEVIATION_KINDS} (adaptivek.paper.DEVIATION_KINDS), got {kind!r}")
    df = pd.DataFrame([d._asdict() for d in DEVIATIONS])
    df["kind"] = pd.Categorical(df["kind"], categories=DEVIATION_KINDS, ordered=True)
    df["flaw"] = df["flaw"].astype("Int64")
    if kind is not None:
        df = df[df["kind"] == kind]
    if chapter is not None:
        df = df[df["where"].isin([chapter] if isinstance(chapter, str) else list(chapter))]
    return df.sort_values("kind", kind="stable").reset_index(drop=True)


def profile_vs_paper(params: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """A profile's effective settings beside the paper's (columns ``setting, paper, profile, same``).

    ``params`` maps chapter names to the parameters each runs with, as
    :func:`adaptivek.book.effective_parameters` returns them.
    """
    from .paper import SETTINGS

    act, tr, cmp_ = (params.get(c) or {} for c in ("01_activations", "04_training", "05_comparison"))
    lin = params.get("03_linear_encoding") or {}
    labels = (params.get("02_complexity") or {}).get("label_source")
    model = str(act.get("model", "")).removeprefix("random:")
    d_sae = tr.get("d_sae") if tr.get("d_sae") is not None else (
        f"{tr['expansion']} x d_model" if "expansion" in tr else None)
    rows = [
        ("model", "Pythia-70M / Pythia-160M / Gemma-2-2B", act.get("model")),
        ("corpus", SETTINGS["corpus"], act.get("corpus")),
        ("context tokens (at most)", SETTINGS["context_tokens"], act.get("max_length")),
        ("contexts (train + test)", SETTINGS["n_train_contexts"] + SETTINGS["n_test_contexts"], act.get("n_texts")),
        ("SAE layer", SETTINGS["layers"].get(model, "3 (Pythia), 12 (Gemma)"), lin.get("sae_layer")),
        ("dtype", SETTINGS["dtype"].get(model, "float32 (Pythia), bfloat16 (Gemma)"), act.get("dtype") or "float32"),
        ("dictionary size", SETTINGS["d_sae"], d_sae),
        ("k range", (SETTINGS["k_min"], SETTINGS["k_max"]), (tr.get("k_min"), tr.get("k_max"))),
        ("SAE batch", SETTINGS["sae_batch"], tr.get("batch_size")),
        ("training steps", SETTINGS["steps"], tr.get("steps")),
        ("TopK sweep", SETTINGS["topk_sweep"], cmp_.get("topk_ks")),
        ("complexity labels", "llm (GPT-4.1-mini) or corpus (the authors' file)", labels),
    ]
    df = pd.DataFrame(rows, columns=["setting", "paper", "profile"])
    df["same"] = [_same(a, b) for a, b in zip(df["paper"], df["profile"], strict=True)]
    df.loc[df.setting == "model", "same"] = model in SETTINGS["layers"]
    df.loc[df.setting == "complexity labels", "same"] = str(labels).startswith("llm:") or labels == "corpus"
    return df


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def find_runs(artifacts_root: str | Path) -> pd.DataFrame:
    """Profile runs under ``artifacts_root`` (``_build/artifacts``): which chapters' results each holds.

    Columns: ``run`` (folder name), ``profile``, ``dry_run``, ``probe`` / ``saes`` / ``comparison`` (whether
    chapter 3's ``summary.json``, chapter 4's ``training.json`` and chapter 5's ``results.json`` exist).
    """
    root = Path(artifacts_root)
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        rows.append({"run": d.name, "profile": d.name.removesuffix("-dry"), "dry_run": d.name.endswith("-dry"),
                     "probe": (d / "linear_encoding" / "summary.json").is_file(),
                     "saes": (d / "saes" / "training.json").is_file(),
                     "comparison": (d / "comparison" / "results.json").is_file()})
    return pd.DataFrame(rows, columns=["run", "profile", "dry_run", "probe", "saes", "comparison"])


def collect_results(run_dir: str | Path) -> dict[str, Any]:
    """The headline numbers of one run directory, in the paper's terms; missing chapters give ``None``.

    ``probe``: the best layer's test Pearson (with its bootstrap interval) / Spearman / RMSE and its layer.
    ``adaptivek``: one entry per k range with mean L0, FVE, cosine, L2 ratio, and ΔFVE against the TopK
    frontier at the same L0 (with its 95 % interval). ``topk``: the frontier's points (k, mean L0, FVE).
    ``config``: the comparison's sizes (d_in, d_sae, n_train, n_test, layer).
    """
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"run": run_dir.name, "probe": _probe_summary(run_dir / "linear_encoding"),
                           "adaptivek": None, "topk": None}
    results = run_dir / "comparison" / "results.json"
    if results.is_file():
        out |= _comparison_summary(results)
    return out


def _probe_summary(folder: Path) -> dict[str, Any] | None:
    """Chapter 3's best layer from ``summary.json``, with its interval from ``layer_sweep.csv`` when present."""
    summary = folder / "summary.json"
    if not summary.is_file():
        return None
    s = json.loads(summary.read_text())
    out = {"layer": s["best_layer"], **{k: nan_for_null(s["best"][k]) for k in ("pearson", "spearman", "rmse")},
           "pearson_lo": None, "pearson_hi": None, "label_source": s.get("label_source"), "n_train": s.get("n_train")}
    sweep = folder / "layer_sweep.csv"
    if sweep.is_file():  # the bootstrap interval of the best layer
        row = pd.read_csv(sweep, index_col="layer").loc[s["best_layer"]]
        out |= {"pearson_lo": float(row["pearson_lo"]), "pearson_hi": float(row["pearson_hi"])}
    return out


def _comparison_summary(results: Path) -> dict[str, Any]:
    """Chapter 5's AdaptiveK SAEs (with ΔFVE against the TopK frontier), its TopK points and its sizes."""
    from .comparison import load_results

    res = load_results(results)
    rows = []
    for name, sae in res["saes"].items():
        if sae.get("kind") != "adaptivek":
            continue
        m, vs = sae["metrics"], res["vs_topk"].get(name, {}).get("fve") or {}
        k_min, k_max = sae["k_range"]
        rows.append({"sae": name, "k_min": k_min, "k_max": k_max,
                     "l0_mean": m["l0_mean"], "fve": m["fve"], "cosine": m["cosine"], "l2_ratio": m["l2_ratio"],
                     "dfve_vs_topk": vs.get("estimate"), "dfve_lo": vs.get("lo"), "dfve_hi": vs.get("hi")})
    topk = [{"sae": n, "k": s.get("k"), "l0_mean": s["metrics"]["l0_mean"], "fve": s["metrics"]["fve"]}
            for n, s in res["saes"].items() if s.get("kind") == "topk"]
    return {"adaptivek": rows, "topk": topk,
            "config": {k: res["config"].get(k) for k in ("d_in", "d_sae", "n_train", "n_test", "layer")}}


def probe_runs_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Claim 1 across runs: each run's best-layer probe (:func:`collect_results` values by run name), then the
    paper's linear probe and its best probe anywhere."""
    from .paper import MAX_PEARSON, PROBE_MODEL, PROBE_TABLE

    rows = []
    for run, res in results.items():
        if p := res["probe"]:
            rows.append({"run": run, "best layer": p["layer"], "Pearson": round(p["pearson"], 3),
                         "95% CI": f"[{p['pearson_lo']:.3f}, {p['pearson_hi']:.3f}]" if p["pearson_lo"] is not None else "—",
                         "Spearman": round(p["spearman"], 3), "RMSE": round(p["rmse"], 3),
                         "labels": p["label_source"], "train contexts": p["n_train"]})
    n = "not stated"  # Table 1 and the layer sweep are not in the reference code
    lin = PROBE_TABLE[0]
    rows += [{"run": f"paper ({PROBE_MODEL})", "Pearson": lin["pearson"], "Spearman": lin["spearman"], "RMSE": lin["rmse"],
              "labels": "GPT-4.1-mini", "train contexts": n},
             {"run": f"paper ({MAX_PEARSON['model']})", "best layer": MAX_PEARSON["layer"],
              "Pearson": MAX_PEARSON["pearson"], "labels": "GPT-4.1-mini", "train contexts": n}]
    return pd.DataFrame(rows).set_index("run")


def adaptivek_runs_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Claim 2 across runs: every AdaptiveK SAE with mean L0, FVE, cosine, L2 ratio and ΔFVE against the TopK
    frontier (with its interval), then the paper's k-range table (which has no ΔFVE)."""
    from .paper import K_RANGE_ABLATION

    rows = []
    for run, res in results.items():
        for a in res["adaptivek"] or []:
            dfve = (fmt_ci(a["dfve_vs_topk"], a["dfve_lo"], a["dfve_hi"], digits=3, signed=True)
                    if a["dfve_vs_topk"] is not None else "—")
            rows.append({"run": run, "k range": f"{a['k_min']}-{a['k_max']}",
                         "mean L0 (paper: mean k)": round(a["l0_mean"], 1), "FVE": round(a["fve"], 3),
                         "cosine": round(a["cosine"], 3), "L2 ratio": round(a["l2_ratio"], 3), "ΔFVE vs TopK": dfve})
    for r in K_RANGE_ABLATION:
        rows.append({"run": "paper", "k range": f"{r['k_min']}-{r['k_max']}", "mean L0 (paper: mean k)": r["k_mean"],
                     "FVE": r["fve"], "cosine": r["cosine"], "L2 ratio": r["l2_ratio"], "ΔFVE vs TopK": "not reported"})
    return pd.DataFrame(rows).set_index(["run", "k range"])


SIGNS = ("better", "indistinguishable", "worse")  #: how an AdaptiveK SAE compares with the TopK frontier


def frontier_signs(results: dict[str, dict[str, Any]]) -> list[str]:
    """One of :data:`SIGNS` per AdaptiveK SAE of the runs whose ΔFVE interval is finite: "better" when it
    lies above 0, "worse" below, else "indistinguishable"."""
    import math

    return [sign_phrase(a["dfve_lo"], a["dfve_hi"], positive="better", negative="worse", neither="indistinguishable")
            for res in results.values() for a in res["adaptivek"] or []
            if a["dfve_lo"] is not None and math.isfinite(a["dfve_lo"])]


def count_phrase(signs: list[str]) -> str:
    """``"2 better, 1 worse"``: the counts of :func:`frontier_signs`, in :data:`SIGNS` order, zeros left out."""
    counts = [f"{signs.count(w)} {w}" for w in SIGNS if signs.count(w)]
    return ", ".join(counts) if counts else "none measured"


def claim2_verdict(signs: list[str]) -> str:
    """Chapter 6's sentence on claim 2 (AdaptiveK beats fixed k at matched sparsity) from :func:`frontier_signs`."""
    n, better = len(signs), signs.count("better")
    if not n:
        out = "Not measured in this build: no AdaptiveK-vs-TopK comparison has run, so claim 2 is neither " \
              "confirmed nor contradicted here."
    elif better == n:
        out = f"Agree, at our scale: every one of our {n} AdaptiveK SAEs beats the TopK frontier at matched sparsity (section 3)."
    elif better:
        out = (f"Partly agree, at our scale: {better} of our {n} AdaptiveK SAEs beat the TopK frontier at matched "
               f"sparsity ({count_phrase(signs)}, section 3).")
    else:
        out = (f"Disagree, at our scale: none of our {n} AdaptiveK SAEs beats fixed-k TopK at matched sparsity "
               f"({count_phrase(signs)}, section 3).")
    return out + (" The paper's three points have no matched TopK frontier beside them, so the published evidence "
                  "does not settle it either; the paper profiles run exactly this test at the paper's scale.")


def plot_runs(results: dict[str, dict[str, Any]]):
    """One panel per run: its TopK frontier (mean L0 against held-out FVE) and its AdaptiveK points, and a
    last panel with the paper's three AdaptiveK points (k-range table). Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .paper import K_RANGE_ABLATION

    pts = [{"panel": run, "SAE": sae, "mean L0": p["l0_mean"], "FVE": p["fve"]}
           for run, res in results.items()
           for sae, key in (("TopK frontier", "topk"), ("AdaptiveK", "adaptivek")) for p in res[key] or []]
    pts += [{"panel": "paper (k-range table)", "SAE": "AdaptiveK", "mean L0": r["k_mean"], "FVE": r["fve"]}
            for r in K_RANGE_ABLATION]
    pts = pd.DataFrame(pts)
    panels = list(dict.fromkeys(pts.panel))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        d = pts[pts.panel == panel]
        front = d[d.SAE == "TopK frontier"].sort_values("mean L0")
        if len(front):
            ax.plot(front["mean L0"], front["FVE"], "o-", color="grey", label="TopK (fixed k)")
        ada = d[d.SAE == "AdaptiveK"]
        ax.scatter(ada["mean L0"], ada["FVE"], color=sns.color_palette()[3], marker="D", s=50, zorder=3, label="AdaptiveK")
        ax.set(xscale="log", title=panel, xlabel="mean L0")
    axes[0][0].set_ylabel("FVE (held out)")
    axes[0][0].legend(loc="lower right")
    fig.suptitle("AdaptiveK against fixed-k TopK, per run (the paper reports only its AdaptiveK points)")
    fig.tight_layout()
    return fig


# ============================================================================ comparison (chapter 5)
#
# Every function reads the results dict that adaptivek.compare writes (adaptivek.comparison.load_results).
# A "difference" is one of its {"estimate", "lo", "hi"} entries (a point minus the TopK frontier, or
# AdaptiveK minus an ablation) with its 95 % paired bootstrap interval.

KINDS = {"topk": "TopK", "adaptivek": "AdaptiveK", "batchtopk": "BatchTopK", "ablation": "ablation",
         "matched": "TopK (matched)", "jumprelu": "JumpReLU"}
KIND_COLORS = {"TopK": "#4c72b0", "AdaptiveK": "#dd8452", "BatchTopK": "#55a868", "ablation": "#8172b3",
               "TopK (matched)": "#64b5cd", "JumpReLU": "#c44e52"}
BETTER_WORDS = ("better than", "worse than", "indistinguishable from")  #: :func:`direction`'s default words


def fmt_diff(d: dict[str, float] | None, digits: int = 3) -> str:
    """A difference as ``"+0.012 [-0.003, +0.027]"`` (:func:`fmt_ci`, signed); "—" when it was not measured
    (None, or a NaN estimate: a point outside the range of the TopK sweep)."""
    import math

    if d is None or not math.isfinite(d["estimate"]):
        return "—"
    return fmt_ci(d["estimate"], d["lo"], d["hi"], digits=digits, signed=True)


def direction(d: dict[str, float] | None, higher_better: bool = True, words: tuple[str, str, str] = BETTER_WORDS,
              missing: str = "not measurable against") -> str:
    """Which way a difference points, from its interval: ``words[0]`` ("better than") when the whole
    interval is on the good side of 0, ``words[1]`` when it is on the bad side, else ``words[2]``;
    ``missing`` when there is no interval. ``higher_better=False`` for MSE and CE."""
    import math

    if d is None or not math.isfinite(d["lo"]):
        return missing
    lo, hi = (d["lo"], d["hi"]) if higher_better else (-d["hi"], -d["lo"])
    return sign_phrase(lo, hi, positive=words[0], negative=words[1], neither=words[2])


def sae_label(name: str, sae: dict[str, Any]) -> str:
    """A readable name for an SAE of the results (``results["saes"][name]``): "AdaptiveK [20, 320]",
    "TopK k=40", "BatchTopK k=214 (threshold)", "shuffled k"."""
    kind = sae["kind"]
    if kind == "adaptivek":
        return f"AdaptiveK [{sae['k_range'][0]}, {sae['k_range'][1]}]"
    if kind == "ablation":
        return name.replace("_", " ")
    if kind == "batchtopk":
        return f"BatchTopK k={sae['k']} ({sae['inference']})"
    if kind == "jumprelu":
        return f"JumpReLU (target L0 {sae['target_l0']:.1f})"
    return f"{KINDS[kind]} k={sae['k']}"


def names_of(results: dict[str, Any], kind: str, **match: Any) -> list[str]:
    """The SAEs of one kind ("topk", "adaptivek", "batchtopk", "ablation"), in training order; ``match``
    keeps those whose entries equal the given values (e.g. ``inference="threshold"``)."""
    return [n for n, s in results["saes"].items() if s["kind"] == kind and all(s.get(k) == v for k, v in match.items())]


def points_table(results: dict[str, Any]) -> pd.DataFrame:
    """One row per SAE: ``name``, ``kind``, ``label``, mean L0 ``l0`` and each metric with ``_lo``/``_hi``
    (fve, cosine, mse; and ce with ``ce_l0``, the mean L0 at the spliced positions, when it was measured)."""
    rows = []
    for name, s in results["saes"].items():
        row = {"name": name, "kind": KINDS[s["kind"]], "label": sae_label(name, s), "l0": s["metrics"]["l0_mean"]}
        for m in ("fve", "cosine", "mse"):
            row |= {m: s["metrics"][m], f"{m}_lo": s["ci"][m]["lo"], f"{m}_hi": s["ci"][m]["hi"]}
        if "ce" in s:
            ci = s["ce"]["ci"]["ce"]
            row |= {"ce": s["ce"]["ce_sae"], "ce_lo": ci["lo"], "ce_hi": ci["hi"], "ce_l0": s["ce"]["l0_mean"]}
        rows.append(row)
    return pd.DataFrame(rows)


FRONTIER_PANELS = {"fve": ("FVE (higher is better)", "l0"), "cosine": ("cosine similarity (higher is better)", "l0"),
                   "mse": ("MSE per element (lower is better)", "l0"),
                   "ce": ("next-token CE, nats (lower is better)", "ce_l0")}


def plot_frontier(results: dict[str, Any], *, title: str | None = None):
    """Held-out reconstruction (and CE) against mean L0, one panel per metric: the TopK sweep as a line,
    every other SAE as a point with its 95 % interval as computed (a percentile bootstrap interval need
    not contain the estimate). Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    points = points_table(results)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (m, (panel, xcol)) in zip(axes.flat, FRONTIER_PANELS.items(), strict=True):
        if m not in points:
            ax.set_visible(False)
            continue
        topk, others = points[points.kind == "TopK"].sort_values(xcol), points[points.kind != "TopK"]
        sns.lineplot(data=topk, x=xcol, y=m, ax=ax, color=KIND_COLORS["TopK"], marker="o", label="TopK sweep")
        ax.vlines(others[xcol], others[f"{m}_lo"], others[f"{m}_hi"], color=others.kind.map(KIND_COLORS).tolist(),
                  alpha=0.6)
        sns.scatterplot(data=others, x=xcol, y=m, hue="kind", style="label", palette=KIND_COLORS, s=80, ax=ax,
                        legend=m == "fve")
        if m == "ce":
            ax.axhline(results["downstream"]["ce_clean"], color="grey", ls="--", lw=1, label="clean model")
        ax.set(xscale="log", xlabel="mean L0 (log scale)", ylabel="", title=panel)
    axes.flat[0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def matched_table(results: dict[str, Any]) -> pd.DataFrame:
    """Each point against the TopK frontier at its mean L0: its mean L0 and FVE, the differences in FVE,
    cosine, MSE and CE with intervals (:func:`fmt_diff`), and the loss recovered when measured."""
    rows = []
    for name, v in results["vs_topk"].items():
        s = results["saes"][name]
        rows.append({"SAE": sae_label(name, s), "mean L0": round(s["metrics"]["l0_mean"], 1),
                     "FVE": round(s["metrics"]["fve"], 3), "ΔFVE": fmt_diff(v["fve"]), "Δcosine": fmt_diff(v["cosine"]),
                     "ΔMSE": fmt_diff(v["mse"]), "ΔCE (nats)": fmt_diff(v.get("ce")),
                     "loss recovered": round(s["ce"]["frac_recovered"], 3) if "ce" in s else None})
    return pd.DataFrame(rows).set_index("SAE")


def k_range_table(results: dict[str, Any], paper_rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Our AdaptiveK k ranges beside the paper's k-range table (``adaptivek.paper.K_RANGE_ABLATION``),
    row by row in order: the paper's mean k, EV and cosine, our mean L0, FVE, cosine and ΔFVE vs TopK."""
    rows = []
    for (lo, hi), p in zip(results["config"]["k_ranges"], paper_rows, strict=False):  # the shorter
        name = f"adaptivek_{lo}_{hi}"
        m = results["saes"][name]["metrics"]
        rows.append({"paper k range": f"[{p['k_min']}, {p['k_max']}]", "paper avg k": p["k_mean"],
                     "paper EV": p["fve"], "paper cosine": p["cosine"], "our k range": f"[{lo}, {hi}]",
                     "our mean L0": round(m["l0_mean"], 1),
                     "avg k / k_max (paper, ours)": f"{p['k_mean'] / p['k_max']:.2f}, {m['l0_mean'] / hi:.2f}",
                     "our FVE": round(m["fve"], 3), "our cosine": round(m["cosine"], 3),
                     "our ΔFVE vs TopK": fmt_diff(results["vs_topk"][name]["fve"])})
    return pd.DataFrame(rows)


def ablation_table(results: dict[str, Any]) -> pd.DataFrame:
    """AdaptiveK minus each ablation (same k values, paired rows): the differences with intervals."""
    rows = [{"AdaptiveK minus": sae_label(name, results["saes"][name]), "ΔFVE": fmt_diff(d["fve"]),
             "Δcosine": fmt_diff(d["cosine"]), "ΔMSE": fmt_diff(d["mse"]), "ΔCE (nats)": fmt_diff(d.get("ce")),
             "ΔL0": round(d["l0"]["estimate"], 2)} for name, d in results["ablations"]["minus"].items()]
    return pd.DataFrame(rows).set_index("AdaptiveK minus")


def bin_label(b: dict[str, Any], n_bins: int) -> str:
    """A complexity bin's name and label range: "low\\n[2.1, 4.0]" (low/mid/high for three bins)."""
    name = ("low", "mid", "high")[b["bin"]] if n_bins == 3 else str(b["bin"])
    return f"{name}\n[{b['label_range'][0]:.1f}, {b['label_range'][1]:.1f}]"


def bins_table(results: dict[str, Any]) -> pd.DataFrame:
    """Per complexity bin and AdaptiveK / ablation SAE: the bin's MSE against the TopK frontier at the SAE's
    overall mean L0 (same budget) in % of the frontier's (``ΔMSE %`` with ``lo``/``hi``), and the bin's mean L0."""
    bins = results["by_complexity"]["bins"]
    names = [n for n in results["vs_topk"] if results["saes"][n]["kind"] in ("adaptivek", "ablation")]
    rows = []
    for b in (b for b in bins if "skipped" not in b):
        for n in names:
            d = b["vs_topk_same_budget"][n]["mse"]
            f = d["frontier"]
            rows.append({"bin": bin_label(b, len(bins)), "SAE": sae_label(n, results["saes"][n]),
                         "ΔMSE %": 100 * d["estimate"] / f, "lo": 100 * d["lo"] / f, "hi": 100 * d["hi"] / f,
                         "L0": b["saes"][n]["l0"]})
    return pd.DataFrame(rows)


def plot_bins(table: pd.DataFrame):
    """Two panels from :func:`bins_table`: ΔMSE % against the frontier per bin, and the mean L0 per bin."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    sns.barplot(data=table, x="bin", y="ΔMSE %", hue="SAE", ax=ax1)
    ax1.axhline(0, color="black", lw=0.8)
    ax1.set_title("MSE vs the TopK frontier at the same overall mean L0\n(negative: this bin is reconstructed better)")
    sns.barplot(data=table, x="bin", y="L0", hue="SAE", ax=ax2, legend=False)
    ax2.set_title("mean L0 received per bin")
    for ax in (ax1, ax2):
        ax.set_xlabel("complexity bin (label range)")
    fig.tight_layout()
    return fig


def bin_summary(results: dict[str, Any], name: str | None = None) -> dict[str, str]:
    """The lowest and highest complexity bins for one AdaptiveK SAE (default: the ablations' one):
    ``bin_low_dmse`` / ``bin_high_dmse`` (MSE vs the frontier at the same budget, %), ``bin_low_word`` /
    ``bin_high_word`` ("lower", "higher", "no different"), ``bin_low_l0`` / ``bin_high_l0`` and
    ``bin_sentence``, which says what the allocation did."""
    name = name or results["ablations"]["adaptivek"]
    lo_bin, hi_bin = results["by_complexity"]["bins"][0], results["by_complexity"]["bins"][-1]
    out, words = {}, {}
    for tag, b in (("low", lo_bin), ("high", hi_bin)):
        d = b["vs_topk_same_budget"][name]["mse"]
        words[tag] = direction(d, higher_better=False, words=("lower", "higher", "no different"))
        out |= {f"bin_{tag}_dmse": f"{100 * d['estimate'] / d['frontier']:+.1f}%", f"bin_{tag}_word": words[tag],
                f"bin_{tag}_l0": f"{b['saes'][name]['l0']:.0f}"}
    if words["low"] == "higher" and words["high"] == "lower":
        sentence = ("The allocation moves error from complex to simple contexts, the trade the method makes by "
                    "design; whether the trade is a net gain is what section 4 measures.")
    elif words["high"] == "lower":
        sentence = "Complex contexts gain without a measurable cost to simple ones."
    else:
        sentence = ("Complex contexts do not measurably gain from the extra latents they receive, so the "
                    "allocation buys nothing where it spends most.")
    return out | {"bin_sentence": sentence}


def downstream_table(results: dict[str, Any]) -> pd.DataFrame:
    """Per SAE with a downstream loss: mean L0 at the spliced positions, CE, ΔCE vs the clean model and the
    loss recovered (SAEs without one, e.g. the ablations on token rows, are left out)."""
    rows = []
    for name, s in results["saes"].items():
        if "ce" not in s:
            continue
        ce, ci = s["ce"], s["ce"]["ci"]["frac_recovered"]
        rows.append({"SAE": sae_label(name, s), "mean L0 (at these positions)": round(ce["l0_mean"], 1),
                     "CE (nats)": round(ce["ce_sae"], 3), "ΔCE vs clean": round(ce["delta_ce"], 3),
                     "loss recovered": fmt_ci(ce["frac_recovered"], ci["lo"], ci["hi"], digits=3)})
    return pd.DataFrame(rows).set_index("SAE")


def ce_halfwidth(results: dict[str, Any]) -> float:
    """Median half-width of the points' 95 % intervals of ΔCE against the frontier (NaN when none)."""
    import math
    import statistics

    widths = [(v["ce"]["hi"] - v["ce"]["lo"]) / 2 for v in results["vs_topk"].values()
              if "ce" in v and math.isfinite(v["ce"]["lo"])]
    return statistics.median(widths) if widths else math.nan


def _summarise(results: dict[str, Any], names: list[str], metric: str, higher_better: bool, lead: str) -> str:
    """"<lead> better than the TopK frontier ... for 2 of 3 k ranges; indistinguishable ... (each with its CI)"."""
    ws = [direction(results["vs_topk"][n].get(metric), higher_better) for n in names]
    counts = {w: ws.count(w) for w in dict.fromkeys(ws)}
    parts = "; ".join(f"{sae_label(n, results['saes'][n])}: {fmt_diff(results['vs_topk'][n].get(metric))}"
                      for n in names)
    return (f"{lead} " + "; ".join(f"{w} the TopK frontier at the same mean L0 for {c} of {len(ws)} k ranges"
                                   for w, c in counts.items()) + f" ({parts})")


def _verdict_ablation(results: dict[str, Any]) -> str:
    minus, vs = results["ablations"]["minus"], results["vs_topk"]
    w_shuf = direction(minus["shuffled_k"]["fve"])
    w_len = direction(minus["length_k"]["fve"]) if "length_k" in minus else None
    text = (f"With the same k values, AdaptiveK's FVE is {w_shuf} k assigned at random "
            f"({fmt_diff(minus['shuffled_k']['fve'])})"
            + (f" and {w_len} k assigned by text length ({fmt_diff(minus['length_k']['fve'])})" if w_len else "")
            + f". The random allocation itself is {direction(vs['shuffled_k']['fve'])} the TopK frontier "
            f"({fmt_diff(vs['shuffled_k']['fve'])}). ")
    if w_shuf == "better than":
        text += ("So choosing k by predicted complexity is better than spreading the same k values at random, "
                 "which means the probe's signal is used; whether it beats giving every context the same k is "
                 "the frontier comparison above.")
    else:
        text += ("So choosing k by predicted complexity is not measurably better than spreading the same k "
                 "values at random: the complexity signal does not show up in reconstruction here.")
    if w_len in ("indistinguishable from", "worse than"):
        text += " Text length, a signal that needs no probe and no labels, does as well as complexity."
    return text


def _verdict_paper(results: dict[str, Any]) -> str:
    ada = names_of(results, "adaptivek")
    beats = sum(direction(results["vs_topk"][n]["fve"]) == "better than" for n in ada)
    shuffled_beaten = direction(results["ablations"]["minus"]["shuffled_k"]["fve"]) == "better than"
    fves = [results["saes"][n]["metrics"]["fve"] for n in sorted(ada, key=lambda n: results["saes"][n]["k_range"][1])]
    ev = (f"Its absolute FVE rises with k_max ({', '.join(f'{v:.3f}' for v in fves)}), as in the paper's k-range "
          "table, but that is the ordinary sparsity trade-off, which TopK shows too."
          if len(fves) > 1 and all(a < b for a, b in zip(fves, fves[1:], strict=False)) else
          "Its absolute FVE does not rise steadily with k_max here, unlike the paper's k-range table.")
    claim = ("The paper says AdaptiveK outperforms fixed-k TopK in reconstruction, EV and cosine. At matched "
             "mean L0 on held-out contexts it beats the TopK frontier in FVE for")
    if beats == len(ada) and shuffled_beaten:
        return ("In reconstruction the claim holds here: AdaptiveK beats the TopK frontier at equal mean L0 for "
                f"every k range and beats its own shuffled-k control. {ev} Whether it also holds for next-token "
                "loss and at the paper's scale is a separate question (chapter 5's downstream verdict; the paper "
                "profiles).")
    if beats > 0:
        control = "" if shuffled_beaten else (", and not its shuffled-k control, so the complexity signal is not "
                                              "what helps")
        return (f"{claim} {beats} of {len(ada)} k ranges here{control}: the claim is only partly reproduced in "
                f"this setting. {ev}")
    return (f"{claim} none of the {len(ada)} k ranges here, so that claim is not reproduced in this setting. {ev} "
            "Comparing AdaptiveK with baselines scored by a different formula on different vectors, as the "
            "reference code did, cannot separate the two.")


def verdict_sentences(results: dict[str, Any]) -> dict[str, str]:
    """Chapter 5's verdicts, computed from the intervals: ``verdict_frontier`` (FVE and cosine vs the TopK
    frontier), ``verdict_ce`` (next-token CE), ``verdict_batchtopk``, ``verdict_ablation`` and
    ``verdict_paper`` (the paper's claim 2 in this setting). An interval entirely on one side of 0 is
    "better than" / "worse than"; one that contains 0 is "indistinguishable from"."""
    ada, btk = names_of(results, "adaptivek"), names_of(results, "batchtopk")
    frontier = (_summarise(results, ada, "fve", True, "In FVE, AdaptiveK is") + ". "
                + _summarise(results, ada, "cosine", True, "In cosine similarity it is") + ".")
    ce = (_summarise(results, ada, "ce", False, "In next-token CE, AdaptiveK is") + "."
          if "ce" in results["vs_topk"][ada[0]] else "Measured at every position for the SAEs of the decisive "
          "comparison (section 11)." if "splice" in results else "Not measured in this run.")
    batchtopk = ("BatchTopK, which adapts the number of latents per input without any probe, is " + "; ".join(
        f"{direction(results['vs_topk'][n]['fve'])} the frontier with its {s['inference']} (k = {s['k']}, mean L0 "
        f"{s['metrics']['l0_mean']:.0f}, ΔFVE {fmt_diff(results['vs_topk'][n]['fve'])})"
        for n, s in ((n, results["saes"][n]) for n in btk)) + ".") if btk else "Not trained in this run."
    return {"verdict_frontier": frontier, "verdict_ce": ce, "verdict_batchtopk": batchtopk,
            "verdict_ablation": _verdict_ablation(results), "verdict_paper": _verdict_paper(results)}


def latent_correlations(codes, y, *, min_fires: int = 5):
    """Pearson correlation of each latent's activation with the labels ``y [n]`` over the rows of
    ``codes [n, d_sae]`` (float64 [d_sae]; NaN for latents firing on fewer than ``min_fires`` rows)."""
    import torch

    from .stats import pearson

    codes = torch.as_tensor(codes)
    corr = pearson(codes.T.double(), torch.as_tensor(y, dtype=torch.float64)[None, :].expand(codes.shape[1], -1))
    return torch.where((codes > 0).sum(0) >= min_fires, corr, torch.full_like(corr, float("nan")))


def complexity_latents(codes, y, *, min_fires: int = 5) -> dict[str, int]:
    """Four latents worth showing, chosen by a fixed rule (:func:`latent_correlations`): the two most
    correlated with the labels, the most anti-correlated and the most frequent. Returns why -> latent."""
    import torch

    order = torch.argsort(torch.nan_to_num(latent_correlations(codes, y, min_fires=min_fires), nan=0.0))
    return {"most complexity-correlated": int(order[-1]), "second": int(order[-2]),
            "most anti-correlated": int(order[0]), "most frequent": int((torch.as_tensor(codes) > 0).sum(0).argmax())}


def latent_examples(codes, y, texts: list[str], tokenizer, latents: dict[str, int], *, max_length: int,
                    top: int = 3, width: int = 70, min_fires: int = 5) -> pd.DataFrame:
    """The ``top`` contexts that activate each latent most (``latents``: why -> index into ``codes [n, d_sae]``),
    with the activation, the label ``y`` and the end of the context (``texts``), its last token (the one
    the SAE reads) in brackets."""
    import torch

    codes, y = torch.as_tensor(codes), torch.as_tensor(y, dtype=torch.float64)
    fires, corr = (codes > 0).sum(0), latent_correlations(codes, y, min_fires=min_fires)
    rows = []
    for why, j in latents.items():
        for rank, i in enumerate(torch.argsort(codes[:, j], descending=True)[:top].tolist()):
            ids = tokenizer(texts[i], truncation=True, max_length=max_length)["input_ids"]
            tail = "…" + tokenizer.decode(ids[:-1])[-width:].replace("\n", " ") + f"[{tokenizer.decode(ids[-1:])}]"
            rows.append({"latent": f"{j} ({why}; r = {corr[j]:.2f}, fires on {int(fires[j])}/{len(codes)})",
                         "rank": rank + 1, "activation": round(float(codes[i, j]), 2),
                         "complexity": round(float(y[i]), 1), "context (end)": tail})
    return pd.DataFrame(rows).set_index(["latent", "rank"])


# ---- per-token complexity (chapter 2)


def label_by_position(label, position) -> pd.DataFrame:
    """Mean, quartiles and count of the labelled tokens at each position (NaN labels left out).

    Shows how a token's complexity label (:func:`adaptivek.tokens.prefix_labels`) evolves as its text is read.
    """
    import numpy as np

    df = pd.DataFrame({"position": np.asarray(position), "label": np.asarray(label, dtype=np.float64)}).dropna()
    g = df.groupby("position")["label"]  # one group per position
    return pd.DataFrame({"mean": g.mean(), "q25": g.quantile(0.25), "q75": g.quantile(0.75), "n": g.size()})


def label_spread(label, text_index) -> dict[str, float]:
    """Within-text and between-text standard deviation of the labelled tokens' labels.

    ``within``: root of the mean per-text variance (texts with at least two labelled tokens); ``between``:
    standard deviation of the per-text mean labels. Answers: does a label vary more along a text or across texts?
    """
    import numpy as np

    df = pd.DataFrame({"text": np.asarray(text_index), "label": np.asarray(label, dtype=np.float64)}).dropna()
    g = df.groupby("text")["label"]  # one group per text with any labelled token
    var = g.var(ddof=0)[g.size() >= 2]
    return {"within": float(np.sqrt(var.mean())), "between": float(g.mean().std(ddof=0)), "texts": int(g.ngroups)}


# ---- token-level probe (chapter 3)


def token_probe_table(rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The last-token and every-token probes side by side, one row per probe, formatted for display.

    Each entry of ``rows`` holds ``n_train``, ``n_train_documents``, ``n_test``, ``n_test_documents``, ``lambda``,
    ``lambda_at_edge``, ``pearson`` with ``pearson_lo``/``pearson_hi`` and ``r2``; a missing ``lambda`` shows
    as "-" (a row that reads an existing probe elsewhere). λ at the edge of its final grid is marked "(edge)".
    """
    out = {}
    for name, r in rows.items():
        lam = r.get("lambda")
        out[name] = {
            "train rows (documents)": f"{r['n_train']:,} ({r['n_train_documents']})",
            "test rows (documents)": f"{r['n_test']:,} ({r['n_test_documents']})",
            "λ": "-" if lam is None else f"{lam:g}" + (" (edge)" if r.get("lambda_at_edge") else ""),
            "Pearson [95 % CI over documents]": fmt_ci(r["pearson"], r["pearson_lo"], r["pearson_hi"]),
            "R²": f"{r['r2']:.2f}",
        }
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index.name = "probe"
    return table


def within_source_verdict(table: pd.DataFrame) -> str:
    """Answer "does the probe track complexity within a source, or mostly which source a text comes from?".

    From :func:`adaptivek.linear_encoding.within_source_scores`: compares the Pearson left after removing
    each source's training mean (row ``pooled, source means removed``) with the pooled one. Within a source
    too: its CI is above 0 and it keeps at least half the pooled Pearson; both, but mostly which source: CI
    above 0 but less than half; mostly which source: the CI reaches 0.
    """
    pooled = table.loc["pooled", "pearson"]
    w = table.loc["pooled, source means removed"]
    if not w["pearson_lo"] > 0:
        return ("mostly which source a text comes from: with each source's mean removed, its predictions do not "
                "reliably follow the labels (CI reaches 0)")
    if w["pearson"] >= 0.5 * pooled:
        return ("within a source too: with each source's mean removed, the correlation keeps at least half of "
                "the pooled Pearson")
    return ("both, but mostly which source: within sources the correlation is reliably above 0, yet less than "
            "half of the pooled Pearson")


# ---- regime tables (chapter 6)
#
# What each run's SAEs trained on and whether they generalise, read back from chapter 4's
# ``saes/training.json`` (keys ``sae_data``, ``counts``, ``regime``) and chapter 3's
# ``linear_encoding/token_probe.json``. A run without a file shows NOT_RUN; a training.json written before
# ``sae_data`` existed is a last-token run; a key such a file lacks shows "—".

NOT_RUN = "(not run)"
SAE_DATA_NAMES = {"last_token": "last token (one vector per context)", "all_tokens": "every kept token"}


def collect_regime(run_dir: str | Path) -> dict[str, Any]:
    """One run's data regime: ``sae_data`` (None when chapter 4 has not run), ``counts`` (rows, texts and
    documents per split, exclusions), ``regime`` (chapter 4's training vs held-out FVE rows) and
    ``token_probe`` (chapter 3's per-token probe, None when absent)."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"run": run_dir.name, "sae_data": None, "counts": {}, "regime": [], "token_probe": None}
    training = run_dir / "saes" / "training.json"
    if training.is_file():
        t = json.loads(training.read_text())
        counts = dict(t.get("counts") or {})
        for split in ("train", "test"):  # older files list the split's rows only
            if f"{split}_rows" not in counts and isinstance(t.get(split), list):
                counts[f"{split}_rows"] = len(t[split])
        out |= {"sae_data": t.get("sae_data") or "last_token", "counts": counts,
                "regime": [nan_for_null(r) for r in t.get("regime") or []]}
    probe = run_dir / "linear_encoding" / "token_probe.json"
    if probe.is_file():
        out["token_probe"] = json.loads(probe.read_text())
    return out


def _n(counts: dict[str, Any], *keys: str) -> str:
    """``"2,891,000"`` (several keys: joined by " / "); "—" for a key the run did not record."""
    return " / ".join(f"{int(counts[k]):,}" if counts.get(k) is not None else "—" for k in keys)


def regime_runs_table(regimes: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Per run (:func:`collect_regime` values by run name): what its SAEs trained on, the rows, texts and
    documents of each split, the unlabelled training rows and the tokens the exclusion rule removed."""
    rows = []
    for run, r in regimes.items():
        c = r["counts"]
        if r["sae_data"] is None:
            rows.append({"run": run, "SAE data": NOT_RUN})
            continue
        rows.append({"run": run, "SAE data": SAE_DATA_NAMES.get(r["sae_data"], r["sae_data"]),
                     "rows (train / held out)": _n(c, "train_rows", "test_rows"),
                     "texts (train / held out)": _n(c, "train_texts", "test_texts"),
                     "documents (train / held out)": _n(c, "train_documents", "test_documents"),
                     "unlabelled training rows": _n(c, "train_unlabelled"),
                     "excluded (position 0 / extreme norm)": (_n(c, "excluded_first_positions", "excluded_extreme_norm")
                                                              if r["sae_data"] == "all_tokens" else "none")})
    cols = ["run", "SAE data", "rows (train / held out)", "texts (train / held out)", "documents (train / held out)",
            "unlabelled training rows", "excluded (position 0 / extreme norm)"]
    return pd.DataFrame(rows, columns=cols).set_index("run").fillna(NOT_RUN)


def generalisation_runs_table(regimes: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Chapter 4's generalisation check per run and SAE: held-out mean L0, FVE on training and on held-out
    vectors, their gap, and PCA's held-out FVE with as many components as the SAE's mean L0."""
    rows = []
    for run, r in regimes.items():
        for g in r["regime"] or [{"sae": NOT_RUN}]:
            rows.append({"run": run, "SAE": g.get("sae"), "mean L0": g.get("l0"), "train FVE": g.get("train_fve"),
                         "held-out FVE": g.get("test_fve"), "gap": g.get("gap"), "PCA FVE (same L0)": g.get("pca_fve")})
    cols = ["run", "SAE", "mean L0", "train FVE", "held-out FVE", "gap", "PCA FVE (same L0)"]
    return pd.DataFrame(rows, columns=cols).set_index(["run", "SAE"]).astype(float).round(3)


def token_probe_runs_table(regimes: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Chapter 3's every-token probe per run: its layer, training and held-out tokens and documents, held-out
    Pearson with its interval (over documents) and R², beside the last-token probe's Pearson at that layer."""
    rows = []
    for run, r in regimes.items():
        p = r["token_probe"]
        if p is None:
            rows.append({"run": run, "layer": NOT_RUN})
            continue
        rows.append({"run": run, "layer": p.get("layer"), "tokens (train / held out)": _n(p, "n_train_tokens", "n_test_tokens"),
                     "documents (train / held out)": _n(p, "n_train_documents", "n_test_documents"),
                     "Pearson [95% CI]": _pearson(p, "pearson"), "R²": _num(p.get("r2")),
                     "last-token probe's Pearson": _pearson(p, "last_token_pearson")})
    cols = ["run", "layer", "tokens (train / held out)", "documents (train / held out)", "Pearson [95% CI]", "R²",
            "last-token probe's Pearson"]
    return pd.DataFrame(rows, columns=cols).set_index("run").fillna(NOT_RUN)


def _num(value: Any, digits: int = 3) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"  # value != value: NaN


def _pearson(p: dict[str, Any], key: str) -> str:
    """``p[key]`` with its interval (``key + "_lo"``, ``"_hi"``) when ``p`` has one, to 3 decimals."""
    if p.get(f"{key}_lo") is None or p.get(key) is None:
        return _num(p.get(key))
    return fmt_ci(p[key], p[f"{key}_lo"], p[f"{key}_hi"], digits=3)


def regime_summary(regime: dict[str, Any] | None, *, tolerance: float = 0.02) -> dict[str, str]:
    """The strings chapter 6 glues for one run (:func:`collect_regime`), each NOT_RUN where the run lacks it:
    ``sae_data``, ``train_rows``, ``test_rows``, ``train_documents``, ``test_documents``, ``max_gap`` (the
    largest training-minus-held-out FVE gap), ``gap_verdict`` (a sentence: a gap above ``tolerance`` means
    the SAEs fit their training vectors better than new ones), ``token_pearson`` (chapter 3's every-token
    probe) and ``last_token_pearson`` (its last-token probe at the same layer), each with its interval."""
    r = regime or {"sae_data": None, "counts": {}, "regime": [], "token_probe": None}
    c, out = r["counts"], dict.fromkeys(("sae_data", "train_rows", "test_rows", "train_documents", "test_documents",
                                         "max_gap", "gap_verdict", "token_pearson", "last_token_pearson"), NOT_RUN)
    if r["sae_data"] is not None:
        out |= {"sae_data": SAE_DATA_NAMES.get(r["sae_data"], r["sae_data"]),
                **{k: _n(c, k) for k in ("train_rows", "test_rows", "train_documents", "test_documents")}}
    gaps = [g["gap"] for g in r["regime"] if g.get("gap") is not None and g["gap"] == g["gap"]]
    if gaps:
        worst = max(gaps, key=abs)
        out["max_gap"] = f"{worst:+.3f}"
        out["gap_verdict"] = (f"training and held-out FVE agree within {tolerance} for every SAE, so they learned "
                              "features that carry over to new text" if abs(worst) <= tolerance else
                              f"the SAEs reconstruct their training vectors better than held-out ones (gap up to "
                              f"{worst:+.3f}), so part of what they learned is specific to the training set")
    if p := r["token_probe"]:
        out |= {"token_pearson": _pearson(p, "pearson"), "last_token_pearson": _pearson(p, "last_token_pearson")}
    return out


def profile_settings(params: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """:func:`profile_vs_paper` with one more row, the SAEs' training data (the paper: one last-token vector
    per context; ``all_tokens``: every kept token)."""
    table = profile_vs_paper(params)
    sae_data = (params.get("04_training") or {}).get("sae_data", (params.get("01_activations") or {}).get("sae_data"))
    row = {"setting": "SAE training data", "paper": "last_token", "profile": sae_data, "same": sae_data == "last_token"}
    return pd.concat([table, pd.DataFrame([row])], ignore_index=True)


def is_paper_profile(params: dict[str, dict[str, Any]]) -> bool:
    """Whether a profile's effective parameters (:func:`adaptivek.book.effective_parameters`) run one of the
    paper's models (also as a dry run's ``random:`` copy); ``quick`` and ``full`` do not."""
    from .paper import SETTINGS

    return str((params.get("01_activations") or {}).get("model", "")).removeprefix("random:") in SETTINGS["layers"]
