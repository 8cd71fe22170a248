"""Cost of the every-position splice (issue 13), measured in one run with interleaved repeats (median).

One SAE's share of :func:`adaptivek.evaluation.splice_metrics`: its reconstruction of every kept position,
the spliced forward pass (only the blocks after the layer run: the earlier blocks' output is the clean
pass's; logits only where a next token is scored) and the per-token CE and KL, divided by one clean forward
pass of the same batch with logits at every position (target: <= 1.5x). Also the whole
``splice_metrics`` call with one SAE (clean, zero- and mean-ablation, the SAE: about 4 forward passes) in
the same unit (``--whole``). Embedded SmolLM2-135M, a few texts of the embedded corpus truncated to 128 tokens, a TopK
SAE of chapter 5's size (random weights: the cost does not depend on them).

    .venv/bin/python benchmarks/splice.py [--texts 1] [--tokens 128] [--repeats 3] [--threads 2] [--whole]

Default run: under a minute on 2 CPU cores (model load included); torch uses 2 threads (``--threads``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import adaptivek
from adaptivek.evaluation import (
    _batch_positions,
    _CleanDist,
    _logits_trace,
    _nll_from_logits,
    _reconstruct_rows,
    _spliced_logits,
    _tokenize,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole", action="store_true", help="also time the whole splice_metrics call (4 passes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = adaptivek.load_model("smollm2-135m")
    pool = list(adaptivek.load_corpus("embedded", n=200, seed=1)["text"])
    lengths = [len(ids) for ids in lm.tokenizer(pool, truncation=True, max_length=args.tokens)["input_ids"]]
    texts = [t for t, n in zip(pool, lengths, strict=True) if n == args.tokens][: args.texts]
    d = adaptivek.d_model(lm)
    sae = adaptivek.TopKSAE(d, args.d_sae, args.k, seed=0).eval()
    mean = torch.zeros(d)
    ids, mask, pos = _batch_positions(lm, *_tokenize(lm.tokenizer, texts, args.tokens))
    where = (pos >= 1) & mask.bool()  # every position but the sink
    score = where.clone()
    score[:, -1] = False
    target = ids[:, 1:][score[:, :-1]]
    logits, h = _logits_trace(lm, args.layer, ids, mask, pos, read=True, at=score)
    ref = _CleanDist(logits)

    def clean():
        _logits_trace(lm, args.layer, ids, mask, pos)

    def one_sae():
        x_hat, _ = _reconstruct_rows(sae, h[where].float(), None, 1.0)
        z = _spliced_logits(lm, args.layer, (ids, mask, pos), h, where, x_hat, score)  # blocks after the layer
        _nll_from_logits(z, torch.logsumexp(z, -1), target)  # per-token CE
        ref.kl_to(z)  # per-token KL

    def whole():
        adaptivek.evaluation.splice_metrics(lm, {"topk": sae}, texts, args.layer, scale=1.0, mean=mean,
                                            max_norm=None, max_length=args.tokens, batch_size=len(texts))

    fns = {"clean": clean, "one_sae": one_sae} | ({"whole": whole} if args.whole else {})
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):  # interleaved: machine load affects them alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(texts)} texts x {args.tokens} tokens, layer {args.layer}, TopK d_sae={args.d_sae} k={args.k}, "
          f"{args.threads} thread(s), {args.repeats} repeats (median)")
    print(f"clean forward (logits at every position): {med['clean'] * 1e3:.0f} ms")
    print(f"one SAE spliced at every position (+ CE, KL): {med['one_sae'] * 1e3:.0f} ms -> "
          f"{med['one_sae'] / med['clean']:.2f}x one clean forward (target <= 1.5x)")
    if args.whole:
        print(f"splice_metrics with one SAE (clean, zero, mean, SAE): {med['whole'] * 1e3:.0f} ms -> "
              f"{med['whole'] / med['clean']:.2f}x one clean forward")


if __name__ == "__main__":
    main()
