"""Residual-stream activations with nnsight: early stop, correct last token, on-disk cache.

``extract(lm, texts, layer)`` returns the output of decoder block ``layer`` (transformers'
``hidden_states[layer + 1]``, before any final norm). The forward pass stops after the deepest
requested block, so reading layer 3 of a 30-layer model costs about 4/30 of a full pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import torch

from .checks import int_at_least, text_list
from .io import atomic_path, save_tensors
from .models import blocks, model_device, model_info, n_layers

Token = Literal["last", "all"]
CACHE_FORMAT = 1


def _check_texts(texts: Sequence[str]) -> list[str]:
    """A non-empty list of strings, each with something to read."""
    texts = text_list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one non-empty string")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty or whitespace; it has no token to read, drop it")
    return texts


def _check_layers(lm, layer: int | Sequence[int]) -> list[int]:
    many = not isinstance(layer, int)
    layers = list(layer) if many else [layer]
    if not layers:
        raise ValueError("layer is an empty list; pass an int or a non-empty list of ints")
    n = n_layers(lm)
    for ly in layers:
        if isinstance(ly, bool) or not isinstance(ly, int):
            raise TypeError(f"layer must be an int or a list of ints, got {ly!r}")
        if not 0 <= ly < n:
            raise ValueError(f"layer {ly} is out of range: this model has {n} blocks, valid layers are 0..{n - 1}")
    return sorted(set(layers))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token in each row, for left *or* right padding. [B, T] -> [B]"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(dim=1)


def _cache_key(lm, layer: int, token: str, max_length: int, texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    info = model_info(lm)
    meta = {"model": info["name"], "revision": info["revision"], "block_path": info["block_path"],
            "layer": layer, "token": token, "max_length": max_length, "texts": h.hexdigest(),
            "format": CACHE_FORMAT}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]


def _cache_load(cache_dir: Path, key: str):
    """A cached result, or one assembled from the shards of a distributed run, or None."""
    from safetensors.torch import load_file

    meta, data = cache_dir / f"{key}.json", cache_dir / f"{key}.safetensors"
    if meta.is_file() and data.is_file():  # the JSON is written last: it marks completion
        t = load_file(str(data))
        return (t["acts"], t["text_index"]) if "text_index" in t else t["acts"]
    manifest = cache_dir / f"{key}.shards.json"
    if not manifest.is_file():
        return None
    shards = json.loads(manifest.read_text())["shards"]  # [{"key": ..., "n_texts": ...}] in text order
    parts = [_cache_load(cache_dir, s["key"]) for s in shards]
    if any(p is None for p in parts):
        return None
    if not isinstance(parts[0], tuple):
        return torch.cat(parts)
    offsets = torch.tensor([0] + [s["n_texts"] for s in shards[:-1]]).cumsum(0)
    return (torch.cat([a for a, _ in parts]),
            torch.cat([i + off for (_, i), off in zip(parts, offsets.tolist(), strict=True)]))


def write_shard_manifest(cache_dir: Path, lm, layer: int, token: str, max_length: int,
                         texts: list[str], shards: list[list[str]]) -> None:
    """Record that the result for ``texts`` is the concatenation of the results for ``shards``."""
    entry = {"shards": [{"key": _cache_key(lm, layer, token, max_length, sh), "n_texts": len(sh)} for sh in shards],
             "format": CACHE_FORMAT}
    with atomic_path(cache_dir / f"{_cache_key(lm, layer, token, max_length, texts)}.shards.json", ".json") as tmp:
        tmp.write_text(json.dumps(entry, indent=2))


def _cache_meta(lm, layer: int, token: str, max_length: int, n_texts: int) -> dict:
    """The readable JSON written beside a cached result (written last: it marks the entry complete)."""
    info = model_info(lm)
    return {"model": info["name"], "revision": info["revision"], "layer": layer, "token": token,
            "max_length": max_length, "n_texts": n_texts, "format": CACHE_FORMAT}


def _cache_store(cache_dir: Path, key: str, value, meta: dict) -> None:
    tensors = {"acts": value[0], "text_index": value[1]} if isinstance(value, tuple) else {"acts": value}
    save_tensors(cache_dir / f"{key}.safetensors", tensors)
    with atomic_path(cache_dir / f"{key}.json", ".json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


@overload
def extract(lm, texts: Sequence[str], layer: int, **kw) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
@overload
def extract(lm, texts: Sequence[str], layer: Sequence[int], **kw) -> dict: ...


def extract(
    lm,
    texts: Sequence[str],
    layer: int | Sequence[int],
    *,
    token: Token = "last",
    max_length: int = 128,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    padding_side: Literal["left", "right"] = "right",
    remote: bool = False,
):
    """Residual stream after decoder block(s) ``layer`` for each text, via nnsight.

    Args:
        lm: a model from :func:`adaptivek.load_model` (or ``models.wrap_model``).
        texts: non-empty strings; each is truncated to ``max_length`` tokens.
        layer: an int, or a list of ints read in one forward pass (returns ``{layer: result}``).
        token: ``"last"`` -> ``[len(texts), d_model]`` at each text's last real token;
            ``"all"`` -> ``(acts [n_tokens, d_model], text_index [n_tokens])`` without padding.
        max_length: truncation length in tokens (>= 1).
        batch_size: texts per forward pass; texts are sorted by length so batches pad little.
        cache_dir: if given, results are stored there keyed by (model, revision, layer, token,
            max_length, texts) and reused by later calls.
        progress: show a tqdm progress bar over batches.
        padding_side: how batches are padded; both give the same result (position ids and the
            last-token index are computed from the attention mask).
        remote: passed to ``lm.trace`` for NDIF users (needs an NDIF API key and network).

    Returns float32 CPU tensors.
    """
    texts = _check_texts(texts)
    layers = _check_layers(lm, layer)
    if token not in ("last", "all"):
        raise ValueError(f"token must be 'last' or 'all', got {token!r}")
    int_at_least(max_length, "max_length")
    int_at_least(batch_size, "batch_size")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

    cache = Path(cache_dir) if cache_dir is not None else None
    keys = {ly: _cache_key(lm, ly, token, max_length, texts) for ly in layers} if cache is not None else {}
    results = {ly: hit for ly, key in keys.items() if (hit := _cache_load(cache, key)) is not None}
    todo = [ly for ly in layers if ly not in results]
    if todo:
        computed = _run(lm, texts, todo, token, max_length, batch_size, progress, padding_side, remote)
        for ly in todo:
            results[ly] = computed[ly]
            if cache is not None:
                _cache_store(cache, keys[ly], computed[ly], _cache_meta(lm, ly, token, max_length, len(texts)))
    if isinstance(layer, int):
        return results[layer]
    return {ly: results[ly] for ly in layers}


def _run(lm, texts, layers, token, max_length, batch_size, progress, padding_side, remote):
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    device = model_device(lm)
    envoys = blocks(lm)
    deepest = max(layers)
    # tokenise once (no padding) to sort by length: batches of similar length pad little
    lengths = torch.tensor([len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]])
    if (lengths == 0).any():
        i = int((lengths == 0).nonzero()[0])
        raise ValueError(f"texts[{i}] tokenises to zero tokens; drop it")
    order = torch.argsort(lengths, descending=True, stable=True)
    last_parts: dict[int, list[torch.Tensor]] = {ly: [] for ly in layers}
    all_parts: dict[int, list[torch.Tensor]] = {ly: [] for ly in layers}
    index_parts: list[torch.Tensor] = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=f"extract layers {layers}", disable=not progress, unit="batch"):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx.tolist()], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt", padding_side=padding_side)
        mask = enc["attention_mask"].to(device)
        input_ids = enc["input_ids"].to(device)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # right for left padding too
        outs = _trace_batch(lm, envoys, layers, deepest, input_ids, mask, position_ids, remote)
        if token == "last":
            rows = torch.arange(len(idx), device=device)
            last = last_token_index(mask)
            for ly in layers:
                last_parts[ly].append(outs[ly][rows, last].float().cpu())
        else:
            keep = mask.bool()  # [B, T]
            for ly in layers:
                all_parts[ly].append(outs[ly][keep].float().cpu())  # [n_real, d]
            index_parts.append(idx[:, None].expand(keep.shape)[keep.cpu()])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    if token == "last":
        return {ly: torch.cat(last_parts[ly])[inverse] for ly in layers}
    # "all": restore text order; tokens of one text stay in sequence order
    text_index = torch.cat(index_parts)
    perm = torch.argsort(text_index, stable=True)
    return {ly: (torch.cat(all_parts[ly])[perm], text_index[perm]) for ly in layers}


def _trace_batch(lm, envoys, layers, deepest, input_ids, mask, position_ids, remote):
    """One nnsight trace that saves the residual stream of ``layers`` and stops after ``deepest``."""
    import nnsight

    with torch.inference_mode():
        with lm.trace(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      remote=remote) as tracer:
            saved = nnsight.save([envoys[ly].output for ly in layers])
            tracer.stop()  # blocks after `deepest` never run
    out = {}
    for ly, value in zip(layers, saved, strict=True):
        out[ly] = value[0] if isinstance(value, tuple) else value  # GPT-2-style blocks return tuples
    return out


def truncate_to_tokens(tokenizer, texts: Sequence[str], max_length: int) -> list[str]:
    """The part of each text the model actually sees at ``max_length`` tokens, as text.

    Labels must describe what the model read: scoring a 200-word context whose activations
    were taken after 128 tokens would pair a label with text the model never saw.
    Texts that already fit are returned unchanged (no decode round-trip).
    """
    texts = _check_texts(texts)
    int_at_least(max_length, "max_length")
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    full = tokenizer(texts)["input_ids"]
    out = []
    for text, offsets, ids in zip(texts, enc["offset_mapping"], full, strict=True):
        if len(ids) <= max_length:
            out.append(text)
        else:
            out.append(text[: offsets[-1][1]].rstrip())
    return out
