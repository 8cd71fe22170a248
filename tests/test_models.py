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
    from adaptivek.io import CacheWarning

    with pytest.warns(CacheWarning, match="no config.json"):
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


# ---- devices -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, match", [
    ("cuda", "CUDA is not available"),
    ("cuda:99", r"CUDA is not available|has \d+ CUDA device"),
    ("gpu", "is not a device torch knows"),
    (3.5, "is not a device torch knows"),
], ids=["cuda", "cuda_99", "gpu", "float"])
def test_a_device_this_machine_lacks_names_the_fix(device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=match) as err:
        models.pick_device(device)
    assert "device=" in str(err.value) and ("'cpu'" in str(err.value))


def test_load_model_checks_the_device_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_pretrained", lambda *a: pytest.fail("loaded before checking the device"))
    with pytest.raises(ValueError, match="use device='cpu'"):
        adaptivek.load_model("smollm2-135m", device="cuda")


# ---- the converted-model cache verifies what it reads ------------------------------------------


def _fake_conversion(calls):
    def convert(gguf, dest):
        calls.append(dest)
        (dest / "config.json").write_text("{}")
        (dest / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    return convert


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _unreadable_checksums(path):
    (path.parent / models.CHECKSUMS_FILE).write_text("{oops")


@pytest.mark.parametrize("damage, match", [
    (_flip, "does not match its checksum"),
    (_truncate, "truncated"),
    (lambda p: p.unlink(), "model.safetensors is missing"),
    (_unreadable_checksums, "unreadable"),
], ids=["flip_bytes", "truncate", "missing_file", "unreadable_checksums"])
def test_a_corrupt_conversion_is_converted_again_with_a_warning(tmp_path, monkeypatch, damage, match):
    from adaptivek.io import CacheWarning

    monkeypatch.setenv("ADAPTIVEK_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls))
    target = models.embedded_model_dir()
    assert (target / models.CHECKSUMS_FILE).is_file()
    damage(target / "model.safetensors")
    with pytest.warns(CacheWarning, match=match) as rec:
        assert models.embedded_model_dir() == target
    assert str(target) in str(rec[0].message) and len(calls) == 2
    assert (target / "model.safetensors").read_bytes() == bytes(range(256)) * 4


def test_a_conversion_from_another_gguf_is_redone(tmp_path, monkeypatch):
    from adaptivek.io import CacheWarning

    monkeypatch.setenv("ADAPTIVEK_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls))
    models.embedded_model_dir()
    monkeypatch.setattr(models, "_memo_file_digest", lambda p: "sha256:" + "0" * 64)  # a new GGUF, same size
    with pytest.warns(CacheWarning, match="different GGUF"):
        models.embedded_model_dir()
    assert len(calls) == 2


def test_a_conversion_without_checksums_is_adopted_if_complete(tmp_path, monkeypatch):
    """Directories converted before checksums existed: kept if their safetensors parse, else redone."""
    from safetensors.torch import save_file

    monkeypatch.setenv("ADAPTIVEK_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls))
    target = models.embedded_model_dir()
    for f in target.iterdir():
        f.unlink()
    (target / "config.json").write_text("{}")
    save_file({"w": torch.ones(64)}, str(target / "model.safetensors"))  # what an older adaptivek left
    assert models.embedded_model_dir() == target and len(calls) == 1
    assert (target / models.CHECKSUMS_FILE).is_file()  # adopted: verified from now on
    (target / models.CHECKSUMS_FILE).unlink()
    _truncate(target / "model.safetensors")
    with pytest.warns(UserWarning, match="model.safetensors is unreadable"):
        models.embedded_model_dir()
    assert len(calls) == 2


# ---- content identity of the weights ---------------------------------------------------------------


def test_fingerprint_follows_the_weights_not_the_name(tmp_path, smol_tokenizer, one_thread):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    def save(seed):
        torch.manual_seed(seed)
        cfg = GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            vocab_size=len(smol_tokenizer), max_position_embeddings=64)
        GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path)
        smol_tokenizer.save_pretrained(tmp_path)
        return models.model_fingerprint(adaptivek.load_model(str(tmp_path)))

    first = save(0)
    assert first.startswith("dir:") and save(0) == first  # same bytes, same identity
    assert save(1) != first  # re-saved with other weights at the same path


def test_fingerprint_of_a_wrapped_model_hashes_its_weights_and_follows_in_place_edits(tiny_neox):
    first = models.model_fingerprint(tiny_neox)
    assert first.startswith("weights:") and models.model_fingerprint(tiny_neox) == first
    w = tiny_neox._module.gpt_neox.embed_in.weight
    with torch.no_grad():
        w.add_(1.0)
        try:
            assert models.model_fingerprint(tiny_neox) != first
        finally:
            w.sub_(1.0)


def test_fingerprint_of_embedded_and_random_models_needs_no_weights(embedded_lm):
    assert models.model_fingerprint(embedded_lm).startswith("gguf:")
    a = models._random_fingerprint("EleutherAI/pythia-70m-deduped")
    assert a == models._random_fingerprint("EleutherAI/pythia-70m-deduped")
    assert a != models._random_fingerprint("EleutherAI/pythia-70m-deduped", seed=1)
    assert a != models._random_fingerprint("google/gemma-2-2b")
