"""Chapter 5's decisive comparison as tables, a plot and verdict sentences, all read off the results JSON.

:func:`~adaptivek.comparison.compare` writes ``results["decision"]`` (AdaptiveK against TopK at its budget and
every SAE it is compared with directly, over seeds and held-out documents: :mod:`adaptivek.decision`) and,
with ``splice``, ``results["splice"]`` (CE loss recovered and KL at every position). Every sentence here is
computed from those intervals; nothing is typed in by hand.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .decision import family_error_rate
from .report import direction, fmt_ci, fmt_diff

LABELS = {"adaptivek": "AdaptiveK", "shuffled_k": "shuffled k", "length_k": "position k", "norm_k": "norm k",
          "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}
"""How each SAE of the decision block is called in prose (``length_k`` on token rows is the token position)."""


def _own(row: dict[str, Any]) -> bool:
    """An interval row of the SAE itself, not a difference (``versus`` is null, NaN after ``load_results``)."""
    return not isinstance(row["versus"], str)


def _label(key: str) -> str:
    return LABELS.get(key, key.replace("matched_", "TopK k="))


def decision_table(results: dict[str, Any]) -> pd.DataFrame:
    """One row per SAE of the decisive comparison: mean L0, held-out FVE (mean over seeds, interval over
    seeds and documents), each seed's FVE, FVE minus TopK at the same L0, and, when spliced, CE loss
    recovered (vs zero ablation) and KL at every position, and the dead / dense latent shares (over seeds)."""
    dec, sp = results["decision"], results.get("splice", {})
    ci = {r["sae"]: r for r in sp.get("intervals", []) if _own(r) and r["metric"] == "frac_recovered_zero"}
    kl = {r["sae"]: r for r in sp.get("intervals", []) if _own(r) and r["metric"] == "kl"}
    rows = []
    for key, s in dec["saes"].items():
        name = dec["names"].get(key, key)
        vs = dec["vs_topk"].get(key, {}).get("fve")
        rows.append({"SAE": _label(key), "mean L0": round(s["l0"]["estimate"], 1),
                     "held-out FVE": fmt_ci(s["fve"]["estimate"], s["fve"]["lo"], s["fve"]["hi"], digits=3),
                     "FVE per seed": ", ".join(f"{v:.3f}" for v in s["fve"]["per_seed"]),
                     "ΔFVE vs TopK, same L0": fmt_diff(vs, 4) if vs else "(is TopK)",
                     "CE recovered": fmt_ci(ci[name]["estimate"], ci[name]["lo"], ci[name]["hi"], digits=3)
                     if name in ci else "—",
                     "KL (nats)": fmt_ci(kl[name]["estimate"], kl[name]["lo"], kl[name]["hi"], digits=3)
                     if name in kl else "—",
                     "dead / dense latents": _health(dec.get("health", {}).get(key))})
    return pd.DataFrame(rows).set_index("SAE")


def _health(h: dict[str, Any] | None) -> str:
    """``dead % / dense %`` averaged over seeds (dense: firing on more than 10% of held-out tokens)."""
    return "—" if not h else f"{100 * h['dead_frac']:.1f}% / {100 * h['dense_frac']:.1f}%"


def _matched_sentence(dec: dict[str, Any]) -> str:
    d, ks = dec["vs_topk"]["adaptivek"]["fve"], [m.split("_")[-1] for m in dec["matched"]]
    l0 = dec["saes"]["adaptivek"]["l0"]["estimate"]
    per_seed = ", ".join(f"{v:+.4f}" for v in d["per_seed"])
    return (f"Against TopK at exactly its budget (mean L0 {l0:.2f}; TopK read between k = {' and '.join(ks)}), "
            f"AdaptiveK's held-out FVE is {direction(d)} TopK's: ΔFVE {fmt_diff(d, 4)} over {dec['n_seeds']} seeds "
            f"and {dec['n_documents']} held-out documents (seed by seed {per_seed}; seed sd {d['seed_sd']:.4f}).")


def _ablation_sentence(dec: dict[str, Any]) -> str:
    abl = [k for k in dec["vs"] if k.endswith("_k")]
    if not abl:
        return "No ablation was trained in this run."
    parts = [f"{direction(dec['vs'][k]['fve'])} {_label(k)} (ΔFVE {fmt_diff(dec['vs'][k]['fve'], 4)})" for k in abl]
    n_better = sum(direction(dec["vs"][k]["fve"]) == "better than" for k in abl)
    return (f"With the same multiset of k values, AdaptiveK is {'; '.join(parts)}. It beats {n_better} of "
            f"{len(abl)} ablations; its claim needs all {len(abl)}.")


def _baseline_sentence(dec: dict[str, Any], key: str, what: str) -> str:
    if key not in dec["vs"]:
        return f"{_label(key)} was not trained in this run."
    own, d = dec["vs_topk"][key]["fve"], dec["vs"][key]["fve"]
    l0 = dec["saes"][key]["l0"]["estimate"]
    return (f"{_label(key)} ({what}; mean held-out L0 {l0:.1f}) is {direction(own)} TopK at its own L0 (ΔFVE "
            f"{fmt_diff(own, 4)}); AdaptiveK minus {_label(key)}: ΔFVE {fmt_diff(d, 4)}, so AdaptiveK is "
            f"{direction(d)} it.")


def _splice_sentence(results: dict[str, Any]) -> str:
    sp = results.get("splice")
    if not sp:
        return "CE loss recovered and KL at every position were not measured in this run."
    ada, rows = sp["adaptivek"], sp["intervals"]
    own = {r["sae"]: r for r in rows if _own(r) and r["metric"] == "frac_recovered_zero"}
    vs = {r["sae"]: r for r in rows if r["versus"] == ada and r["metric"] == "frac_recovered_zero"}
    kl = {r["sae"]: r for r in rows if _own(r) and r["metric"] == "kl"}
    labels = {n: _label(k) for k, n in results["decision"].get("names", {}).items()}
    others = "; ".join(f"{labels.get(n, _label(n))} {own[n]['estimate']:.3f} (AdaptiveK minus it "
                       f"{fmt_diff(_neg(vs[n]), 3)}: AdaptiveK is {direction(_neg(vs[n]))} it)"
                       for n in own if n != ada)
    return (f"Spliced at every kept position of {sp['n_texts']} held-out texts ({sp['n_tokens']:,} scored tokens), "
            f"AdaptiveK recovers {fmt_ci(own[ada]['estimate'], own[ada]['lo'], own[ada]['hi'], digits=3)} of the "
            f"next-token loss lost to zero ablation, with a mean KL of {kl[ada]['estimate']:.3f} nats from the clean "
            f"model's prediction; "
            f"{others}.")


def _neg(d: dict[str, float]) -> dict[str, float]:
    return {"estimate": -d["estimate"], "lo": -d["hi"], "hi": -d["lo"]}


def _oracle_sentence(dec: dict[str, Any]) -> str:
    o = dec.get("oracle")
    if not o:
        return "The oracle allocation was not computed in this run."
    return (f"With the dictionary of TopK k = {o['k']}, the best possible per-token choice of k at AdaptiveK's "
            f"budget ({o['budget']:.2f}) would raise held-out FVE by {o['headroom']:+.4f} over the same k everywhere; "
            f"applying AdaptiveK's own allocation to that dictionary changes it by {o['probe']:+.4f}, and "
            f"allocating by the vector's norm by {o['norm']:+.4f}.")


def _precondition_sentence(dec: dict[str, Any]) -> str:
    p = dec["precondition"]
    ci = fmt_ci(p["estimate"], p["lo"], p["hi"])
    if p["lo"] > 0:
        return (f"A fixed-k TopK's per-token relative error does rise with the probe's predicted complexity "
                f"(Pearson r = {ci}), so there is something for allocation by complexity to exploit.")
    return (f"A fixed-k TopK's per-token relative error does not rise with predicted complexity (Pearson r = {ci}): "
            f"allocating k by complexity has nothing to exploit here.")


def _power_sentence(dec: dict[str, Any]) -> str:
    d = dec["vs_topk"]["adaptivek"]["fve"]
    return (f"The smallest ΔFVE this run detects with 80% power is {d['mde']:.4f} (2.8 × its standard error "
            f"{d['se']:.4f}); the paper gives no number for this difference that we could recover, only Pareto "
            f"plots, so an 'indistinguishable' here rules out gains larger than about that size, not smaller ones.")


def decision_verdicts(results: dict[str, Any]) -> dict[str, str]:
    """One sentence per question (``dv_*`` glue keys), computed from ``results["decision"]`` and ``["splice"]``."""
    dec = results["decision"]
    if "skipped" in dec:
        why = f"Not decided in this run: {dec['skipped']}"
        return dict.fromkeys(("dv_matched", "dv_ablations", "dv_batchtopk", "dv_jumprelu", "dv_splice",
                              "dv_oracle", "dv_precondition", "dv_power", "dv_caveat", "dv_overall"), why)
    rate = family_error_rate(dec["n_comparisons"])
    return {"dv_matched": _matched_sentence(dec), "dv_ablations": _ablation_sentence(dec),
            "dv_batchtopk": _baseline_sentence(dec, "batchtopk", "threshold calibrated on validation documents"),
            "dv_jumprelu": _baseline_sentence(dec, "jumprelu", "learned thresholds, L0 steered to AdaptiveK's"),
            "dv_splice": _splice_sentence(results), "dv_oracle": _oracle_sentence(dec),
            "dv_precondition": _precondition_sentence(dec), "dv_power": _power_sentence(dec),
            "dv_caveat": (f"These are {dec['n_comparisons']} comparisons at 95% each: if no SAE differed from "
                          f"AdaptiveK, the chance that at least one interval would still exclude 0 is about "
                          f"{rate:.0%}, so a lone 'better' or 'worse' needs that discount."),
            "dv_overall": _overall(dec)}


def _overall(dec: dict[str, Any]) -> str:
    matched = direction(dec["vs_topk"]["adaptivek"]["fve"])
    abl = [k for k in dec["vs"] if k.endswith("_k")]
    beats_all = all(direction(dec["vs"][k]["fve"]) == "better than" for k in abl)
    rivals = [k for k in ("batchtopk", "jumprelu") if k in dec["vs"]
              and direction(dec["vs"][k]["fve"]) == "worse than"]
    use = matched == "better than" and beats_all and not rivals
    n_abl = sum(direction(dec["vs"][k]["fve"]) == "better than" for k in abl)
    return (f"Should a reader use AdaptiveK instead of TopK in this setting? {'Yes' if use else 'No'}: it is "
            f"{matched} TopK at its budget and beats {n_abl} of the {len(abl)} ablations"
            + (f", and it is worse than {' and '.join(_label(r) for r in rivals)}" if rivals else "") + ".")


def splice_table(results: dict[str, Any]) -> pd.DataFrame:
    """Per spliced SAE: mean L0 at the spliced positions, CE, ΔCE vs clean, loss recovered against zero and
    mean ablation and KL to the clean model, each with its interval over documents."""
    sp = results["splice"]
    ci = {(r["sae"], r["metric"]): r for r in sp["intervals"] if _own(r)}

    def cell(name: str, metric: str) -> str:
        r = ci[(name, metric)]
        return fmt_ci(r["estimate"], r["lo"], r["hi"], digits=3)

    rows = [{"SAE": _label(name), "mean L0": round(s["l0_mean"], 1), "CE (nats)": round(s["ce_sae"], 3),
             "ΔCE vs clean": cell(name, "delta_ce"), "recovered vs zero ablation": cell(name, "frac_recovered_zero"),
             "recovered vs mean ablation": cell(name, "frac_recovered_mean"), "KL (nats)": cell(name, "kl")}
            for name, s in sp["saes"].items()]
    return pd.DataFrame(rows).set_index("SAE")


def downstream_facts(results: dict[str, Any]) -> dict[str, str]:
    """The downstream section's glue values for either measurement: ``ce_n`` (texts), ``ce_where``,
    ``ce_clean``, ``ce_ablate`` and ``ce_seconds``."""
    if "splice" in results:
        sp = results["splice"]
        return {"ce_n": str(sp["n_texts"]), "ce_clean": f"{sp['ce_clean']:.3f}",
                "ce_ablate": f"{sp['ce_zero_ablate']:.3f} (zero ablation; mean ablation {sp['ce_mean_ablate']:.3f})",
                "ce_where": f"at every kept position, {sp['n_tokens']:,} scored tokens",
                "ce_seconds": f"{sp['seconds']:.0f}"}
    ds = results["downstream"]
    if "n" not in ds:
        return dict.fromkeys(("ce_n", "ce_clean", "ce_ablate", "ce_where", "ce_seconds"), "(not run)")
    return {"ce_n": str(ds["n"]), "ce_clean": f"{ds['ce_clean']:.3f}", "ce_ablate": f"{ds['ce_ablate']:.3f} (mean ablation)",
            "ce_where": "at one position per text, the second-to-last token", "ce_seconds": f"{ds['seconds']:.0f}"}


def oracle_table(results: dict[str, Any]) -> pd.DataFrame:
    """ΔFVE over the uniform allocation by budget and method (oracle, AdaptiveK's allocation, norm), with
    AdaptiveK's own point (its FVE minus TopK's at its budget) as a separate row."""
    o = results["decision"].get("oracle")
    if not o:
        return pd.DataFrame()
    return pd.DataFrame(o["table"])


def plot_oracle(results: dict[str, Any], ax: Any = None) -> Any:
    """ΔFVE vs budget: the oracle bound, AdaptiveK's allocation on the TopK dictionary, the norm allocation,
    and AdaptiveK itself at its budget (trained with its own k), on one axis."""
    import matplotlib.pyplot as plt

    table, dec = oracle_table(results), results["decision"]
    ax = ax or plt.subplots(figsize=(6.5, 4))[1]
    for method, part in table[table["method"] != "uniform"].groupby("method", sort=False):
        ax.plot(part["budget"], part["delta_fve"], marker="o", label=method)
    d, l0 = dec["vs_topk"]["adaptivek"]["fve"], dec["saes"]["adaptivek"]["l0"]["estimate"]
    if math.isfinite(d["estimate"]):
        ax.errorbar([l0], [d["estimate"]], yerr=[[d["estimate"] - d["lo"]], [d["hi"] - d["estimate"]]], fmt="s",
                    color="black", label="AdaptiveK (own dictionary) vs TopK")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="budget: mean k per token", ylabel="ΔFVE vs the same k everywhere",
           title="How much could any per-token allocation gain?")
    ax.legend(fontsize=8)
    return ax


__all__ = ["decision_table", "decision_verdicts", "oracle_table", "plot_oracle", "splice_table", "downstream_facts",
           "LABELS"]
