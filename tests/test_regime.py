"""Generalisation checks: PCA reference, train vs held-out FVE, latent health, the held-out curve."""

from __future__ import annotations

import pytest
import torch

from adaptivek import TopKSAE
from adaptivek.regime import HeldOutCurve, generalisation_table, latent_health, pca_fve
from adaptivek.training import TrainConfig, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _low_rank(n=600, d=12, rank=3, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    return torch.randn(n, rank, generator=g) @ basis + noise * torch.randn(n, d, generator=g) + 3.0


def test_pca_fve_against_a_direct_projection():
    X = _low_rank()
    tr, te = X[:400], X[400:]
    got = pca_fve(tr, te, [1, 3, 12])
    assert got[3] > 0.99 and got[1] < got[3] and got[12] == pytest.approx(1.0, abs=1e-9)
    mean = tr.double().mean(0)
    _, _, V = torch.linalg.svd(tr.double() - mean, full_matrices=False)
    P = V[:2].T @ V[:2]
    rec = (te.double() - mean) @ P + mean
    want = 1 - (te.double() - rec).pow(2).sum() / (te.double() - te.double().mean(0)).pow(2).sum()
    assert pca_fve(tr, te, [2])[2] == pytest.approx(float(want), abs=1e-9)
    with pytest.raises(ValueError, match="at most d=12"):
        pca_fve(tr, te, [13])


def test_a_memorising_sae_shows_a_gap_and_a_generalising_one_does_not():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(1000, 16, generator=g)  # no structure: nothing to generalise
    small = X[:40]  # 40 training vectors, 64 latents: room to memorise
    cfg = TrainConfig(steps=300, batch_size=40, lr=1e-2, warmup_steps=5, dead_after_vectors=400, l1_weight=0.0)
    mem, _ = train_sae(TopKSAE(16, 64, 4, seed=0), small, cfg=cfg, progress=False)
    table = generalisation_table({"mem": mem}, small, X[500:], n=None, seed=0)
    assert table.loc["mem", "n"] == 40 and table.loc["mem", "gap"] > 0.1
    Y = _low_rank(n=2000, d=16, rank=4)
    cfg = TrainConfig(steps=200, batch_size=128, lr=1e-2, warmup_steps=5, dead_after_vectors=2000, l1_weight=0.0)
    gen, _ = train_sae(TopKSAE(16, 32, 4, seed=0), Y[:1500], cfg=cfg, progress=False)
    t2 = generalisation_table({"gen": gen}, Y[:1500], Y[1500:], n=400, seed=0)
    assert abs(t2.loc["gen", "gap"]) < 0.05 and t2.loc["gen", "n"] == 400
    assert set(t2.columns) >= {"l0", "train_fve", "test_fve", "pca_fve", "sae_minus_pca"}


def test_latent_health_counts_dead_and_dense_latents():
    sae = TopKSAE(4, 6, 2, seed=0)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.zero_()
        sae.W_enc[0, 0] = 1.0  # latent 0 fires on x[0] > 0 (half the rows)
        sae.W_enc[1, 1] = 1.0  # latent 1 on x[1] > 0
        sae.b_enc[2] = -100.0  # latent 2 never fires; 3-5 are 0 (never active)
    X = torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0], [-1.0, 0, 0, 0], [-1.0, 0, 0, 0]] * 5)
    h = latent_health(sae, X, dense_threshold=0.3)
    assert h["firing_freq"][:2].tolist() == [0.5, 0.25]
    assert h["dead_frac"] == pytest.approx(4 / 6) and h["dense_frac"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="dense_threshold"):
        latent_health(sae, X, dense_threshold=1.5)


def test_held_out_curve_records_every_n_steps_and_restores_training_mode():
    Y = _low_rank(n=800, d=8, rank=2)
    sae = TopKSAE(8, 16, 2, seed=0)
    seen = []
    curve = HeldOutCurve(sae, Y[600:], every=5)
    cfg = TrainConfig(steps=20, batch_size=64, warmup_steps=2, dead_after_vectors=500)

    def both(step, row):
        curve(step, row)
        seen.append(sae.training)

    train_sae(sae, Y[:600], cfg=cfg, progress=False, callback=both)
    frame = curve.frame
    assert frame.step.tolist() == [5, 10, 15, 20] and all(seen)
    assert frame.heldout_fve.iloc[-1] > frame.heldout_fve.iloc[0]
    short = HeldOutCurve(sae, Y[600:], every=50, last=7)  # a run shorter than `every` still gets its final point
    train_sae(TopKSAE(8, 16, 2, seed=0), Y[:600], cfg=TrainConfig(steps=7, batch_size=64, warmup_steps=2),
              progress=False, callback=short)
    assert short.frame.step.tolist() == [7]
