"""Shared fixtures: the embedded model (loaded once) and tiny random models built from a config.

No fixture downloads anything: the tiny models are randomly initialised from a config and
driven by the embedded SmolLM2 tokenizer (vocabulary 49,152).
"""

from __future__ import annotations

import pytest
import torch


def _close(a, b, rtol=1.3e-6, atol=1e-5):
    """assert_close without importing torch.testing (seconds of import time on a busy machine).

    Shared by the test modules: ``from conftest import _close``.
    """
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"max abs diff {(a - b).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: extra OpenMP threads only add spin-wait overhead (severe on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def embedded_lm():
    from adaptivek import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from adaptivek.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))


def _tiny(kind: str, tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    from adaptivek.models import wrap_model

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if kind == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                            rotary_pct=0.25, vocab_size=vocab, max_position_embeddings=512)
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = Gemma2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, sliding_window=32, vocab_size=vocab,
                           max_position_embeddings=512)
        model = Gemma2ForCausalLM(cfg)
    return wrap_model(model.eval(), tokenizer, name=f"tiny-{kind}")


@pytest.fixture(scope="session")
def tiny_neox(smol_tokenizer):
    return _tiny("gpt_neox", smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma2(smol_tokenizer):
    return _tiny("gemma2", smol_tokenizer)
