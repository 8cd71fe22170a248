"""Sharded extraction: 2 gloo processes under torchrun produce the single-process activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptivek import activations as act
from adaptivek import extract, load_model
from adaptivek.distributed import shard_bounds

TEXTS = [f"Sentence number {i} talks about {'many ' * (i % 5)}things." for i in range(7)]


def test_shard_bounds_cover_everything_once():
    assert shard_bounds(7, 2) == [(0, 4), (4, 7)] or shard_bounds(7, 2) == [(0, 3), (3, 7)]
    for n, w in [(7, 3), (10, 4), (5, 5)]:
        b = shard_bounds(n, w)
        assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:], strict=False))
    with pytest.raises(ValueError, match="world_size"):
        shard_bounds(3, 0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        rotary_pct=0.25, vocab_size=len(smol_tokenizer), max_position_embeddings=256)
    d = tmp_path_factory.mktemp("tiny-neox")
    GPTNeoXForCausalLM(cfg).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def test_two_gloo_processes_equal_one(tiny_dir, tmp_path, monkeypatch):
    token = "last"
    texts_file = tmp_path / "texts.jsonl"
    texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "adaptivek", "extract", "--model", str(tiny_dir), "--texts", str(texts_file),
           "--layers", "0,2", "--cache-dir", str(cache), "--token", token, "--max-length", "32",
           "--batch-size", "1"]  # one text per forward: batch composition cannot change the floats
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(cache.glob("*.shards.json"))) == 2  # one manifest per layer

    lm = load_model(str(tiny_dir))
    torch.set_num_threads(1)
    single = extract(lm, TEXTS, [0, 2], token=token, max_length=32, batch_size=1, progress=False)

    def no_forward(*a, **k):
        raise AssertionError("the sharded result should come from the cache")

    monkeypatch.setattr(act, "_run", no_forward)
    sharded = extract(lm, TEXTS, [0, 2], token=token, max_length=32, batch_size=1, cache_dir=cache,
                      progress=False)
    for ly in (0, 2):
        assert sharded[ly].shape == (len(TEXTS), 32)
        assert torch.equal(sharded[ly], single[ly])


def test_all_token_shards_are_joined_with_text_offsets(tiny_neox, tmp_path, monkeypatch):
    from adaptivek.distributed import extract_sharded

    single = extract(tiny_neox, TEXTS, 1, token="all", batch_size=1, progress=False)
    bounds = shard_bounds(len(TEXTS), 3)
    for start, stop in bounds:  # what three ranks would write
        extract(tiny_neox, TEXTS[start:stop], 1, token="all", batch_size=1, cache_dir=tmp_path, progress=False)
    act.write_shard_manifest(tmp_path, tiny_neox, 1, "all", 128, TEXTS, [TEXTS[a:b] for a, b in bounds])
    monkeypatch.setattr(act, "_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    acts, index = extract(tiny_neox, TEXTS, 1, token="all", cache_dir=tmp_path, progress=False)
    assert torch.equal(index, single[1]) and torch.equal(acts, single[0])
    extract_sharded(tiny_neox, TEXTS, [1], cache_dir=tmp_path, token="all")  # one rank: all cached


def test_missing_shard_means_no_cache_hit(tmp_path, embedded_lm, recwarn):
    shards = [TEXTS[:3], TEXTS[3:]]
    act.write_shard_manifest(Path(tmp_path), embedded_lm, 1, "last", 16, TEXTS, shards)
    assert act._cached(Path(tmp_path), act._spec(embedded_lm, 1, "last", 16), TEXTS) is None
    assert not recwarn.list  # a rank that has not finished is a miss, not a corrupt cache
