"""JumpReLUSAE: the straight-through estimators, the forward, the L0 controller, training to a target L0,
save/load and checkpoints, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import _close

from adaptivek.evaluation import evaluate
from adaptivek.sae import JumpReLUSAE, L0TargetWarning, SparseAutoencoder, _JumpReLU, _Step, load_sae
from adaptivek.sae_config import JumpReLUConfig
from adaptivek.training import TrainConfig, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _atoms_data(n=2000, d=32, atoms=64, k=(4, 12), seed=0, dictionary_seed=0):
    """x = a sum of 4 to 12 (uniform) of `atoms` random unit atoms, magnitudes in [0.5, 1.5], plus noise;
    scaled by one factor so that E‖x‖² is about d, as the library's activations are."""
    D = torch.randn(atoms, d, generator=torch.Generator().manual_seed(dictionary_seed))
    D /= D.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    kk = torch.randint(k[0], k[1] + 1, (n,), generator=g)
    chosen = torch.rand(n, atoms, generator=g).argsort(1).argsort(1) < kk[:, None]  # kk[i] random atoms of row i
    X = (chosen * (torch.rand(n, atoms, generator=g) + 0.5)) @ D + 0.05 * torch.randn(n, d, generator=g)
    return X * math.sqrt(d / 9.0)  # E‖x‖² ≈ 8 atoms x 1.08 + noise ≈ 9 before scaling


def _random_sae(d_in=16, d_sae=64, bandwidth=0.3, seed=0, **kw):
    """A JumpReLU SAE with random encoder bias and thresholds, so that latents are active and inactive."""
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=bandwidth, init_threshold=0.5, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.3)
        sae.scaled_log_threshold.copy_((torch.rand(d_sae, generator=g) + 0.3).log() / sae.threshold_speed)
    return sae


# ----------------------------------------------------------------------------- straight-through estimators
def test_threshold_gradient_is_the_rectangle_kernel_near_theta_and_zero_far_from_it():
    eps = 0.1
    theta = torch.tensor([1.0, 1.0, 2.0, 0.5])
    pre = torch.tensor([[1.02, 0.7, 1.96, 0.2],  # latent 0: both rows within ε/2 of θ; latent 1: both far;
                        [0.97, 1.4, 1.00, 0.9]])  # latent 2: row 0 near; latent 3: both far
    near = ((pre - theta).abs() < eps / 2).float()
    assert near.tolist() == [[1, 0, 1, 0], [1, 0, 0, 0]]
    g = torch.tensor([[0.3, -1.0, 2.0, 0.7], [-0.5, 0.4, 1.5, -0.2]])  # an upstream gradient ∂L/∂f

    p, th = pre.clone().requires_grad_(), theta.clone().requires_grad_()
    (_JumpReLU.apply(p, th, eps) * g).sum().backward()
    _close(th.grad, -(theta / eps) * (g * near).sum(0))  # -(θ/ε) Σ_b K((pre - θ)/ε) ∂L/∂f
    assert th.grad[0] != 0 and th.grad[2] != 0 and th.grad[1] == 0 and th.grad[3] == 0
    _close(p.grad, g * (pre > theta))  # the JumpReLU passes ∂L/∂f to active pre-activations only

    p, th = pre.clone().requires_grad_(), theta.clone().requires_grad_()
    (_Step.apply(p, th, eps) * g).sum().backward()
    _close(th.grad, -(g * near).sum(0) / eps)  # -(1/ε) Σ_b K((pre - θ)/ε) ∂L/∂H
    assert p.grad is None  # the L0 term's gradient reaches θ only


def test_the_sae_l0_term_moves_only_thresholds_with_pre_activations_in_their_window():
    sae = _random_sae()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    out = sae(x)
    out.l0_loss.backward()
    with torch.no_grad():
        pre, theta = sae.pre_acts(x), sae.threshold
        in_window = ((pre - theta).abs() < sae.bandwidth / 2).sum(0)  # [d_sae] rows near each θ_j
    expected = -(theta * in_window) / sae.bandwidth / len(x)  # ∂(mean_b Σ_j H)/∂ log θ_j
    _close(sae.scaled_log_threshold.grad, expected, rtol=1e-5, atol=1e-6)
    assert (in_window > 0).any() and (in_window == 0).any()
    for p in (sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec):  # nothing reaches the encoder or the decoder
        assert p.grad is None or not p.grad.any()


# ----------------------------------------------------------------------------- forward
def test_codes_are_pre_activations_above_their_thresholds():
    sae = _random_sae()
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pre = sae.pre_acts(x)
        expected = pre * (pre > sae.threshold)
        assert (expected > 0).any() and (expected == 0).any()
        _close(sae.encode(x), expected)
        code = sae.encode_sparse(x)
        _close(code.to_dense(sae.d_sae), expected)
        assert torch.equal(code.k, (pre > sae.threshold).sum(1))
        out = sae(x)
        assert torch.equal(out.l0, (pre > sae.threshold).sum(1))
        _close(out.codes, expected)
        _close(out.x_hat, sae.decode(expected), atol=1e-5)
        _close(out.l0_loss, (pre > sae.threshold).float().sum(1).mean())
        assert (out.top_acts[:, :-1] >= out.top_acts[:, 1:]).all()  # descending, as the family's


def test_sparse_training_path_has_the_dense_gradients():
    """forward's sparse encoder backward and decode (active latents and the window below θ), AuxK included,
    give the gradients of the dense ``pre``, ``f @ W_dec`` and the family's ``_aux_hat``."""
    sae = _random_sae()
    sae.train()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::5] = True
    lam = 0.05

    def grads(loss_fn):
        sae.zero_grad()
        loss_fn().backward()
        return {n: p.grad.clone() for n, p in sae.named_parameters()}

    def sparse():
        out = sae(x, dead_mask=dead, k_aux=4)
        return out.mse + lam * out.l0_loss + out.auxk_loss

    def dense():
        pre, theta = sae.pre_acts(x), sae.log_threshold.exp()
        f = _JumpReLU.apply(pre, theta, sae.bandwidth)
        aux_hat = sae._aux_hat(pre, dead.nonzero().flatten(), 4)
        out = sae._losses(x, f @ sae.W_dec + sae.b_dec, f, torch.zeros_like(f, dtype=torch.long), sae.d_sae, aux_hat)
        return out.mse + lam * _Step.apply(pre, theta, sae.bandwidth).sum(1).mean() + out.auxk_loss

    got, want = grads(sparse), grads(dense)
    assert want["scaled_log_threshold"].abs().max() > 0
    for name in want:
        _close(got[name], want[name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the controller
@pytest.mark.parametrize("l0, direction", [(20.0, "up"), (12.0, "up"), (5.0, "down"), (10.0, "same"), (80.0, "up")],
                         ids=["double", "above", "half", "on_target", "clamped"])
def test_controller_raises_lambda_above_the_target_and_lowers_it_below(l0, direction):
    sae = JumpReLUSAE(8, 64, target_l0=10, l0_coefficient=0.01)
    assert sae.l0_lambda == pytest.approx(0.01)  # before any batch: λ_I alone
    e = min(1.0, max(-1.0, l0 / 10 - 1))
    new = sae.step_controller(l0)
    assert new == pytest.approx(0.01 * math.exp(sae.controller_rate * e) * math.exp(sae.controller_gain * e))
    assert {"up": new > 0.01, "down": new < 0.01, "same": new == pytest.approx(0.01)}[direction]


def test_controller_holds_its_integral_while_l0_moves_toward_the_target():
    sae = JumpReLUSAE(8, 64, target_l0=10, l0_coefficient=0.01)
    sae.step_controller(4.0)  # below the target: λ_I falls
    low = float(sae.lambda_integral)
    sae.step_controller(8.0)  # the running mean rises toward 10: λ_I holds (anti-wind-up), λ follows the mean
    assert float(sae.lambda_integral) == low < 0.01
    assert sae.l0_ema.item() == pytest.approx(0.9 * 4 + 0.1 * 8)
    sae.step_controller(1.0)  # falls away from the target again: λ_I falls
    assert float(sae.lambda_integral) < low


def test_without_a_target_lambda_is_fixed():
    sae = JumpReLUSAE(8, 64, l0_coefficient=0.02)
    assert sae.step_controller(50.0) == 0.02 and sae.step_controller(1.0) == 0.02
    assert JumpReLUSAE(8, 64).l0_lambda == pytest.approx(1 / 8)  # default: 1/d_in


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("target", [4.0, 6.0])
def test_training_lands_at_the_target_l0(target):
    """Below the data's own L0 (8 atoms a row on average), so the penalty has work to do."""
    X, X_test = _atoms_data(), _atoms_data(n=1000, seed=1)
    sae = JumpReLUSAE(32, 128, target_l0=target, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", L0TargetWarning)  # training ends within tolerance: no warning
        sae, hist = train_sae(sae, X, cfg=TrainConfig(steps=300, batch_size=256), progress=False)
        gap = sae.l0_gap(X_test)  # held-out rows
    assert not sae.training and gap["within"] and abs(gap["gap"]) <= sae.l0_tolerance
    assert abs(float(sae.l0_ema) / target - 1) <= sae.l0_tolerance
    res = evaluate(sae, X_test)
    assert res["l0_mean"] == pytest.approx(gap["l0"])
    assert res["fve"] > 0.3  # learned a dictionary (an SAE that learned nothing has FVE <= 0)
    assert hist["k_min"].iloc[-1] < hist["k_max"].iloc[-1]  # L0 varies by row
    _close(sae.W_dec.norm(dim=1), torch.ones(128))  # the family's unit-norm decoder


@pytest.mark.slow
def test_a_run_that_misses_the_target_warns_with_the_numbers_and_the_fix():
    X = _atoms_data(n=500)
    sae = JumpReLUSAE(32, 128, target_l0=4, init_threshold=1e-3, controller_rate=0, controller_gain=0,
                      l0_coefficient=1e-9, seed=0)  # λ fixed at almost 0: every positive pre-activation fires
    with pytest.warns(L0TargetWarning, match=r"mean L0 on the last training batches .* is \d+\.\d+, target 4 "
                                             r"\(\+\d+\.\d%; tolerance ±10%\).*Fix: train longer"):
        train_sae(sae, X, cfg=TrainConfig(steps=10, batch_size=128, dead_after_vectors=256), progress=False)
    with pytest.warns(L0TargetWarning, match="mean L0 on 500 rows"):
        gap = sae.l0_gap(X)
    assert not gap["within"] and gap["gap"] > 1 and gap["target"] == 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", L0TargetWarning)
        assert sae.l0_gap(X, target=gap["l0"])["within"]  # another target, e.g. AdaptiveK's realised L0


@pytest.mark.slow
def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    X = _atoms_data(n=600)
    cfg = TrainConfig(steps=16, batch_size=64, checkpoint_every=4, dead_after_vectors=128)  # AuxK runs too

    class Stop(Exception):
        pass

    def stop_at_10(step, row):
        if step == 10:
            raise Stop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", L0TargetWarning)
        ref, ref_hist = train_sae(JumpReLUSAE(32, 64, target_l0=5, seed=0), X, cfg=cfg, progress=False)
        with pytest.raises(Stop):
            train_sae(JumpReLUSAE(32, 64, target_l0=5, seed=0), X, cfg=cfg, progress=False,
                      checkpoint_dir=tmp_path, callback=stop_at_10)
        calls = []
        res, res_hist = train_sae(JumpReLUSAE(32, 64, target_l0=5, seed=0), X, cfg=cfg, progress=False,
                                  checkpoint_dir=tmp_path, callback=lambda step, row: calls.append(step))
    assert calls[0] == 9  # resumed after the step-8 checkpoint
    cols = [c for c in ref_hist.columns if c != "time_s"]
    assert ref_hist[cols].equals(res_hist[cols])
    for name, v in ref.state_dict().items():  # thresholds, λ_I and the running L0 included
        assert torch.equal(v, res.state_dict()[name]), name


# ----------------------------------------------------------------------------- save / load, registry
def test_save_load_round_trip_is_exact(tmp_path):
    X = _atoms_data(n=400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", L0TargetWarning)
        sae, _ = train_sae(JumpReLUSAE(32, 64, target_l0=5, seed=0), X, cfg=TrainConfig(steps=10, batch_size=64, dead_after_vectors=128),
                           progress=False)
    sae.save(tmp_path / "j")
    back = load_sae(tmp_path / "j")
    assert type(back) is JumpReLUSAE and back.cfg == sae.cfg and not back.training
    for name, v in sae.state_dict().items():
        assert torch.equal(v, back.state_dict()[name]), name
    assert back.l0_lambda == sae.l0_lambda and bool(back.threshold_ready)
    with torch.no_grad():
        assert torch.equal(back.encode(X[:50]), sae.encode(X[:50]))
        assert torch.equal(back(X[:50]).x_hat, sae(X[:50]).x_hat)


def test_registered_under_jumprelu():
    cfg = JumpReLUConfig(8, 32, target_l0=4.5)
    sae = SparseAutoencoder.from_config(cfg, seed=0)
    assert type(sae) is JumpReLUSAE and sae.cfg == cfg and cfg.architecture == "jumprelu"
    assert sae.target_l0 == 4.5 and sae.threshold.shape == (32,)


# ----------------------------------------------------------------------------- bad input
_SAE = JumpReLUSAE(8, 32, seed=0)
_X = torch.randn(6, 8)


@pytest.mark.parametrize("make, error, match", [
    (lambda: JumpReLUSAE(8, 32, target_l0=0), ValueError, r"target_l0 must be a number in \(0, d_sae=32\).*l0_mean"),
    (lambda: JumpReLUSAE(8, 32, target_l0=-3), ValueError, r"target_l0 must be a number in \(0, d_sae=32\)"),
    (lambda: JumpReLUSAE(8, 32, target_l0=32), ValueError, r"target_l0 must be a number in \(0, d_sae=32\)"),
    (lambda: JumpReLUSAE(8, 32, target_l0=math.nan), ValueError, r"target_l0 must be a number"),
    (lambda: JumpReLUSAE(8, 32, target_l0=True), ValueError, r"target_l0 must be a number"),
    (lambda: JumpReLUSAE(8, 32, bandwidth=0), ValueError, r"bandwidth must be a finite number > 0.*pre-activation"),
    (lambda: JumpReLUSAE(8, 32, bandwidth=-0.1), ValueError, r"bandwidth must be a finite number > 0"),
    (lambda: JumpReLUSAE(8, 32, bandwidth=math.inf), ValueError, r"bandwidth must be a finite number > 0"),
    (lambda: JumpReLUSAE(8, 32, init_threshold=0), ValueError, r"init_threshold must be a finite number > 0.*positive"),
    (lambda: JumpReLUSAE(8, 32, init_threshold=-1.0), ValueError, r"init_threshold must be a finite number > 0"),
    (lambda: JumpReLUSAE(8, 32, l0_coefficient=0), ValueError, r"l0_coefficient must be a finite number > 0"),
    (lambda: JumpReLUSAE(8, 32, threshold_speed=0), ValueError, r"threshold_speed must be a finite number > 0"),
    (lambda: JumpReLUSAE(8, 32, controller_rate=-0.1), ValueError, r"controller_rate must be a number in \[0, 10\]"),
    (lambda: JumpReLUSAE(8, 32, controller_gain=math.nan), ValueError, r"controller_gain must be a number in"),
    (lambda: JumpReLUSAE(8, 32, l0_tolerance=0), ValueError, r"l0_tolerance must be a finite number > 0"),
    (lambda: _SAE.encode(_X, 3), TypeError, r"JumpReLUSAE has no k.*target_l0"),
    (lambda: _SAE.encode_sparse(_X, 3), TypeError, r"JumpReLUSAE has no k"),
    (lambda: _SAE(_X, 3), TypeError, r"JumpReLUSAE has no k"),
    (lambda: _SAE(_X, k_soft=torch.ones(6)), TypeError, r"JumpReLUSAE has no k_soft"),
    (lambda: evaluate(_SAE, _X, k=3), TypeError, r"JumpReLUSAE has no k"),
    (lambda: train_sae(JumpReLUSAE(8, 32), _X, cfg=TrainConfig(steps=1, batch_size=4), k=torch.ones(6, dtype=torch.long),
                       progress=False), TypeError, r"JumpReLUSAE has no k"),
    (lambda: _SAE(_X[:0]), ValueError, r"x has no rows"),
    (lambda: _SAE.l0_gap(_X), ValueError, r"l0_gap needs a target L0 > 0: pass target="),
    (lambda: _SAE.l0_gap(_X, target=0), ValueError, r"l0_gap needs a target L0 > 0"),
    (lambda: _SAE.l0_gap(_X[:0], target=3), ValueError, r"X has 0 rows"),
    (lambda: _SAE.init_thresholds(_X), ValueError, r"init_thresholds needs l0 \(or target_l0\)"),
], ids=["target_zero", "target_negative", "target_d_sae", "target_nan", "target_bool", "bandwidth_zero",
        "bandwidth_negative", "bandwidth_inf", "threshold_zero", "threshold_negative", "coefficient_zero",
        "speed_zero", "rate_negative", "gain_nan", "tolerance_zero", "encode_k", "encode_sparse_k", "forward_k",
        "forward_k_soft", "evaluate_k", "train_k", "empty_batch", "gap_without_target", "gap_target_zero",
        "gap_empty", "init_without_l0"])
def test_bad_inputs_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
