"""The optimisers of adaptivek.optim and their use in train_sae (TrainConfig.optimizer)."""

from __future__ import annotations

import math

import pytest
import torch
from test_training import _complexity_data, _dictionary_data, _die_after_step_10, _small_cfg

from adaptivek.evaluation import evaluate
from adaptivek.optim import (
    SIGNUM_LR,
    ScheduleFreeSignSGD,
    SignSGD,
    averaged,
    default_lr,
    make_optimizer,
    signum_lr,
    to_eval,
)
from adaptivek.sae import AdaptiveKSAE, TopKSAE
from adaptivek.training import TrainConfig, train_sae


def test_sign_sgd_moves_every_weight_by_exactly_lr():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 4.0]))
    p.grad = torch.tensor([0.5, -1e-9, 0.0, 7.0])
    SignSGD([p], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.tensor([0.9, -1.9, 3.0, 3.9]))


def test_default_learning_rates():
    assert signum_lr(2**14) == pytest.approx(SIGNUM_LR)
    assert signum_lr(4 * 2**14) == pytest.approx(SIGNUM_LR / 2)  # 1 / sqrt(d_sae)
    assert signum_lr(2**14, base=5e-3) == pytest.approx(5e-3)
    assert default_lr("adam", 123) == 1e-3
    assert TrainConfig(optimizer="signum").sae_lr(2**14) == pytest.approx(SIGNUM_LR)
    assert TrainConfig(optimizer="signum", signum_base_lr=1e-2).sae_lr(4 * 2**14) == pytest.approx(5e-3)
    assert TrainConfig.sparsify_recipe().sae_lr(2**14) == pytest.approx(5e-3)  # sparsify's own rate
    assert TrainConfig(optimizer="signum", lr=0.02).sae_lr(2**14) == 0.02


def test_schedule_free_average_differs_from_the_gradient_point():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("signum", [p], 0.1)
    for _ in range(5):
        p.grad = torch.ones(3)
        opt.step()
    y = p.detach().clone()
    with averaged(opt):
        x = p.detach().clone()
    assert torch.equal(p.detach(), y) or torch.allclose(p.detach(), y, atol=1e-7)  # back to y after the block
    assert (x > y).all()  # the average lags behind the point that keeps descending
    to_eval(opt)
    assert torch.allclose(p.detach(), x, atol=1e-7)


@pytest.mark.parametrize("sae_cls", ["topk", "adaptivek"])
def test_signum_trains(sae_cls):
    X, y = _complexity_data(n=1024)
    sae = TopKSAE(16, 64, 4, seed=0) if sae_cls == "topk" else AdaptiveKSAE(16, 64, k_min=2, k_max=8, seed=0)
    before = evaluate(sae, X, k=4)["fve"]
    sae, hist = train_sae(sae, X, y, _small_cfg(steps=60, optimizer="signum"), progress=False)
    assert evaluate(sae, X, k=4)["fve"] > before + 0.1
    assert list(hist["lr"].iloc[1:]) == pytest.approx([signum_lr(64)] * (len(hist) - 1))  # no warm-up, no decay


def test_signum_recovers_a_known_sparse_dictionary():
    X, D, _ = _dictionary_data()
    sae, _ = train_sae(TopKSAE(32, 64, 4, seed=0), X, cfg=TrainConfig(steps=200, batch_size=256, optimizer="signum"),
                       progress=False)
    cos = (D @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T).max(1).values
    assert (cos > 0.9).float().mean() >= 0.9


def test_callback_sees_the_weights_training_returns():
    X, y = _complexity_data(n=512)
    seen = {}

    def callback(step, row):
        if step == 30:
            seen["fve"] = evaluate(sae, X)["fve"]

    sae = TopKSAE(16, 64, 4, seed=0)
    train_sae(sae, X, cfg=_small_cfg(steps=30, optimizer="signum"), progress=False, callback=callback)
    assert seen["fve"] == pytest.approx(evaluate(sae, X)["fve"], abs=1e-6)


def test_signum_resume_equals_uninterrupted_run(tmp_path):
    X, y = _complexity_data(n=600)
    cfg = _small_cfg(steps=16, checkpoint_every=4, optimizer="signum")
    ref, _ = train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0), X, y, cfg, progress=False)
    _die_after_step_10(X, y, cfg, tmp_path)
    res, _ = train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0), X, y, cfg, progress=False,
                       checkpoint_dir=tmp_path)
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, res.state_dict()[k], atol=1e-6), k
    with pytest.warns(UserWarning, match="finished"):  # a finished run comes back averaged, not at its y
        again, _ = train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0), X, y, cfg, progress=False,
                             checkpoint_dir=tmp_path)
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, again.state_dict()[k], atol=1e-6), k


@pytest.mark.parametrize("kw,match", [
    (dict(optimizer="sgd"), r"TrainConfig.optimizer='sgd': must be 'adam'"),
    (dict(optimizer="signum", lr=math.nan), r"TrainConfig.lr=nan: must be a finite number > 0"),
    (dict(optimizer="signum", lr=-1.0), r"TrainConfig.lr=-1.0: must be a finite number > 0"),
], ids=["unknown", "nan-lr", "negative-lr"])
def test_bad_optimizer_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_sign_sgd_refuses_a_bad_lr():
    with pytest.raises(ValueError, match="finite lr > 0"):
        SignSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


@pytest.mark.parametrize("kw,match", [
    (dict(lr=0.0), r"ScheduleFreeSignSGD needs a finite lr > 0, got 0.0"),
    (dict(lr=math.inf), r"ScheduleFreeSignSGD needs a finite lr > 0, got inf"),
    (dict(lr=0.1, momentum=1.0), r"ScheduleFreeSignSGD needs 0 < momentum < 1, got 1.0"),
    (dict(lr=0.1, momentum=0.0), r"ScheduleFreeSignSGD needs 0 < momentum < 1, got 0.0"),
], ids=["zero-lr", "inf-lr", "momentum-1", "momentum-0"])
def test_schedule_free_sign_sgd_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        ScheduleFreeSignSGD([torch.nn.Parameter(torch.zeros(1))], **kw)


def _quadratic_run(opt_of, steps=150):
    """(y, x) after ``steps`` steps of ``opt_of([p])`` on a least-squares problem (gradient set by hand)."""
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(40, 30, generator=g), torch.randn(40, generator=g)
    p = torch.nn.Parameter(torch.randn(30, generator=g))
    opt = opt_of([p])
    opt.train()
    for _ in range(steps):
        p.grad = A.T @ (A @ p.detach() - b)
        opt.step()
    y = p.detach().clone()
    opt.eval()
    return y, p.detach().clone()


@pytest.mark.parametrize("r", [0.0, 1.0, 2.5])
def test_schedule_free_sign_sgd_is_schedulefrees_wrapper_around_sign_sgd(r):
    from schedulefree import ScheduleFreeWrapperReference

    y_ref, x_ref = _quadratic_run(lambda ps: ScheduleFreeWrapperReference(SignSGD(ps, lr=0.01), momentum=0.95, r=r))
    y, x = _quadratic_run(lambda ps: ScheduleFreeSignSGD(ps, lr=0.01, r=r))
    assert (x_ref - y_ref).abs().max() > 1e-2  # the average and the gradient point really differ
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(x, x_ref, atol=1e-5)


def test_average_power_weights_later_iterates_more():
    # z walks 0.1 per step from 0; after 4 steps z = -0.1, -0.2, -0.3, -0.4: a plain average is -0.25, the
    # average weighted by t is -(1 + 4 + 9 + 16) / 10 / 10 = -0.3
    xs = {}
    for r in (0.0, 1.0):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = ScheduleFreeSignSGD([p], lr=0.1, r=r)
        for _ in range(4):
            p.grad = torch.ones(1)
            opt.step()
        opt.eval()
        xs[r] = float(p.detach())
    assert xs[0.0] == pytest.approx(-0.25) and xs[1.0] == pytest.approx(-0.3)


def test_train_sae_passes_the_average_power_to_the_optimiser():
    X, _ = _complexity_data(n=256)
    runs = {}
    for power in (0.0, 1.0):
        sae, _ = train_sae(TopKSAE(16, 64, 4, seed=0), X, cfg=_small_cfg(steps=8, optimizer="signum",
                                                                            average_power=power), progress=False)
        runs[power] = sae.W_dec.detach().clone()
    assert not torch.allclose(runs[0.0], runs[1.0])


@pytest.mark.parametrize(("field", "bad"), [("average_power", -1.0), ("average_power", float("nan")),
                                            ("signum_base_lr", 0.0), ("signum_base_lr", float("inf"))])
def test_bad_signum_settings_are_refused(field, bad):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: bad})
    with pytest.raises(ValueError, match="r >= 0"):
        ScheduleFreeSignSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, r=-1.0)


def test_step_needs_train_mode():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ScheduleFreeSignSGD([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    opt.eval()
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"needs train mode .* call .train\(\) after .eval\(\)"):
        opt.step()


def test_train_recovers_y_from_x_and_z_without_the_kept_copy():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = ScheduleFreeSignSGD([p], lr=0.1)
    for i in range(6):
        p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0]) * (1 if i % 3 else -1)
        opt.step()
    y = p.detach().clone()
    opt.eval()  # p now holds x; a fresh optimiser loaded from the state knows only z
    again = ScheduleFreeSignSGD([p], lr=0.1)
    again.load_state_dict(opt.state_dict())
    again.train_mode = False
    again.train()
    assert torch.allclose(p.detach(), y, atol=1e-6)


def test_looking_at_the_average_leaves_the_run_unchanged():
    X, _ = _complexity_data(n=512)
    cfg = _small_cfg(steps=12, optimizer="signum")
    quiet, _ = train_sae(TopKSAE(16, 64, 4, seed=0), X, cfg=cfg, progress=False)
    looked = TopKSAE(16, 64, 4, seed=0)
    fves = []
    train_sae(looked, X, cfg=cfg, progress=False, callback=lambda step, row: fves.append(evaluate(looked, X)["fve"]))
    assert len(fves) == 12
    for k, v in quiet.state_dict().items():
        assert torch.equal(v, looked.state_dict()[k]), k


@pytest.mark.parametrize(("optimizer", "scale", "factor"), [("adam", None, 1.0), ("signum", None, 3 ** -0.5),
                                                             ("signum", 0.25, 0.25), ("adam", 2.0, 2.0)])
def test_encoder_starts_at_the_recipes_scale(optimizer, scale, factor):
    from adaptivek.training import _prepare

    sae = TopKSAE(8, 16, 2, seed=0)
    before = sae.W_enc.detach().clone()
    cfg = TrainConfig(optimizer=optimizer, enc_init_scale=scale, batch_size=4, steps=2)
    _prepare(sae, torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), cfg, 0)
    assert torch.allclose(sae.W_enc.detach(), before * factor)
    _prepare(sae, torch.randn(4, 8), cfg, 1)  # only a fresh run's first step rescales
    assert torch.allclose(sae.W_enc.detach(), before * factor)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_encoder_scale_is_refused(bad):
    with pytest.raises(ValueError, match="enc_init_scale"):
        TrainConfig(enc_init_scale=bad)


def test_sparsify_recipe_is_signum_without_l1_or_auxk_and_takes_overrides():
    cfg = TrainConfig.sparsify_recipe()
    assert (cfg.optimizer, cfg.l1_weight, cfg.auxk_alpha, cfg.init_b_dec) == ("signum", 0.0, 0.0, "mean")
    assert (cfg.signum_base_lr, cfg.average_power) == (5e-3, 0.0)  # sparsify's rate and plain average
    assert cfg.encoder_scale() == pytest.approx(3 ** -0.5)
    assert TrainConfig.sparsify_recipe(steps=7, l1_weight=0.01).steps == 7
    assert TrainConfig.sparsify_recipe(l1_weight=0.01).l1_weight == 0.01
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig.sparsify_recipe(optimizer="sgd")


def test_a_state_saved_before_the_average_power_existed_resumes_with_a_plain_average():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ScheduleFreeSignSGD([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    state = opt.state_dict()
    del state["param_groups"][0]["r"]
    again = ScheduleFreeSignSGD([p], lr=0.1, r=2.0)
    again.load_state_dict(state)
    assert again.param_groups[0]["r"] == 0.0  # the weights summed so far are a plain average's
    p.grad = torch.ones(2)
    again.step()
