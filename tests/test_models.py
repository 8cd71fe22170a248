from __future__ import annotations

import pytest
import torch

import adaptivek
from adaptivek import models


def test_embedded_model_is_a_real_pretrained_lm(embedded_lm):
    tok = embedded_lm.tokenizer
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.inference_mode():
        logits = embedded_lm._module(**enc).logits
    assert tok.decode(logits[0, -1].argmax()) == " Paris"


def test_embedded_model_shape(embedded_lm):
    assert adaptivek.n_layers(embedded_lm) == 30
    assert adaptivek.d_model(embedded_lm) == 576
    assert models.model_info(embedded_lm)["block_path"] == "model.layers"


def test_block_paths_of_other_families(tiny_neox, tiny_gemma2):
    assert models.model_info(tiny_neox)["block_path"] == "gpt_neox.layers"
    assert models.model_info(tiny_gemma2)["block_path"] == "model.layers"
    assert adaptivek.n_layers(tiny_neox) == 4 and adaptivek.d_model(tiny_gemma2) == 64


def test_gpt2_block_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    assert models.find_block_path(model) == "transformer.h"


def test_unknown_architecture_says_how_to_name_the_blocks():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=r"block_path='model.layers'"):
        models.find_block_path(Odd())


def test_unknown_model_name_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="hub cannot be reached"):
        adaptivek.load_model("no-such-org/no-such-model-xyz")


def test_unknown_model_name_without_offline_flag_does_not_try_the_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OSError, match="not an embedded model"):
        adaptivek.load_model("EleutherAI/pythia-70m-deduped-not-cached")


def test_missing_local_path_is_named():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adaptivek.load_model("./no/such/dir")


@pytest.mark.parametrize("name, kw, match", [
    ("smollm2-135m", {"dtype": "float99"}, "unknown dtype"),
    ("", {}, "non-empty string"),
], ids=["bad_dtype", "empty_name"])
def test_bad_dtype_and_empty_name(name, kw, match):
    with pytest.raises(ValueError, match=match):
        adaptivek.load_model(name, **kw)


def test_conversion_cache_survives_an_interrupted_first_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVEK_CACHE", str(tmp_path))
    calls = []

    def interrupted(gguf, dest):
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    def complete(gguf, dest):
        calls.append(dest)
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir()
    # nothing half-written is left where a later run would look
    assert not list((tmp_path / "models").glob("smollm2-135m-*[!l]"))
    monkeypatch.setattr(models, "_convert_gguf", complete)
    target = models.embedded_model_dir()
    assert (target / "config.json").is_file() and len(calls) == 1
    models.embedded_model_dir()  # cached: no second conversion
    assert len(calls) == 1


def test_a_broken_cache_directory_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVEK_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_convert_gguf", lambda g, d: (d / "config.json").write_text("{}"))
    target = models.embedded_model_dir()
    (target / "config.json").unlink()
    assert (models.embedded_model_dir() / "config.json").is_file()


def test_cached_embedded_model_is_not_converted_again(embedded_lm, monkeypatch):
    def boom(gguf, dest):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(models, "_convert_gguf", boom)
    lm = adaptivek.load_model()
    assert adaptivek.n_layers(lm) == 30


def test_random_paper_model_has_the_stored_config_and_sane_random_weights(one_thread):
    from adaptivek.models import _random_model

    model, _ = _random_model("EleutherAI/pythia-70m-deduped", torch.float32, seed=3)
    cfg = models.stored_configs()["EleutherAI/pythia-70m-deduped"]
    assert model.config.hidden_size == cfg["hidden_size"] == 512
    assert model.config.num_hidden_layers == cfg["num_hidden_layers"]
    emb = model.gpt_neox.embed_in.weight.detach()
    assert abs(float(emb.std()) - model.config.initializer_range) < 1e-3
    assert torch.unique(emb[:5000], dim=0).shape[0] == 5000  # tiled fill, yet no repeated rows
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    assert not torch.equal(qkv.weight[:8], emb[:8])  # each weight starts at its own random offset
    ln = model.gpt_neox.layers[0].input_layernorm
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and not ln.bias.any()  # left to transformers
    again, _ = _random_model("EleutherAI/pythia-70m-deduped", torch.float32, seed=3)
    other, _ = _random_model("EleutherAI/pythia-70m-deduped", torch.float32, seed=4)
    assert torch.equal(again.gpt_neox.embed_in.weight, emb)
    assert not torch.equal(other.gpt_neox.embed_in.weight, emb)
    with torch.inference_mode():
        logits = model(input_ids=torch.arange(12)[None]).logits
    assert torch.isfinite(logits).all()


def test_random_model_of_an_unknown_hub_id_is_refused():
    with pytest.raises(ValueError, match="no stored config"):
        adaptivek.load_model("random:nobody/unknown-model")
