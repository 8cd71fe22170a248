"""Cost of verifying an activation-cache entry on read, measured in one run (interleaved repeats).

A realistic entry: 128k texts x 576 float32 (SmolLM2's width), 295 MB. Three ways to read it, each
followed by one pass over the values (what any use of the activations does):

1. unverified: ``safetensors.load_file`` as the cache did before (it maps the file lazily, so the
   pass over the values is where the bytes are read);
2. verified: ``activations._read_entry`` (size, checksum of the whole file, shapes vs the request),
   with the checksum the cache uses (xxh3-128 when ``xxhash`` is installed);
3. the same check with sha256, for comparison.

The whole file is hashed: that catches any flipped bit, a truncation and swapped blocks. The file
is in the page cache (just written), so this is the worst case for the ratio: from disk, reading
dominates and the ratio is closer to 1.

    .venv/bin/python benchmarks/cache.py [--rows 131072] [--width 576] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from adaptivek import activations as act
from adaptivek.io import digest_algorithm, file_digest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    spec = act._Spec(model="benchmark", dtype="torch.float32", block_path="model.layers", layer=0, token="last",
                     max_length=128, d_model=args.width)
    acts = torch.randn(args.rows, args.width, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d)
        act._store(cache, "entry", acts, spec, args.rows, {"name": "benchmark", "revision": None})
        path = cache / "entry.safetensors"

        def unverified():
            return float(load_file(str(path))["acts"].sum())

        def verified():
            return float(act._read_entry(cache, "entry", spec, args.rows).sum())

        def verified_sha256():
            file_digest(path, "sha256")
            return float(load_file(str(path))["acts"].sum())

        fns = {"unverified": unverified, f"verified ({digest_algorithm()})": verified,
               "verified (sha256)": verified_sha256}
        assert len({round(f(), 3) for f in fns.values()}) == 1, "the reads disagree"  # warm-up too
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        size = path.stat().st_size
    print(f"entry {args.rows} x {args.width} float32 ({size / 1e6:.0f} MB, in the page cache), "
          f"read + one pass over the values, {args.repeats} interleaved repeats")
    base = times["unverified"]
    for name, ts in times.items():
        print(f"  {name:22s} min {min(ts) * 1e3:7.1f} ms  median {statistics.median(ts) * 1e3:7.1f} ms  "
              f"ratio {min(ts) / min(base):.2f}x (min)  {statistics.median(ts) / statistics.median(base):.2f}x (median)")


if __name__ == "__main__":
    main()
