"""The SAE family: fast paths against the reference encoder, fused backward, save/load, a new variant, bad inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from conftest import _close

from adaptivek import fused
from adaptivek.probe import RidgeProbe, complexity_to_k
from adaptivek.sae import (
    AdaptiveKSAE,
    BatchTopKSAE,
    SAEConfig,
    SparseAutoencoder,
    SparseCode,
    TopKConfig,
    TopKSAE,
    load_sae,
    variable_topk,
)
from adaptivek.training import TrainConfig, train_sae

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
    """The reference code's encoder: one torch.topk per row."""
    pre = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    out = torch.zeros_like(pre)
    for i in range(len(x)):
        v, j = pre[i].topk(int(k[i]))
        out[i, j] = v
    return out


def _kept(code):
    """Each row's kept (latent, value) pairs, sorted by latent: comparable across paddings."""
    return [sorted(zip(i[m].tolist(), v[m].tolist(), strict=True))
            for v, i, m in zip(code.top_acts, code.top_indices, code.mask, strict=True)]


@pytest.mark.parametrize("buckets", [1, 8])
def test_variable_k_matches_per_row_topk_loop(monkeypatch, buckets):
    monkeypatch.setitem(fused.TOPK_BUCKETS, "cpu", buckets)  # one topk at k_max, or 8 row groups
    sae = _randomise(TopKSAE(24, 96, 8, seed=1))
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(2))
    k = torch.randint(1, 41, (37,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(sae.encode(x, k), _loop_codes(sae, x, k))
        assert torch.equal(sae.encode(x, 5), _loop_codes(sae, x, torch.full((37,), 5)))
        assert torch.equal(sae.encode(x), _loop_codes(sae, x, torch.full((37,), 8)))


@pytest.mark.parametrize("buckets", [1, 8])
def test_fast_paths_equal_the_reference_variable_topk(monkeypatch, buckets):
    """encode_sparse (bucketed) and the fused training forward keep what variable_topk keeps, random k per row."""
    monkeypatch.setitem(fused.TOPK_BUCKETS, "cpu", buckets)
    sae = _randomise(TopKSAE(20, 120, 8, seed=3))
    x = torch.randn(41, 20, generator=torch.Generator().manual_seed(4))
    k = torch.randint(1, 60, (41,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = variable_topk(sae.pre_acts(x), k)
        fast, out = sae.encode_sparse(x, k), sae(x, k)
    assert torch.equal(fast.mask.sum(1), ref.mask.sum(1)) and torch.equal(fast.k, k)
    assert _kept(fast) == _kept(ref)
    fwd = fast._replace(top_acts=out.top_acts, top_indices=out.top_indices, mask=out.top_acts > 0)
    assert _kept(fwd) == _kept(ref)
    # and the same gradients through plain autograd (the bucketed path is differentiable)
    w = torch.randn(41, int(k.max()), generator=torch.Generator().manual_seed(6))
    grads = []
    for code_of in (lambda: sae.encode_sparse(x, k), lambda: variable_topk(sae.pre_acts(x), k)):
        sae.zero_grad()
        code = code_of()
        (code.top_acts * w[:, : code.top_acts.shape[1]]).sum().backward()
        grads.append((sae.W_enc.grad.clone(), sae.b_enc.grad.clone(), sae.b_dec.grad.clone()))
    for a, b in zip(*grads, strict=True):
        _close(a, b)


def test_nonzeros_per_row_equal_k():
    sae = TopKSAE(16, 64, 4, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: row i must keep exactly k_i
    x = torch.randn(50, 16)
    k = torch.randint(1, 64, (50,))
    with torch.no_grad():
        assert torch.equal((sae.encode(x, k) != 0).sum(1), k)
        sae.b_enc.fill_(-0.5)  # few positives: min(k_i, #positive)
        n_pos = (sae.pre_acts(x) > 0).sum(1)
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
        code = sae.encode_sparse(x, k)
        dense = sae.decode(sae.encode(x, k))
        _close(sae.decode_sparse(code), dense, rtol=1e-5, atol=1e-5)
        _close(sae.decode_sparse(code.top_acts, code.top_indices, code.mask), dense, rtol=1e-5, atol=1e-5)
        _close(sae.decode_sparse(code.top_acts, code.top_indices), dense, rtol=1e-5, atol=1e-5)  # every entry
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
    """The custom sparse backward (fused path; with ``k_soft`` the plain-autograd path) == dense autograd."""
    monkeypatch.setitem(fused.TOPK_BUCKETS, "cpu", buckets)
    sae = _randomise(TopKSAE(16, 64, 8, seed=0).double())
    x = torch.randn(25, 16, dtype=torch.float64, requires_grad=x_grad)
    k = torch.randint(1, 9, (25,))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    cfg = TrainConfig(l1_weight=0.01, auxk_alpha=1 / 32)
    grads = []
    for fused_path in (True, False):
        sae.zero_grad()
        x.grad = None
        if fused_path:
            k_soft = k.double().requires_grad_(True) if soft else None
            loss = sae.loss(sae(x, k, dead_mask=dead, k_aux=5, k_soft=k_soft), cfg)
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


def test_config_registry_and_properties():
    sae = TopKSAE(12, 48, 5, seed=0)
    assert sae.cfg == TopKConfig(12, 48, 5) and (sae.d_in, sae.d_sae, sae.k, sae.k_max) == (12, 48, 5, 5)
    assert sae.device == torch.device("cpu") and sae.dtype == torch.float32
    again = SparseAutoencoder.from_config(sae.cfg, seed=0)
    assert type(again) is TopKSAE and torch.equal(again.W_dec, sae.W_dec)
    ada = SparseAutoencoder.from_config(AdaptiveKSAE(12, 48, k_min=2, k_max=30).cfg)
    assert type(ada) is AdaptiveKSAE and (ada.k_min, ada.k_max, ada.probe) == (2, 30, None)
    bt = BatchTopKSAE(12, 48, 4, threshold_beta=0.9)
    assert bt.cfg.architecture == "batchtopk" and bt.threshold_beta == 0.9


def _outputs_equal(a, b, x):
    with torch.no_grad():
        oa, ob = a(x), b(x)
    for name in ("x_hat", "top_acts", "top_indices", "k", "fvu"):
        assert torch.equal(getattr(oa, name), getattr(ob, name)), name


def _saved_sae(kind):
    if kind == "topk":
        return _randomise(TopKSAE(12, 48, 5, seed=0))
    if kind == "adaptivek":
        return _randomise(AdaptiveKSAE(12, 48, _probe(12)[0], k_min=2, k_max=30, steepness=4.0, seed=0))
    sae = _randomise(BatchTopKSAE(12, 48, 4, seed=0))
    sae(torch.randn(64, 12))  # training mode: learns a threshold
    return sae.freeze()


@pytest.mark.parametrize("kind", ["topk", "adaptivek", "batchtopk"])
def test_save_load_roundtrip_is_bit_exact(tmp_path, kind):
    sae = _saved_sae(kind)
    sae.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["adaptivek_cfg.json", "adaptivek_sae.safetensors"]
    cfg = json.loads((tmp_path / "m" / "adaptivek_cfg.json").read_text())
    assert cfg["format_version"] == 2 and cfg["architecture"] == kind and cfg["d_sae"] == 48
    back = load_sae(tmp_path / "m")
    assert type(back) is type(sae) and back.cfg == sae.cfg and not back.training
    _outputs_equal(sae.eval(), back, torch.randn(33, 12))
    if kind == "adaptivek":
        assert torch.equal(back.probe.weight, sae.probe.weight) and back.probe.lambda_ == sae.probe.lambda_
    if kind == "batchtopk":
        assert bool(back.frozen) and torch.equal(back.threshold, sae.threshold)


@pytest.mark.parametrize("kind", ["topk", "adaptivek"])
def test_format_1_folders_still_load(tmp_path, kind):
    """The layout written before the registry: cfg.json (format_version 1, class name) + sae.safetensors."""
    from safetensors.torch import save_file

    sae = _saved_sae(kind)
    tensors = {k: v.contiguous() for k, v in sae.state_dict().items()}
    if kind == "topk":
        cfg = {"format_version": 1, "class": "TopKSAE", "dtype": "float32", "d_in": 12, "d_sae": 48, "k": 5}
    else:
        tensors |= sae.probe.to_tensors(prefix="probe.")
        cfg = {"format_version": 1, "class": "AdaptiveKSAE", "dtype": "float32", "d_in": 12, "d_sae": 48,
               "k_min": 2, "k_max": 30, "steepness": 4.0, "c_min": 0.0, "c_max": 10.0, "has_probe": True}
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "sae.safetensors"))
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    back = load_sae(tmp_path / "old")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    _outputs_equal(sae, back, torch.randn(20, 12))


def test_saelens_export_layout_and_foreign_folders(tmp_path):
    from safetensors.torch import load_file

    sae = _randomise(TopKSAE(12, 48, 5, seed=0))
    sae.export_saelens(tmp_path / "sl", hook_name="blocks.3.hook_resid_post")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (12, 48, 5)
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (12, 48) and w["W_dec"].shape == (48, 12) and torch.equal(w["b_dec"], sae.b_dec)
    with pytest.raises(FileNotFoundError, match="holds a SAELens export"):
        load_sae(tmp_path / "sl")
    (tmp_path / "sp").mkdir()  # sparsify's layout: cfg.json + sae.safetensors without a format_version
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "k": 32}))
    (tmp_path / "sp" / "sae.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="holds a sparsify SAE"):
        load_sae(tmp_path / "sp")
    with pytest.raises(ValueError, match="no fitted probe"):  # a fitted one exports (tests/test_interop.py)
        AdaptiveKSAE(12, 48, k_min=2, k_max=30).export_saelens(tmp_path / "x")


# ----------------------------------------------------------------------------- BatchTopK
def test_batchtopk_learns_in_training_mode_and_thresholds_once_calibrated():
    X = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    sae = BatchTopKSAE(16, 64, 4, seed=0).eval()
    with torch.no_grad():
        assert int(sae(X).l0.sum()) == 4 * 40  # eval mode before calibration: the batch rule, nothing learned
    assert not torch.isfinite(sae.threshold)
    with torch.no_grad():
        out = sae.train()(X)  # training mode learns the threshold, with or without autograd
    assert int(out.l0.sum()) == 4 * 40 and out.l0.float().std() > 0 and torch.isfinite(sae.threshold)
    assert torch.equal(sae.batch_k(X), out.l0)
    sae.freeze(X)
    assert not sae.training
    with torch.no_grad():
        codes = sae.encode(X)
    assert torch.equal(codes != 0, sae.pre_acts(X).relu() > sae.threshold)
    assert abs(int((codes != 0).sum()) - 4 * 40) <= 1  # calibrated on this very batch


def test_batchtopk_trains_with_train_sae_and_comes_back_in_eval_mode():
    X = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=5, batch_size=64, dead_after_vectors=128)  # AuxK runs in 5 steps
    sae, hist = train_sae(BatchTopKSAE(16, 64, 4, seed=0), X, cfg=cfg, progress=False)
    assert not sae.training and torch.isfinite(sae.threshold) and not bool(sae.frozen)
    assert (hist["l0"] == 4).all() and (hist["k_min"] < hist["k_max"]).all()  # mean 4, varying per row


# ----------------------------------------------------------------------------- a variant defined here
@dataclass(frozen=True)
class ThresholdReLUConfig(SAEConfig):
    """A fixed-threshold ReLU SAE (a test of the registry: no library code knows it)."""

    architecture: ClassVar[str] = "test_threshold_relu"
    theta: float = 0.5
    """Activations at or below theta are zero."""
    l1_weight: float = 0.05
    """Its own objective: MSE + l1_weight · L1, no AuxK."""


class ThresholdReLUSAE(SparseAutoencoder, config=ThresholdReLUConfig):
    """codes = ReLU(pre) · (pre > theta): every latent above the threshold, so k varies per row."""

    def encode_sparse(self, x, k=None):
        pre = self.pre_acts(x)  # [B, d_sae]: every latent is an entry, the mask says which are active
        mask = pre > self.theta
        idx = torch.arange(self.d_sae, device=pre.device).expand_as(pre)
        return SparseCode(pre.relu() * mask, idx, mask, mask.sum(1))

    def loss(self, out, cfg):
        return out.mse + self.l1_weight * out.l1


def test_a_variant_defined_outside_the_library_trains_saves_and_loads(tmp_path):
    X = torch.randn(400, 12, generator=torch.Generator().manual_seed(0))
    sae = ThresholdReLUSAE(ThresholdReLUConfig(12, 48, theta=0.3), seed=0)
    cfg = TrainConfig(steps=30, batch_size=64, lr=1e-2, dead_after_vectors=128)  # AuxK runs, unused by its loss
    sae, hist = train_sae(sae, X, cfg=cfg, progress=False)
    assert hist["mse"].iloc[-1] < hist["mse"].iloc[0] and (hist["l0"] > 0).all()
    assert hist["k_min"].iloc[-1] < hist["k_max"].iloc[-1]  # a threshold, not a fixed k
    sae.save(tmp_path / "v")
    back = load_sae(tmp_path / "v")
    assert type(back) is ThresholdReLUSAE and back.cfg == sae.cfg
    x = X[:50]
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))
        assert torch.equal(back(x).x_hat, sae(x).x_hat)
        assert torch.equal(back.encode(x) > 0, sae.pre_acts(x) > 0.3)


# ----------------------------------------------------------------------------- bad inputs
_SAE = TopKSAE(8, 64, 4, seed=0)


def _with_nan(n=4, row=2):
    x = torch.randn(n, 8)
    x[row, 5] = float("nan")
    return x



@pytest.mark.parametrize("make,error,match", [
    (lambda: AdaptiveKSAE(8, 64, k_min=40, k_max=30), ValueError, r"k_min \(40\) > k_max \(30\)"),
    (lambda: AdaptiveKSAE(8, 64), ValueError, r"k_max \(320\) > d_sae \(64\)"),
    (lambda: TopKSAE(8, 64, 0), ValueError, "k must be >= 1"),
    (lambda: TopKSAE(8, 64, 2.0), TypeError, "k must be an int"),
    (lambda: AdaptiveKSAE(8, 64, k_min=0, k_max=10), ValueError, "k_min must be >= 1"),
    (lambda: AdaptiveKSAE(8, 64, k_min=2, k_max=10, steepness=0.0), ValueError, "steepness must be finite"),
    (lambda: AdaptiveKSAE(8, 64, k_min=2, k_max=10, c_min=5.0, c_max=5.0), ValueError, "need finite c_min < c_max"),
    (lambda: BatchTopKSAE(8, 64, 4, threshold_beta=1.0), ValueError, r"threshold_beta must be in \[0, 1\)"),
    (lambda: TopKSAE(0, 64, 4), ValueError, "d_in must be a positive int"),
    (lambda: TopKSAE(8, 64, 4, dtype=torch.int32), ValueError, "dtype must be one of"),
    (lambda: AdaptiveKSAE(8, 64, _probe(6)[0], k_min=2, k_max=10), ValueError, "probe reads 6 features"),
    (lambda: _SAE.encode(torch.randn(3, 8), torch.tensor([1, 0, 2])), ValueError, "k must lie in"),
    (lambda: _SAE.encode(torch.randn(3, 8), torch.tensor([1.0, 2.0, 2.0])), ValueError, "integer tensor"),
    (lambda: _SAE.encode(torch.randn(3, 8), 0), ValueError, "k must be >= 1"),
    (lambda: _SAE.encode(torch.randn(3, 9)), ValueError, r"shape \[batch, d_in=8\]"),
    (lambda: _SAE.encode(torch.randn(2, 3, 8)), ValueError, "flatten leading dims"),
    (lambda: _SAE.encode([[0.0] * 8]), TypeError, "x must be a torch.Tensor"),
    (lambda: _SAE(_with_nan()), ValueError, r"NaN or inf in 1 row\(s\) \(first: \[2\]\)"),
    (lambda: _SAE(torch.randn(3, 8), dead_mask=torch.zeros(64)), ValueError, "dead_mask must be a bool"),
    (lambda: _SAE.decode(torch.randn(3, 8)), ValueError, r"codes must have shape \[batch, d_sae=64\]"),
    (lambda: AdaptiveKSAE(8, 64, k_min=2, k_max=10).encode(torch.randn(3, 8)), RuntimeError, "no fitted probe"),
    (lambda: BatchTopKSAE(8, 64, 4).freeze(), RuntimeError, "no threshold yet"),
    (lambda: SparseAutoencoder.from_config(SAEConfig(8, 64)), ValueError, "no SAE class is registered"),
], ids=["k_min>k_max", "k_max>d_sae", "k=0", "k-float", "k_min=0", "steepness", "c-range", "threshold_beta",
        "d_in=0", "dtype", "probe-width", "k-out-of-range", "k-float-tensor", "k-int-0",
        "x-width", "x-3d", "x-list", "x-nan", "dead-mask", "codes-width", "no-probe", "freeze-untrained",
        "unregistered"])
def test_bad_inputs_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_load_from_an_empty_folder_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved SAE.*adaptivek_cfg.json"):
        load_sae(tmp_path)
