"""Extraction sharded over processes with ``torch.distributed``.

``torchrun --nproc_per_node N -m adaptivek extract --model M --texts texts.jsonl --layers 3 --cache-dir C``
starts N processes; rank r extracts a contiguous shard of the texts and writes it to the cache
as its own entry. After a barrier, rank 0 writes a small manifest that says "the result for all
texts is the concatenation of these shards", so a later ``extract(lm, texts, 3, cache_dir=C)`` in
a single process returns the whole result without running the model. That reader checks that the
manifest's shards are the results for the texts in order and cover all of them, and verifies each
shard's checksum and shape; a manifest or shard that fails is recomputed with a ``CacheWarning``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .activations import _check_layers, _check_texts, extract, write_shard_manifest
from .checks import int_at_least


def shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal ``[start, stop)`` ranges of ``n`` items for each rank."""
    int_at_least(world_size, "world_size")
    edges = torch.linspace(0, n, world_size + 1).round().long().tolist()
    return list(zip(edges[:-1], edges[1:], strict=True))


def extract_sharded(lm, texts: Sequence[str], layers: Sequence[int], *, cache_dir: str | os.PathLike,
                    token: str = "last", max_length: int = 128, batch_size: int = 32,
                    progress: bool = True) -> None:
    """Run this rank's shard of ``extract`` and, on rank 0, write the manifests joining the shards.

    Uses the process group when one is initialised (torchrun), else behaves as a single rank.
    """
    import torch.distributed as dist

    texts = _check_texts(texts)
    layers = _check_layers(lm, list(layers))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(texts) < world:
        raise ValueError(f"{len(texts)} texts cannot be split over {world} processes; use fewer processes")
    bounds = shard_bounds(len(texts), world)
    start, stop = bounds[rank]
    extract(lm, texts[start:stop], layers, token=token, max_length=max_length, batch_size=batch_size,
            cache_dir=cache_dir, progress=progress and rank == 0)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        shards = [texts[a:b] for a, b in bounds]
        for ly in layers:
            write_shard_manifest(Path(cache_dir), lm, ly, token, max_length, texts, shards)
    if dist.is_initialized():
        dist.barrier()


def read_texts(path: str | os.PathLike, column: str = "text") -> list[str]:
    """Texts from a .txt (one per line), .jsonl/.json, .csv or .parquet file."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"texts file {path} does not exist")
    if path.suffix == ".txt":
        return [line for line in path.read_text().splitlines() if line.strip()]
    readers = {".jsonl": lambda p: pd.read_json(p, lines=True), ".json": pd.read_json,
               ".csv": pd.read_csv, ".parquet": pd.read_parquet}
    if path.suffix not in readers:
        raise ValueError(f"{path}: unsupported texts file type; use .txt, .jsonl, .json, .csv or .parquet")
    df = readers[path.suffix](path)
    if column not in df.columns:
        raise ValueError(f"{path} has no {column!r} column (columns: {list(df.columns)})")
    return df[column].tolist()


def main_extract(args) -> None:
    """Entry point of ``adaptivek extract`` (plain or under torchrun)."""
    import torch.distributed as dist

    from .models import load_model

    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    device = args.device
    if device.startswith("cuda") and dist.is_initialized():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        lm = load_model(args.model, device=device, dtype=args.dtype)
        layers = [int(x) for x in args.layers.split(",")]
        extract_sharded(lm, read_texts(args.texts, args.column), layers, cache_dir=args.cache_dir,
                        token=args.token, max_length=args.max_length, batch_size=args.batch_size)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
