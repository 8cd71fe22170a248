"""train_sae: recovery of a known dictionary, the three AdaptiveK phases, per-row k, resume, faithful k gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import _close

from adaptivek import fused
from adaptivek.probe import RidgeProbe
from adaptivek.sae import AdaptiveKSAE, TopKSAE
from adaptivek.training import JointProbe, TrainConfig, _Batches, lr_factor, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _dictionary_data(n=4096, d=32, atoms=64, k=4, seed=0):
    """x = sum of k random unit atoms (of `atoms`) with magnitudes in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=g).topk(k, dim=1).indices
    codes = torch.zeros(n, atoms).scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return codes @ D, D, codes


def _complexity_data(n=1024, d=16, seed=0):
    """Vectors whose complexity label is linear in them (so the probe works), in [0, 10]."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = (5 + 1.5 * X[:, 0] + torch.randn(n, generator=g) * 0.5).clamp(0, 10)
    return X, y


def _small_cfg(**kw):
    base = dict(steps=12, batch_size=128, warmup_steps=2, dead_after_vectors=256, phase_ratio=0.5, probe_folds=3)
    return TrainConfig(**(base | kw))


def test_recovers_a_known_sparse_dictionary():
    X, D, _ = _dictionary_data()
    sae = TopKSAE(32, 64, 4, seed=0)
    sae, hist = train_sae(sae, X, cfg=TrainConfig(steps=200, batch_size=256, lr=1e-2), progress=False)
    with torch.no_grad():
        out = sae(X)
    assert 1 - out.fvu.item() > 0.9
    cos = (D @ sae.W_dec.T).max(1).values  # best match of each true atom
    assert (cos > 0.9).float().mean() >= 0.9
    _close(sae.W_dec.norm(dim=1), torch.ones(64))  # unit rows after training
    assert hist["fve"].iloc[-1] > hist["fve"].iloc[0] and (hist["l0"] <= 4).all()


@pytest.mark.parametrize("kind", ["topk", "adaptivek"])
def test_bf16_autocast_trains_in_float32_with_a_bf16_encoder_matmul(kind, monkeypatch):
    X, D, _ = _dictionary_data()
    seen = []
    real = fused._addmm
    monkeypatch.setattr(fused, "_addmm", lambda b, x, W, dt=None: seen.append(
        dt or (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)) or real(b, x, W, dt))
    if kind == "topk":
        sae, y = TopKSAE(32, 64, 4, seed=0), None
    else:  # k from a probe of a label that tracks the number of atoms' total magnitude
        sae, y = AdaptiveKSAE(32, 64, k_min=2, k_max=8, seed=0), X.norm(dim=1)
    sae32 = copy.deepcopy(sae)
    cfg = TrainConfig(steps=200, batch_size=256, lr=1e-2, autocast="bfloat16", phase_ratio=0.9)
    sae, hist = train_sae(sae, X, y, cfg=cfg, progress=False)
    assert set(seen) == {torch.bfloat16}  # every training step's encoder matmul ran in bf16
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    seen.clear()
    _, hist32 = train_sae(sae32, X, y, cfg=TrainConfig(**{**cfg.__dict__, "autocast": None}), progress=False)
    assert set(seen) == {None}
    # bf16 rounding of the pre-activations changes some top-k choices, not how well the SAE learns
    assert hist["fve"].iloc[-1] > 0.8 and abs(hist["fve"].iloc[-1] - hist32["fve"].iloc[-1]) < 0.01
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="float16")


def test_adaptive_k_three_phases_in_history():
    X, y = _complexity_data()
    sae = AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0)
    sae, hist = train_sae(sae, X, y, _small_cfg(), progress=False)
    assert sae.probe.is_fitted
    assert list(hist["phase"].unique()) == [1, 2, 3]
    assert hist.loc[hist.phase == 1, "step"].tolist() == [0]
    assert hist.loc[hist.phase == 3, "step"].min() == 7  # int(0.5 * 12) = 6 -> the 7th update
    p3 = hist[hist.phase == 3]
    assert p3["probe_loss"].notna().all() and p3["deviation_weight"].between(0.01, 0.5).all()
    assert hist.loc[hist.phase == 2, "probe_loss"].isna().all()
    assert (hist.loc[hist.phase > 1, "k_min"] >= 2).all() and (hist.loc[hist.phase > 1, "k_max"] <= 20).all()
    _close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert hist.loc[hist.phase > 1, "lr"].iloc[-1] < hist.loc[hist.phase > 1, "lr"].max()  # decayed


def test_faithful_mode_gives_the_probe_no_gradient_from_the_sae():
    """γ = 0 leaves only the SAE loss on the probe: faithful (rounded k) must not move it, ST must."""
    X, y = _complexity_data()
    moved = {}
    for mode in ("none", "straight_through"):
        sae = AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0)
        sae, _ = train_sae(sae, X, y, _small_cfg(probe_weight=0.0, k_gradient=mode, fit_probe=True),
                           progress=False)
        w0 = RidgeProbe.fit(X, y, folds=3).weight
        moved[mode] = float((sae.probe.weight - w0).abs().max())
    assert moved["none"] < 1e-6  # only float32 round-off of the float64 fit
    assert moved["straight_through"] > 1e-4


def test_faithful_sae_loss_has_no_path_to_the_probe():
    X, y = _complexity_data(n=200)
    sae = AdaptiveKSAE(16, 64, RidgeProbe.fit(X, y, folds=3), k_min=2, k_max=20, seed=0)
    w = sae.probe.weight.float().requires_grad_(True)
    pred = (X @ w + sae.probe.bias.float()).clamp(0, 10)
    out = sae(X, sae.k_from_complexity(pred.detach()))
    assert torch.autograd.grad(out.mse, w, allow_unused=True)[0] is None
    out = sae(X, sae.k_from_complexity(pred.detach()), k_soft=sae.soft_k(pred))
    assert torch.autograd.grad(out.mse, w)[0].abs().sum() > 0


def _die_after_step_10(X, y, cfg, ckpt_dir):
    """Train AdaptiveKSAE(16, 64, k in [2, 20], seed 0) with checkpoints in ``ckpt_dir`` and stop it after step 10."""

    class Stop(Exception):
        pass

    def stop_at_10(step, row):
        if step == 10:
            raise Stop

    with pytest.raises(Stop):
        train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0), X, y, cfg, progress=False,
                  checkpoint_dir=ckpt_dir, callback=stop_at_10)


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    X, y = _complexity_data(n=600)
    cfg = _small_cfg(checkpoint_every=4)
    ref, ref_hist = train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0), X, y, cfg, progress=False)
    _die_after_step_10(X, y, cfg, tmp_path)  # the last checkpoint is step 8 (inside phase 3)
    calls = []
    fresh = AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0)  # the same init (another one is refused)
    res, res_hist = train_sae(fresh, X, y, cfg, progress=False, checkpoint_dir=tmp_path,
                              callback=lambda step, row: calls.append(step))
    assert calls[0] == 9  # resumed after the step-8 checkpoint
    for k, v in ref.state_dict().items():
        assert torch.equal(v, res.state_dict()[k]), k
    assert torch.equal(ref.probe.weight, res.probe.weight)
    cols = [c for c in ref_hist.columns if c != "time_s"]
    assert ref_hist[cols].equals(res_hist[cols])
    with pytest.raises(ValueError, match=r"another run: it differs in TrainConfig.lr \(None there, 0.005 now\)"):
        train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20), X, y, _small_cfg(lr=5e-3), progress=False,
                  checkpoint_dir=tmp_path)


def test_lr_schedule_and_deviation_rule():
    f = [lr_factor(s, 100, 10, 0.8) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == pytest.approx(1.0) and f[99] == pytest.approx(0.05) and f[90] < f[85]
    cfg = TrainConfig()
    jp = JointProbe.start(torch.zeros(4), torch.zeros(()), cfg)
    assert jp.delta == 0.2 and jp.w.requires_grad and not jp.w0.requires_grad
    for loss in (1.0, 0.9, 0.8):  # fell 20 % over 3 steps -> relax
        jp.update_delta(loss, cfg)
    assert jp.delta == pytest.approx(0.16)
    for loss in [0.8] * 20:  # stalled -> tighten, capped at 0.5
        jp.update_delta(loss, cfg)
    assert jp.delta == 0.5


def test_joint_probe_write_back_and_state_round_trip():
    X, y = _complexity_data(n=200)
    sae = AdaptiveKSAE(16, 64, RidgeProbe.fit(X, y, folds=3), k_min=2, k_max=20, seed=0)
    cfg = TrainConfig()
    jp = JointProbe.of(sae, cfg)
    terms = jp.loss(X[:32], y[:32], sae.probe, cfg)
    _close(terms.pred, sae.probe.predict(X[:32]).float())
    assert terms.deviation.item() == 0.0
    terms.loss.backward()
    jp.step(terms.loss.item(), 1e-2, cfg)
    back = JointProbe.from_state(copy.deepcopy(jp.state_dict()), cfg)
    assert torch.equal(back.w, jp.w) and back.delta == jp.delta and back.losses == jp.losses
    jp.write_back(sae)
    assert sae.probe.weight.dtype == torch.float64 and torch.equal(sae.probe.weight, jp.w.detach().double())


def test_training_with_a_k_per_row():
    X, _, _ = _dictionary_data(n=1000)
    cfg = TrainConfig(steps=6, batch_size=128, log_every=1, dead_after_vectors=256)
    same, _ = train_sae(TopKSAE(32, 64, 4, seed=0), X, cfg=cfg, k=torch.full((1000,), 4), progress=False)
    ref, _ = train_sae(TopKSAE(32, 64, 4, seed=0), X, cfg=cfg, progress=False)
    for name, v in ref.state_dict().items():  # a constant k per row is TopK itself
        assert torch.equal(v, same.state_dict()[name]), name
    k = torch.arange(1000) % 7 + 1
    _, hist = train_sae(TopKSAE(32, 64, 7, seed=0), X, cfg=cfg, k=k, progress=False)
    batches = _Batches(1000, 128, cfg.seed)
    want = [float(k[batches(s)].float().mean()) for s in range(6)]
    assert hist["k_mean"].tolist() == pytest.approx(want) and (hist["k_min"] == 1).all()


def test_adaptivek_with_given_k_uses_it_in_phase_2_only():
    X, y = _complexity_data(n=600)
    k = torch.arange(600) % 3 + 2  # 2, 3, 4: unlike the probe's k in [2, 20]
    _, hist = train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=0), X, y, _small_cfg(), k=k, progress=False)
    p2, p3 = hist[hist.phase == 2], hist[hist.phase == 3]
    assert (p2["k_min"] >= 2).all() and (p2["k_max"] <= 4).all()
    assert (p3["k_max"] > 4).all()  # the live probe again


@pytest.mark.parametrize("call,error,match", [
    (lambda X, y: train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20), X, y[:99], _small_cfg(), progress=False),
     ValueError, "labels have the wrong length: y has 99 entries but X has 100"),
    (lambda X, y: train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20), X, None, _small_cfg(), progress=False),
     ValueError, "needs the complexity labels"),
    (lambda X, y: train_sae(AdaptiveKSAE(16, 64, k_min=2, k_max=20), X, y.index_fill(0, torch.tensor([7]), float("nan")),
                            _small_cfg(), progress=False), ValueError, r"y contains NaN or inf in 1 row\(s\) \(first: \[7\]\)"),
    (lambda X, y: train_sae(TopKSAE(16, 64, 4), X.index_fill(0, torch.tensor([3]), float("nan")), cfg=_small_cfg(),
                            progress=False), ValueError, r"X contains NaN or inf in 1 row\(s\) \(first: \[3\]\)"),
    (lambda X, y: train_sae(TopKSAE(16, 64, 4), X[:, :8], cfg=_small_cfg(), progress=False),
     ValueError, r"shape \[n, d_in=16\]"),
    (lambda X, y: train_sae(TopKSAE(16, 64, 4), X.numpy(), cfg=_small_cfg(), progress=False),
     TypeError, "X must be a torch.Tensor"),
    (lambda X, y: train_sae(TopKSAE(16, 64, 4), X, cfg=_small_cfg(), k=torch.ones(99, dtype=torch.long),
                            progress=False), ValueError, r"k must be an integer tensor \[n=100\]"),
    (lambda X, y: train_sae(TopKSAE(16, 64, 4), X, cfg=_small_cfg(), k=torch.full((100,), 65), progress=False),
     ValueError, r"k must lie in \[1, d_sae=64\]"),
    (lambda X, y: TrainConfig(phase_ratio=0.0), ValueError, "phase_ratio"),
    (lambda X, y: TrainConfig(k_gradient="soft"), ValueError, "k_gradient"),
    (lambda X, y: TrainConfig(batch_size=0), ValueError, "batch_size"),
], ids=["y-length", "y-missing", "y-nan", "x-nan", "x-width", "x-numpy", "k-length", "k-range", "phase_ratio",
        "k_gradient", "batch_size"])
def test_bad_training_inputs(call, error, match):
    X, y = _complexity_data(n=100)
    with pytest.raises(error, match=match):
        call(X, y)


def test_unlabelled_rows_train_the_sae_but_never_the_probe():
    X, y = _complexity_data(n=512)
    y_nan = y.clone()
    unl = torch.arange(0, 512, 4)
    y_nan[unl] = float("nan")
    cfg = _small_cfg(steps=20, phase_ratio=0.5)
    with pytest.raises(ValueError, match="reconstruct_only"):
        train_sae(AdaptiveKSAE(16, 32, k_min=2, k_max=8, seed=0), X, y_nan, cfg, progress=False)
    cfg = _small_cfg(steps=20, phase_ratio=0.5, unlabelled="reconstruct_only")
    a, hist = train_sae(AdaptiveKSAE(16, 32, k_min=2, k_max=8, seed=0), X, y_nan, cfg, progress=False)
    assert hist.n_labelled.iloc[0] == 512 - len(unl)
    assert hist.probe_rmse.dropna().notna().all() and (hist.phase == 3).any()
    assert bool(torch.isfinite(a.W_dec).all() and torch.isfinite(a.probe.weight).all())
    # phase 1 is the ridge fit on the labelled rows alone
    lab = ~torch.isnan(y_nan)
    want = RidgeProbe.fit(X[lab], y_nan[lab], lambdas=cfg.probe_lambdas, folds=cfg.probe_folds, seed=cfg.seed)
    assert hist.probe_lambda.iloc[0] == want.lambda_
    # a labelled row's label reaches the probe
    y_moved = y_nan.clone()
    y_moved[1] += 3.0
    c, _ = train_sae(AdaptiveKSAE(16, 32, k_min=2, k_max=8, seed=0), X, y_moved, cfg, progress=False)
    assert not torch.equal(a.probe.weight, c.probe.weight)
    with pytest.raises(ValueError, match="at least 2 labelled"):
        train_sae(AdaptiveKSAE(16, 32, k_min=2, k_max=8, seed=0), X, torch.full((512,), float("nan")), cfg,
                  progress=False)
    with pytest.raises(ValueError, match="unlabelled"):
        TrainConfig(unlabelled="skip")
