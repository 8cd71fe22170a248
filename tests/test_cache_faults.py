"""Fault injection for the activation cache: every corrupt or stale entry is rebuilt or refused, never returned.

Each case writes a good entry, damages it the way a disk, a killed process or a hand edit would,
and checks three things: the low-level read refuses it with a ``CacheError`` naming the file (never
a bare ``SafetensorError``), ``extract`` recomputes it with a ``CacheWarning`` naming the file and
returns the fresh result, and the rewritten entry is then served from the cache. Two cases change
the model instead (re-saved weights, another dtype): they must miss the old entry, not reuse it.
Also here: strict JSON and file permissions of :mod:`adaptivek.io`, which the cache writes with.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptivek import activations as act
from adaptivek import extract, io, load_model

TEXTS = ["The cat sat on the mat.", "A longer sentence, with a clause or two, that needs padding.", "Short one."]
LAYER = 1


def _save_tiny(folder: Path, tokenizer, seed: int) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        rotary_pct=0.25, vocab_size=len(tokenizer), max_position_embeddings=256)
    GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    return _save_tiny(tmp_path_factory.mktemp("tiny-model"), smol_tokenizer, seed=0)


@pytest.fixture(scope="module")
def lm(tiny_dir, one_thread):
    return load_model(str(tiny_dir))


@pytest.fixture
def runs(monkeypatch):
    """Count forward passes: a rebuilt entry costs one, a cache hit none."""
    calls = []
    real = act._run
    monkeypatch.setattr(act, "_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _entry(cache: Path) -> tuple[Path, Path]:
    (data,) = cache.glob("*.safetensors")
    return data, data.with_suffix(".json")


def _rewrite_meta(meta: Path, data: Path) -> None:
    """Make the JSON agree with the (replaced) tensor file, so that only the shape checks can object."""
    m = json.loads(meta.read_text())
    m["file"] = {"size": data.stat().st_size, "digest": io.file_digest(data)}
    meta.write_text(json.dumps(m))


def truncate(cache, lm, token):
    data, _ = _entry(cache)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return data


def flip_bytes(cache, lm, token):
    data, _ = _entry(cache)
    b = bytearray(data.read_bytes())
    b[-9] ^= 0x10  # one bit of the last value
    data.write_bytes(bytes(b))
    return data


def wrong_row_count(cache, lm, token):
    """2 rows for 3 texts, in a well-formed file whose checksum matches."""
    from safetensors.torch import save_file

    data, meta = _entry(cache)
    save_file({"acts": torch.randn(len(TEXTS) - 1, 32)}, str(data))
    _rewrite_meta(meta, data)
    return data


def wrong_width(cache, lm, token):
    from safetensors.torch import save_file

    data, meta = _entry(cache)
    save_file({"acts": torch.randn(len(TEXTS), 16)}, str(data))
    _rewrite_meta(meta, data)
    return data


def text_without_rows(cache, lm, token):
    """token='all': the last text's rows dropped, in a well-formed file whose checksum matches."""
    from safetensors.torch import load_file, save_file

    data, meta = _entry(cache)
    t = load_file(str(data))
    keep = t["text_index"] < len(TEXTS) - 1
    save_file({"acts": t["acts"][keep].contiguous(), "text_index": t["text_index"][keep].contiguous()}, str(data))
    _rewrite_meta(meta, data)
    return data


def corrupt_meta(cache, lm, token):
    _, meta = _entry(cache)
    meta.write_text(meta.read_text()[:40])
    return meta


def _sharded(cache, lm, token, listed):
    """Shards of 1 and 2 texts as two ranks write them, and a manifest listing ``listed(shards)``."""
    for f in cache.iterdir():
        f.unlink()
    shards = [TEXTS[:1], TEXTS[1:]]
    for sh in shards:
        extract(lm, sh, LAYER, token=token, cache_dir=cache, progress=False, batch_size=1)
    act.write_shard_manifest(cache, lm, LAYER, token, 128, TEXTS, listed(shards))
    return next(cache.glob("*.shards.json"))


def manifest_wrong_order(cache, lm, token):
    return _sharded(cache, lm, token, lambda s: s[::-1])


def manifest_partial(cache, lm, token):
    return _sharded(cache, lm, token, lambda s: s[:1])


def manifest_corrupt_shard(cache, lm, token):
    _sharded(cache, lm, token, lambda s: s)
    shard = cache / f"{act._cache_key(lm, LAYER, token, 128, TEXTS[1:])}.safetensors"
    b = bytearray(shard.read_bytes())
    b[-5] ^= 0x01
    shard.write_bytes(bytes(b))
    return shard


FAULTS = {
    "truncate": (truncate, "last"),
    "truncate_all_tokens": (truncate, "all"),
    "flip_bytes": (flip_bytes, "last"),
    "wrong_row_count": (wrong_row_count, "last"),
    "wrong_width": (wrong_width, "last"),
    "all_tokens_text_without_rows": (text_without_rows, "all"),
    "corrupt_meta_json": (corrupt_meta, "last"),
    "manifest_wrong_order": (manifest_wrong_order, "last"),
    "manifest_wrong_order_all_tokens": (manifest_wrong_order, "all"),
    "manifest_partial": (manifest_partial, "last"),
    "manifest_corrupt_shard": (manifest_corrupt_shard, "last"),
}


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_entry_is_refused_then_rebuilt_never_returned(lm, tmp_path, runs, fault):
    damage, token = FAULTS[fault]
    fresh = extract(lm, TEXTS, LAYER, token=token, progress=False)
    extract(lm, TEXTS, LAYER, token=token, cache_dir=tmp_path, progress=False)
    bad = damage(tmp_path, lm, token)
    spec = act._spec(lm, LAYER, token, 128)
    with pytest.raises(io.CacheError, match=str(bad.name)):  # the low-level read refuses, naming the file
        key = spec.key(TEXTS)
        if act._read_entry(tmp_path, key, spec, len(TEXTS)) is None:
            act._read_manifest(tmp_path, key, spec, TEXTS)
    n = len(runs)
    with pytest.warns(io.CacheWarning, match=str(bad.name)):
        got = extract(lm, TEXTS, LAYER, token=token, cache_dir=tmp_path, progress=False)
    assert len(runs) == n + 1 and _same(got, fresh)
    again = extract(lm, TEXTS, LAYER, token=token, cache_dir=tmp_path, progress=False)  # repaired: a hit
    assert len(runs) == n + 1 and _same(again, fresh)


def test_resaved_weights_get_a_new_key(tmp_path, smol_tokenizer, one_thread):
    folder = _save_tiny(tmp_path / "model", smol_tokenizer, seed=1)
    old = extract(load_model(str(folder)), TEXTS, LAYER, cache_dir=tmp_path / "cache", progress=False)
    _save_tiny(folder, smol_tokenizer, seed=2)  # same path, same name, other weights
    lm = load_model(str(folder))
    got = extract(lm, TEXTS, LAYER, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(got, extract(lm, TEXTS, LAYER, progress=False)) and not torch.equal(got, old)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_another_dtype_gets_a_new_key(lm, tiny_dir, tmp_path):
    fp32 = extract(lm, TEXTS, LAYER, cache_dir=tmp_path, progress=False)
    bf16 = load_model(str(tiny_dir), dtype=torch.bfloat16)
    got = extract(bf16, TEXTS, LAYER, cache_dir=tmp_path, progress=False)
    assert torch.equal(got, extract(bf16, TEXTS, LAYER, progress=False)) and not torch.equal(got, fp32)


def test_weights_changed_in_place_get_a_new_key(tiny_dir, tmp_path, runs, one_thread):
    lm = load_model(str(tiny_dir))
    before = extract(lm, TEXTS, LAYER, cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        lm._module.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.mul_(2)  # same object, other weights
    got = extract(lm, TEXTS, LAYER, cache_dir=tmp_path, progress=False)
    assert len(runs) == 2 and not torch.equal(got, before)


@pytest.mark.parametrize("token", ["last", "all"])
def test_a_good_entry_and_a_good_manifest_are_hits(lm, tmp_path, runs, recwarn, token):
    fresh = extract(lm, TEXTS, LAYER, token=token, progress=False, batch_size=1)  # batches as the shards'
    _sharded(tmp_path, lm, token, lambda s: s)
    n = len(runs)
    assert _same(extract(lm, TEXTS, LAYER, token=token, cache_dir=tmp_path, progress=False), fresh)
    assert len(runs) == n and not [w for w in recwarn.list if issubclass(w.category, io.CacheWarning)]


# ---- io: strict JSON and permissions --------------------------------------------------------------


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    obj = {"nan": float("nan"), "inf": [1.5, float("inf"), -math.inf], "np": np.float32("nan"),
           "arr": np.array([1.0, np.nan]), "t": torch.tensor([np.inf, 2.0]), "ok": np.int64(3)}
    io.write_json(tmp_path / "r.json", obj)

    def refuse(token):
        raise ValueError(f"bare {token} in the file")

    back = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)  # strict, like jq
    assert back == {"nan": None, "inf": [1.5, None, None], "np": None, "arr": [1.0, None],
                    "t": [None, 2.0], "ok": 3}


def test_write_json_refuses_what_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="cannot write set"):
        io.write_json(tmp_path / "r.json", {"a": {1, 2}})
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask_022", "umask_077"])
def test_safetensors_get_the_same_permissions_as_json(tmp_path, umask):
    old = os.umask(umask)
    try:
        io.write_json(tmp_path / "a.json", {})
        io.save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    modes = {p.suffix: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {".json": 0o666 & ~umask, ".safetensors": 0o666 & ~umask}
