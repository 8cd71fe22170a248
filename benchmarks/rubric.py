"""RubricScorer throughput on 10,000 embedded contexts (target: under a minute on a laptop CPU).

Run: ``python benchmarks/rubric.py [--n 10000]``. Reports the cold rate (first call in a fresh
process: word-frequency list, CMUdict and syllable cache loaded) and the warm rate (second call),
next to textstat's own per-text Flesch-Kincaid on a sample, for scale.
"""

from __future__ import annotations

import argparse
import time

from adaptivek.complexity import RubricScorer
from adaptivek.corpus import load_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    texts = load_corpus("embedded", n=args.n, seed=args.seed)["text"]
    print(f"load_corpus: {len(texts)} contexts in {time.perf_counter() - t0:.2f} s")

    scorer = RubricScorer()
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        scores = scorer.score(texts)
        dt = time.perf_counter() - t0
        print(f"RubricScorer ({label}): {len(texts)} contexts in {dt:.2f} s = {len(texts) / dt:,.0f} contexts/s")
    assert scores["complexity"].notna().all()

    import textstat

    sample = texts[:500]
    t0 = time.perf_counter()
    for t in sample:
        textstat.flesch_kincaid_grade(t)
    dt = time.perf_counter() - t0
    print(f"textstat.flesch_kincaid_grade alone, per text: {len(sample) / dt:,.0f} contexts/s (for scale)")


if __name__ == "__main__":
    main()
