"""TopKSAE / AdaptiveKSAE: loop-free variable k, sparse decode, fused backward, save/load, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from adaptivek import sae as sae_module
from adaptivek.probe import RidgeProbe, complexity_to_k
from adaptivek.sae import AdaptiveKSAE, TopKSAE, load_sae


def _close(a, b, rtol=1.3e-6, atol=1e-5):
    """assert_close without importing torch.testing (seconds of import time on a busy machine)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"max abs diff {(a - b).abs().max().item():.3g}"


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(sae, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return sae


def _probe(d, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = (X[:, :3].sum(1) * 1.5 + 5).clamp(0, 10)
    return RidgeProbe.fit(X, y, folds=3), X


def _loop_codes(sae, x, k):
    """The reference: one torch.topk per row."""
    pre = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    out = torch.zeros_like(pre)
    for i in range(len(x)):
        v, j = pre[i].topk(int(k[i]))
        out[i, j] = v
    return out


@pytest.mark.parametrize("buckets", [1, 8])
def test_variable_k_matches_per_row_topk_loop(monkeypatch, buckets):
    monkeypatch.setitem(sae_module.TOPK_BUCKETS, "cpu", buckets)  # one topk at k_max, or 8 row groups
    sae = _randomise(TopKSAE(24, 96, 8, seed=1))
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(2))
    k = torch.randint(1, 41, (37,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(sae.encode(x, k), _loop_codes(sae, x, k))
        assert torch.equal(sae.encode(x, 5), _loop_codes(sae, x, torch.full((37,), 5)))
        assert torch.equal(sae.encode(x), _loop_codes(sae, x, torch.full((37,), 8)))


def test_nonzeros_per_row_equal_k():
    sae = TopKSAE(16, 64, 4, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: row i must keep exactly k_i
    x = torch.randn(50, 16)
    k = torch.randint(1, 64, (50,))
    with torch.no_grad():
        assert torch.equal((sae.encode(x, k) != 0).sum(1), k)
        sae.b_enc.fill_(-0.5)  # few positives: min(k_i, #positive)
        n_pos = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc > 0).sum(1)
        assert torch.equal((sae.encode(x, k) != 0).sum(1), torch.minimum(k, n_pos))


def test_adaptive_k_comes_from_the_probe():
    probe, X = _probe(12)
    sae = AdaptiveKSAE(12, 48, probe, k_min=2, k_max=30, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
        out = sae(X[:40])
    want = complexity_to_k(probe.predict(X[:40]), k_min=2, k_max=30, steepness=6.0)
    assert torch.equal(out.k, want)
    assert torch.equal(out.l0, want)
    assert len(set(want.tolist())) > 3  # really variable
    assert out.codes.shape == (40, 48) and torch.equal((out.codes != 0).sum(1), want)


def test_sparse_decode_equals_dense_decode():
    sae = _randomise(TopKSAE(20, 80, 6, seed=0))
    x = torch.randn(30, 20)
    k = torch.randint(1, 12, (30,))
    with torch.no_grad():
        acts, idx, keep, *_ = sae.select(x, k)
        top = acts * keep
        dense = sae.decode(sae.encode(x, k))
        _close(sae.decode_sparse(top, idx, keep), dense, rtol=1e-5, atol=1e-5)
        _close(sae.decode_sparse(top, idx), dense, rtol=1e-5, atol=1e-5)
        _close(sae(x, k).x_hat, dense, rtol=1e-5, atol=1e-5)


def _dense_reference_loss(sae, x, k, dead, k_aux, l1_weight=0.01):
    """Plain-autograd forward (dense codes, dense matmuls) of the same losses."""
    pre = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # [B, d_sae]
    vals, idx = pre.topk(int(k.max()), dim=1)
    mask = torch.arange(vals.shape[1]) < k[:, None]
    codes = torch.zeros_like(pre).scatter(1, idx, vals * mask)
    x_hat = codes @ sae.W_dec + sae.b_dec
    mse = (x_hat - x).pow(2).mean()
    l1 = codes.sum(1).mean() / x.norm(dim=1).mean()
    e = (x - x_hat).detach()
    aux_v, aux_i = torch.where(dead[None], pre, -torch.inf).topk(k_aux, dim=1)
    aux_hat = torch.zeros_like(pre).scatter(1, aux_i, aux_v) @ sae.W_dec
    auxk = (aux_hat - e).pow(2).sum(1).mean() / (e - e.mean(0)).pow(2).sum(1).mean()
    return mse + l1_weight * l1 + auxk / 32


@pytest.mark.parametrize("x_grad,soft,buckets", [(False, False, 8), (True, False, 1), (True, True, 8)])
def test_fused_backward_equals_dense_autograd(monkeypatch, x_grad, soft, buckets):
    """The custom sparse backward (fused path; with ``k_soft`` the select + embedding_bag path) == autograd."""
    monkeypatch.setitem(sae_module.TOPK_BUCKETS, "cpu", buckets)
    sae = _randomise(TopKSAE(16, 64, 8, seed=0).double())
    x = torch.randn(25, 16, dtype=torch.float64, requires_grad=x_grad)
    k = torch.randint(1, 9, (25,))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    grads = []
    for fused in (True, False):
        sae.zero_grad()
        if x.grad is not None:
            x.grad = None
        if fused:
            k_soft = k.double().requires_grad_(True) if soft else None
            out = sae(x, k, dead_mask=dead, k_aux=5, k_soft=k_soft)
            loss = out.mse + 0.01 * out.l1 + out.auxk_loss / 32
        else:
            loss = _dense_reference_loss(sae, x, k, dead, 5)
        loss.backward()
        grads.append([p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
                     + ([x.grad.clone()] if x_grad else []))
    assert grads[0][0].abs().sum() > 0 and grads[0][2].abs().sum() > 0
    for a, b in zip(*grads, strict=True):
        _close(a, b, rtol=1e-10, atol=1e-12)


def test_decoder_constraint_helpers():
    sae = TopKSAE(8, 32, 3, seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) + 0.5)
    sae.W_dec.grad = torch.randn(32, 8)
    sae.remove_gradient_parallel_to_decoder_directions()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    sae.set_decoder_norm_to_unit_norm()
    _close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_init_and_geometric_median():
    sae = TopKSAE(8, 32, 3, seed=0)
    assert torch.equal(sae.W_enc, sae.W_dec.T) and torch.all(sae.b_enc == 0)
    _close(sae.W_dec.norm(dim=1), torch.ones(32))
    x = torch.randn(400, 8)
    x[:20] += 1000.0  # outliers move the mean, barely the median
    sae.init_b_dec(x)
    assert sae.b_dec.norm() < 0.5 < x.mean(0).norm()


@pytest.mark.parametrize("cls", ["topk", "adaptive"])
def test_save_load_roundtrip_is_bit_exact(tmp_path, cls):
    if cls == "topk":
        sae = _randomise(TopKSAE(12, 48, 5, seed=0))
    else:
        probe, _ = _probe(12)
        sae = _randomise(AdaptiveKSAE(12, 48, probe, k_min=2, k_max=30, steepness=4.0, seed=0))
    sae.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert cfg["format_version"] == 1 and cfg["class"] == type(sae).__name__
    back = load_sae(tmp_path / "m")
    assert type(back) is type(sae) and back.config() == sae.config()
    x = torch.randn(33, 12)
    with torch.no_grad():
        a, b = sae(x), back(x)
    for name in ("x_hat", "top_acts", "top_indices", "k", "fvu"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    if cls == "adaptive":
        assert torch.equal(back.probe.weight, sae.probe.weight) and back.probe.lambda_ == sae.probe.lambda_


def test_saelens_export_layout(tmp_path):
    from safetensors.torch import load_file

    sae = _randomise(TopKSAE(12, 48, 5, seed=0))
    sae.export_saelens(tmp_path / "sl", hook_name="blocks.3.hook_resid_post")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (12, 48, 5)
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (12, 48) and w["W_dec"].shape == (48, 12) and torch.equal(w["b_dec"], sae.b_dec)
    with pytest.raises(NotImplementedError, match="per-input k"):
        AdaptiveKSAE(12, 48, k_min=2, k_max=30).export_saelens(tmp_path / "x")


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"k_min \(40\) > k_max \(30\)"):
        AdaptiveKSAE(8, 64, k_min=40, k_max=30)
    with pytest.raises(ValueError, match=r"k_max \(320\) > d_sae \(64\)"):
        AdaptiveKSAE(8, 64)
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopKSAE(8, 64, 0)
    with pytest.raises(ValueError, match="k_min must be >= 1"):
        AdaptiveKSAE(8, 64, k_min=0, k_max=10)
    sae = TopKSAE(8, 64, 4)
    with pytest.raises(ValueError, match="k must lie in"):
        sae.encode(torch.randn(3, 8), torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="k must be >= 1"):
        sae.encode(torch.randn(3, 8), 0)
    with pytest.raises(ValueError, match="shape \\[batch, d_in=8\\]"):
        sae.encode(torch.randn(3, 9))
    x = torch.randn(4, 8)
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\) \(first: \[2\]\)"):
        sae(x)
    with pytest.raises(RuntimeError, match="no fitted probe"):
        AdaptiveKSAE(8, 64, k_min=2, k_max=10).encode(torch.randn(3, 8))
    probe, _ = _probe(6)
    with pytest.raises(ValueError, match="probe reads 6 features"):
        AdaptiveKSAE(8, 64, probe, k_min=2, k_max=10)
    with pytest.raises(FileNotFoundError, match="no saved SAE"):
        load_sae(tmp_path)
