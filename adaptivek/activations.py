"""Residual-stream activations with nnsight: early stop, correct last token, verified on-disk cache.

``extract(lm, texts, layer)`` returns the output of decoder block ``layer`` (transformers'
``hidden_states[layer + 1]``, before any final norm). The forward pass stops after the deepest
requested block, so reading layer 3 of a 30-layer model costs about 4/30 of a full pass.

The cache (``cache_dir``) stores one result per key. The key covers everything that changes the
result: the model's content identity (:func:`adaptivek.models.model_fingerprint`: a checksum of
its weights, not its name or path), the weights' dtype, the block path, the layer, the token mode,
``max_length``, the texts and :data:`CACHE_FORMAT`. Each entry is ``<key>.safetensors`` plus
``<key>.json`` (written last: it marks the entry complete), which records the tensor file's size
and checksum. Every read verifies the size, the checksum and the shapes against the request (rows
per text, ``d_model``); a shard manifest (from :mod:`adaptivek.distributed`) must cover the texts
in order. An entry that fails is never returned: ``extract`` recomputes and rewrites it with a
:class:`~adaptivek.io.CacheWarning` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch

from .checks import int_at_least, integer, text_list
from .io import CacheError, CacheWarning, atomic_path, file_digest, write_json
from .models import blocks, d_model, model_device, model_fingerprint, model_info, n_layers

Token = Literal["last", "all"]
CACHE_FORMAT = 2  # bump when what extract computes or how entries are stored changes


def _check_texts(texts: Sequence[str]) -> list[str]:
    """A non-empty list of strings, each with something to read and valid Unicode."""
    texts = text_list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one non-empty string")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty or whitespace; it has no token to read, drop it")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"texts[{i}] holds a lone surrogate {t[e.start]!r} at character {e.start}, which is not valid "
                f"Unicode (a file read with errors='surrogateescape'?); repair the text, e.g. "
                f"t.encode('utf-8', 'replace').decode('utf-8'), or drop it") from None
    return texts


def _is_one_layer(layer) -> bool:
    return isinstance(layer, (int, np.integer)) and not isinstance(layer, (bool, np.bool_))


def _check_layers(lm, layer: int | Sequence[int]) -> list[int]:
    """Sorted distinct layers as Python ints; NumPy integers are accepted."""
    if isinstance(layer, (str, bytes)) or not (_is_one_layer(layer) or hasattr(layer, "__iter__")):
        raise TypeError(f"layer must be an int or a list of ints, got {layer!r}")
    layers = [layer] if _is_one_layer(layer) else list(layer)
    if not layers:
        raise ValueError("layer is an empty list; pass an int or a non-empty list of ints")
    layers = [integer(ly, "layer", why="or a list of ints") for ly in layers]
    n = n_layers(lm)
    for ly in layers:
        if not 0 <= ly < n:
            raise ValueError(f"layer {ly} is out of range: this model has {n} blocks, valid layers are 0..{n - 1}")
    return sorted(set(layers))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token in each row, for left *or* right padding. [B, T] -> [B]"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(dim=1)


# ---- the cache ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything but the texts that a cached result depends on (the key hashes all of it)."""

    model: str
    """Content identity of the weights (:func:`adaptivek.models.model_fingerprint`)."""
    dtype: str
    """The weights' dtype(s): a bf16 model computes other activations than its fp32 original."""
    block_path: str
    """Which module list ``layer`` indexes."""
    layer: int
    """Decoder block whose output is read."""
    token: str
    """``"last"`` or ``"all"``."""
    max_length: int
    """Truncation length in tokens."""
    d_model: int
    """Width of the residual stream: every stored row must have it (checked on read, not in the key)."""

    def key(self, texts: list[str]) -> str:
        h = hashlib.sha256()
        for t in texts:
            h.update(hashlib.sha256(t.encode("utf-8")).digest())
        fields = {k: v for k, v in asdict(self).items() if k != "d_model"}
        meta = {**fields, "texts": h.hexdigest(), "format": CACHE_FORMAT}
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]


def _spec(lm, layer: int, token: str, max_length: int) -> _Spec:
    dtypes = sorted({str(p.dtype) for p in lm._module.parameters() if p.is_floating_point()})
    return _Spec(model=model_fingerprint(lm), dtype=",".join(dtypes), block_path=model_info(lm)["block_path"],
                 layer=layer, token=token, max_length=max_length, d_model=d_model(lm))


def _cache_key(lm, layer: int, token: str, max_length: int, texts: list[str]) -> str:
    """The cache key of ``extract(lm, texts, layer, token=token, max_length=max_length)``."""
    return _spec(lm, layer, token, max_length).key(texts)


def _cached(cache_dir: Path, spec: _Spec, texts: list[str]):
    """The verified cached result for ``texts``, or None (absent, or corrupt: then a CacheWarning)."""
    key = spec.key(texts)
    try:
        hit = _read_entry(cache_dir, key, spec, len(texts))
        return hit if hit is not None else _read_manifest(cache_dir, key, spec, texts)
    except CacheError as e:
        warnings.warn(f"{e}; recomputing and rewriting it", CacheWarning, stacklevel=3)
        return None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CacheError(f"cache file {path} is unreadable ({e})") from e
    if not isinstance(obj, dict):
        raise CacheError(f"cache file {path} holds a {type(obj).__name__}, not a JSON object")
    return obj


def _read_entry(cache_dir: Path, key: str, spec: _Spec, n_texts: int):
    """The result stored under ``key`` after verifying it; None if there is none; CacheError if it is wrong."""
    from safetensors.torch import load_file

    meta_path, data = cache_dir / f"{key}.json", cache_dir / f"{key}.safetensors"
    if not (meta_path.is_file() and data.is_file()):  # the JSON is written last: it marks completion
        return None
    meta = _read_json(meta_path)
    stored = meta.get("file") if meta.get("format") == CACHE_FORMAT else None
    if not (isinstance(stored, dict) and ":" in str(stored.get("digest"))):
        raise CacheError(f"cache file {meta_path} has no checksum of format {CACHE_FORMAT}")
    size = data.stat().st_size
    if size != stored.get("size"):
        raise CacheError(f"cache file {data} is {size} bytes but was written with {stored.get('size')} (truncated?)")
    algorithm = stored["digest"].split(":")[0]
    try:
        same = file_digest(data, algorithm) == stored["digest"]
    except (ValueError, ImportError) as e:  # an algorithm this environment lacks
        raise CacheError(f"cache file {data} cannot be verified here ({e})") from e
    if not same:
        raise CacheError(f"cache file {data} does not match its checksum (its bytes changed after writing)")
    try:
        tensors = load_file(str(data))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise CacheError(f"cache file {data} is not a readable safetensors file ({e})") from e
    return _checked_value(tensors, spec, n_texts, data)


def _checked_value(tensors: dict, spec: _Spec, n_texts: int, path: Path):
    """``acts`` (and ``text_index``) if their shapes fit ``n_texts`` texts of width ``d_model``; else CacheError."""
    acts, index = tensors.get("acts"), tensors.get("text_index")
    bad = None
    if acts is None or acts.ndim != 2 or acts.shape[1] != spec.d_model or acts.dtype != torch.float32:
        bad = f"acts is {None if acts is None else (tuple(acts.shape), acts.dtype)}, not float32 [n, {spec.d_model}]"
    elif spec.token == "last" and (acts.shape[0] != n_texts or index is not None):
        bad = f"it has {acts.shape[0]} rows for {n_texts} texts"
    elif spec.token == "all":
        if index is None or index.shape != (acts.shape[0],) or index.dtype != torch.int64:
            bad = "text_index is missing or does not pair with the rows of acts"
        elif len(index) and bool((index.diff() < 0).any() | (index[0] < 0) | (index[-1] >= n_texts)):
            bad = f"text_index is not sorted within 0..{n_texts - 1}"
        elif not bool(torch.bincount(index, minlength=n_texts).gt(0).all()):
            bad = f"some of the {n_texts} texts have no rows"
    if bad is not None:
        raise CacheError(f"cache file {path} does not hold the result for these texts: {bad}")
    return acts if spec.token == "last" else (acts, index)


def _read_manifest(cache_dir: Path, key: str, spec: _Spec, texts: list[str]):
    """The result joined from the shards of a distributed run, after checking they cover ``texts`` in order."""
    path = cache_dir / f"{key}.shards.json"
    if not path.is_file():
        return None
    shards = _read_json(path).get("shards")  # [{"key": ..., "n_texts": ...}] in text order
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("n_texts"), int) and s["n_texts"] > 0 for s in shards):
        raise CacheError(f"shard manifest {path} does not list shards with their text counts")
    counts = [s["n_texts"] for s in shards]
    if sum(counts) != len(texts):
        raise CacheError(f"shard manifest {path}: its shards hold {sum(counts)} texts, not the {len(texts)} "
                         f"asked for (a partial manifest, or one for other texts)")
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    for i, (s, a, n) in enumerate(zip(shards, starts, counts, strict=True)):
        if s.get("key") != spec.key(texts[a:a + n]):
            raise CacheError(f"shard manifest {path}: shard {i} is not the result for texts {a}..{a + n - 1} "
                             f"(shards out of order, or made with another model or settings)")
    parts = [_read_entry(cache_dir, s["key"], spec, n) for s, n in zip(shards, counts, strict=True)]
    if any(p is None for p in parts):
        return None  # a rank has not finished: an ordinary miss
    if spec.token == "last":
        return torch.cat(parts)
    return (torch.cat([acts for acts, _ in parts]),
            torch.cat([index + a for (_, index), a in zip(parts, starts, strict=True)]))


def _store(cache_dir: Path, key: str, value, spec: _Spec, n_texts: int, info: dict) -> None:
    """Write the tensors, then the JSON with their checksum (last: it marks the entry complete)."""
    from safetensors.torch import save_file

    tensors = {"acts": value[0], "text_index": value[1]} if isinstance(value, tuple) else {"acts": value}
    data = cache_dir / f"{key}.safetensors"
    with atomic_path(data, ".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        stored = {"size": tmp.stat().st_size, "digest": file_digest(tmp)}  # of exactly what is renamed
    meta = {"model_name": info["name"], "revision": info["revision"], **asdict(spec), "n_texts": n_texts,
            "shapes": {k: list(v.shape) for k, v in tensors.items()}, "file": stored, "format": CACHE_FORMAT}
    write_json(cache_dir / f"{key}.json", meta)


def write_shard_manifest(cache_dir: Path, lm, layer: int, token: str, max_length: int,
                         texts: list[str], shards: list[list[str]]) -> None:
    """Record that the result for ``texts`` is the concatenation of the results for ``shards``.

    Readers check that the shards cover ``texts`` in order before joining them.
    """
    spec = _spec(lm, layer, token, max_length)
    entry = {"shards": [{"key": spec.key(sh), "n_texts": len(sh)} for sh in shards],
             "n_texts": sum(len(sh) for sh in shards), "format": CACHE_FORMAT}
    write_json(Path(cache_dir) / f"{spec.key(texts)}.shards.json", entry)


@overload
def extract(lm, texts: Sequence[str], layer: int, **kw) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
@overload
def extract(lm, texts: Sequence[str], layer: Sequence[int], **kw) -> dict: ...


def extract(
    lm,
    texts: Sequence[str],
    layer: int | Sequence[int],
    *,
    token: Token | Mapping[int, Token] = "last",
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
        layer: an int (NumPy integers too), or a list of ints read in one forward pass (returns
            ``{layer: result}``).
        token: ``"last"`` -> ``[len(texts), d_model]`` at each text's last real token;
            ``"all"`` -> ``(acts [n_tokens, d_model], text_index [n_tokens])`` without padding;
            or a mapping ``{layer: "last" | "all"}`` covering exactly the layers requested, to read
            e.g. the last token of every layer and all tokens of one in the same forward pass.
        max_length: truncation length in tokens (>= 1).
        batch_size: texts per forward pass; texts are sorted by length so batches pad little.
        cache_dir: if given, results are stored there keyed by (the weights' content and dtype,
            layer, token, max_length, texts) and reused by later calls after verifying their
            checksum and shapes; a corrupt entry is recomputed with a ``CacheWarning``.
        progress: show a tqdm progress bar over batches.
        padding_side: how batches are padded; both give the same result (position ids and the
            last-token index are computed from the attention mask).
        remote: passed to ``lm.trace`` for NDIF users (needs an NDIF API key and network).

    Returns float32 CPU tensors.
    """
    texts = _check_texts(texts)
    layers = _check_layers(lm, layer)
    modes = _token_modes(token, layers)
    int_at_least(max_length, "max_length")
    int_at_least(batch_size, "batch_size")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

    results, specs = {}, {}
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        specs = {ly: _spec(lm, ly, modes[ly], max_length) for ly in layers}
        results = {ly: hit for ly, spec in specs.items() if (hit := _cached(cache, spec, texts)) is not None}
        results |= _last_from_all(cache, lm, [ly for ly in layers if ly not in results and modes[ly] == "last"],
                                  texts, max_length)
    todo = [ly for ly in layers if ly not in results]
    if todo:
        computed = _run(lm, texts, {ly: modes[ly] for ly in todo}, max_length, batch_size, progress, padding_side,
                        remote)
        for ly in todo:
            results[ly] = computed[ly]
            if cache is not None:
                _store(cache, specs[ly].key(texts), computed[ly], specs[ly], len(texts), model_info(lm))
    if _is_one_layer(layer):
        return results[int(layer)]
    return {ly: results[ly] for ly in layers}


def _last_from_all(cache: Path, lm, layers: list[int], texts: list[str], max_length: int) -> dict:
    """Last-token results read off a cached every-token entry of the same layer (no forward pass): chapter 1
    caches every token of the SAE's layer, and later calls for its last tokens must not run the model."""
    out = {}
    for ly in layers:
        hit = _cached(cache, _spec(lm, ly, "all", max_length), texts)
        if hit is not None:
            acts, text_index = hit
            ends = torch.cat([text_index[1:] != text_index[:-1], torch.tensor([True])])  # [n_tokens] last of its text
            out[ly] = acts[ends]
    return out


def _token_modes(token, layers: list[int]) -> dict[int, str]:
    """``{layer: "last" | "all"}`` for every requested layer, from one mode or a mapping that covers them."""
    if isinstance(token, Mapping):
        modes = {integer(ly, "a token mapping's layer"): m for ly, m in token.items()}
        if set(modes) != set(layers):
            raise ValueError(f"a token mapping must give the mode of exactly the layers requested {layers}, got "
                             f"keys {sorted(modes, key=str)}; e.g. token={{ly: 'last' for ly in layers}} | {{12: 'all'}}")
    else:
        modes = dict.fromkeys(layers, token)
    bad = {ly: m for ly, m in modes.items() if m not in ("last", "all")}
    if bad:
        raise ValueError(f"token must be 'last' or 'all' (or a mapping of layers to them), got {bad or token!r}")
    return modes


def _run(lm, texts, modes: dict[int, str], max_length, batch_size, progress, padding_side, remote):
    """One pass over ``texts`` in length-sorted batches; ``modes``: layer -> "last" or "all"."""
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    device = model_device(lm)
    envoys = blocks(lm)
    layers = list(modes)
    # tokenise once (no padding) to sort by length: batches of similar length pad little
    lengths = torch.tensor([len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]])
    if (lengths == 0).any():
        i = int((lengths == 0).nonzero()[0])
        raise ValueError(f"texts[{i}] tokenises to zero tokens; drop it")
    order = torch.argsort(lengths, descending=True, stable=True)
    parts: dict[int, list[torch.Tensor]] = {ly: [] for ly in layers}
    index_parts: list[torch.Tensor] = []
    for start in tqdm(range(0, len(texts), batch_size), desc=f"extract layers {layers}", disable=not progress,
                      unit="batch"):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx.tolist()], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt", padding_side=padding_side)
        mask = enc["attention_mask"].to(device)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # right for left padding too
        outs = _trace_batch(lm, envoys, layers, max(layers), enc["input_ids"].to(device), mask, position_ids, remote)
        keep = mask.bool()  # [B, T]
        last = last_token_index(mask)
        for ly in layers:
            rows = outs[ly][keep] if modes[ly] == "all" else outs[ly][torch.arange(len(idx), device=device), last]
            parts[ly].append(rows.float().cpu())  # "all": [n_real, d]; "last": [B, d]
        index_parts.append(idx[:, None].expand(keep.shape)[keep.cpu()])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    # "all": restore text order; tokens of one text stay in sequence order
    text_index = torch.cat(index_parts)
    perm = torch.argsort(text_index, stable=True)
    return {ly: torch.cat(parts[ly])[inverse] if modes[ly] == "last" else (torch.cat(parts[ly])[perm], text_index[perm])
            for ly in layers}


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
