"""Extraction speed, measured in one run with interleaved repeats (report min and median).

1. nnsight early stop at layer L vs a full transformers forward with output_hidden_states
   (target: >= 3x faster at L = 6 of 30);
2. nnsight early stop vs a plain PyTorch forward hook that raises after block L
   (target: nnsight overhead <= 10%).

    .venv/bin/python benchmarks/extract.py [--layer 6] [--batch 32] [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import adaptivek


class _Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    lm = adaptivek.load_model(args.model, device=args.device)
    hf, tok = lm._module, lm.tokenizer
    blocks = adaptivek.blocks(lm)
    hf_blocks = adaptivek.models._resolve(hf, adaptivek.models.model_info(lm)["block_path"])
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.tokens // 2, args.tokens + 1, (args.batch,), generator=g)
    ids = torch.randint(100, len(tok) - 100, (args.batch, args.tokens), generator=g)
    mask = (torch.arange(args.tokens)[None, :] < lengths[:, None]).long()
    ids, mask = ids.to(args.device), mask.to(args.device)
    rows = torch.arange(args.batch, device=args.device)
    last = lengths.to(args.device) - 1
    L = args.layer

    def nnsight_stop():
        with torch.inference_mode():
            with lm.trace(input_ids=ids, attention_mask=mask) as tracer:
                out = blocks[L].output[rows, last].save()
                tracer.stop()
        return out

    def hf_full():
        with torch.inference_mode():
            return hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[L + 1][rows, last]

    def hook_stop():
        saved = {}

        def hook(module, inputs, output):
            saved["h"] = (output[0] if isinstance(output, tuple) else output)[rows, last]
            raise _Stop

        handle = hf_blocks[L].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                hf(input_ids=ids, attention_mask=mask)
        except _Stop:
            pass
        finally:
            handle.remove()
        return saved["h"]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    fns = {"nnsight + stop": nnsight_stop, "HF full + hidden_states": hf_full, "plain hook + stop": hook_stop}
    a, b, c = (f() for f in fns.values())  # warm-up, and all three must agree
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, c, atol=1e-4), "methods disagree"
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    n_tok = int(mask.sum())
    print(f"model {args.model}, device {args.device}, layer {L} of {adaptivek.n_layers(lm)}, batch "
          f"{args.batch} x {args.tokens} tokens ({n_tok} real), {args.repeats} interleaved repeats")
    for name, ts in times.items():
        print(f"  {name:26s} min {min(ts) * 1e3:8.1f} ms  median {statistics.median(ts) * 1e3:8.1f} ms  "
              f"{n_tok / statistics.median(ts):8.0f} tok/s")
    full = times["HF full + hidden_states"]
    stop = times["nnsight + stop"]
    hook = times["plain hook + stop"]
    print(f"early stop vs full forward: {min(full) / min(stop):.2f}x (min), "
          f"{statistics.median(full) / statistics.median(stop):.2f}x (median)   target >= 3x")
    print(f"nnsight overhead vs plain hook: {min(stop) / min(hook) - 1:+.1%} (min), "
          f"{statistics.median(stop) / statistics.median(hook) - 1:+.1%} (median)   target <= 10%")


if __name__ == "__main__":
    main()
