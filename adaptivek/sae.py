"""The SAE family: TopK, AdaptiveK (per-sample k from a complexity probe) and BatchTopK, one implementation.

Every SAE shares :class:`SparseAutoencoder` (SAEBench/SAELens layout): pre-activations ``(x - b_dec) @ W_enc
+ b_enc`` (:meth:`~SparseAutoencoder.pre_acts`), of which row ``i`` keeps its ``k_i`` largest positive ones
(:func:`variable_topk`: top-k at the largest k, then the rank mask ``arange(k_max) < k[:, None]``; the reference
code loops over rows), and the decoder ``x_hat = f @ W_dec + b_dec`` with unit-norm rows of ``W_dec``.

A variant is one small class plus its config (:mod:`adaptivek.sae_config`), registered under the config's
``architecture``; the class gives the rule for k (``_default_k``): fixed (:class:`TopKSAE`),
``complexity_to_k(probe.predict(x))`` (:class:`AdaptiveKSAE`, the paper's Eq. 7) or the batch rule
(:class:`BatchTopKSAE`). A variant with another encoder overrides ``encode_sparse``, one with another
objective ``loss``. :mod:`adaptivek.fused` holds the fast paths, tested against :func:`variable_topk`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sae_config
from .checks import finite_rows
from .fused import _addmm, _bag, _encode_topk, fused_forward, geometric_median
from .sae_config import AdaptiveKConfig, BatchTopKConfig, SAEConfig, TopKConfig, dtype_name

if TYPE_CHECKING:
    from .training import TrainConfig


# ----------------------------------------------------------------------------- sparse codes
class SparseCode(NamedTuple):
    """A sparse encoding: row ``b`` keeps ``top_acts[b][mask[b]]`` at latents ``top_indices[b][mask[b]]``."""

    top_acts: Tensor  # [B, k_max] activations, descending; 0 where masked
    top_indices: Tensor  # [B, k_max] int64 latent of each entry (meaningless where masked)
    mask: Tensor  # [B, k_max] bool: rank < k_i and a positive activation
    k: Tensor  # [B] int64: the k requested for each row

    def to_dense(self, d_sae: int) -> Tensor:
        """Dense codes [B, d_sae] (scatter-add: masked entries are 0 and may repeat a latent)."""
        return self.top_acts.new_zeros(len(self.top_acts), d_sae).scatter_add_(1, self.top_indices, self.top_acts)


def variable_topk(pre: Tensor, k: Tensor) -> SparseCode:
    """The reference variable-k encoder: row i keeps its ``k[i]`` largest positive pre-activations of ``pre [B, d_sae]``."""
    acts, idx = pre.topk(int(k.max()) if len(k) else 0, dim=1)  # [B, k_max], descending (an empty batch: [0, 0])
    acts = acts.relu()
    mask = (torch.arange(acts.shape[1], device=pre.device) < k[:, None]) & (acts > 0)  # rank < k_i, active
    return SparseCode(acts * mask, idx, mask, k)


class ForwardOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns (scalars are 0-d tensors that carry gradients)."""

    x_hat: Tensor  # [B, d_in] reconstruction
    top_acts: Tensor  # [B, k_max] kept activations, descending; 0 at ranks >= k_i and where ReLU is 0
    top_indices: Tensor  # [B, k_max] latent of each entry of top_acts (meaningless where the value is 0)
    k: Tensor  # [B] int64: the k requested for each row
    fvu: Tensor  # () fraction of variance unexplained: sum||x - x_hat||² / sum||x - mean(x)||²
    mse: Tensor  # () mean squared error per element (the reference code's reconstruction loss)
    l1: Tensor  # () mean_b ||f_b||_1 / mean_b ||x_b||_2 (the reference code's sparsity term)
    auxk_loss: Tensor  # () AuxK loss of the dead latents, normalised by the residual variance (0 if none)
    d_sae: int  # dictionary size (to densify the codes)

    @property
    def codes(self) -> Tensor:
        """Dense codes [B, d_sae] (built on access: training never needs them)."""
        return SparseCode(self.top_acts, self.top_indices, self.top_acts > 0, self.k).to_dense(self.d_sae)

    @property
    def l0(self) -> Tensor:
        """Number of active latents per row [B]."""
        return (self.top_acts > 0).sum(1)


# ----------------------------------------------------------------------------- the shared model
class SparseAutoencoder(nn.Module):
    """The family's shared implementation. ``class Sub(SparseAutoencoder, config=SubConfig)`` registers a
    variant under ``SubConfig.architecture``; build it as ``Sub(cfg)`` or with :meth:`from_config`.
    ``self.training`` matters only where a rule learns (BatchTopK's threshold): ``train_sae`` calls ``train()``."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig

    def __init_subclass__(cls, config: type[SAEConfig] | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if config is not None:
            cls.config_class = config
            sae_config.register(config.architecture, cls)

    def __init__(self, cfg: SAEConfig | None = None, *, seed: int | None = None,
                 device: str | torch.device | None = None, **fields: Any) -> None:
        """Build from ``cfg``, or from its fields as keywords (as :meth:`from_config` and ``load_sae`` do)."""
        super().__init__()
        cfg = self.config_class(**fields) if cfg is None else cfg
        if type(cfg) is not self.config_class:
            raise TypeError(f"{type(self).__name__} is built from a {self.config_class.__name__}, got {cfg!r}")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))  # [d_sae, d_in], unit rows
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())  # [d_in, d_sae] = W_decᵀ
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))

    @staticmethod
    def from_config(cfg: SAEConfig, *, seed: int | None = None, device: Any = None) -> SparseAutoencoder:
        """A new SAE of the class registered for ``cfg.architecture``."""
        return sae_config.registered(cfg.architecture)(**asdict(cfg), seed=seed, device=device)

    def __getattr__(self, name: str) -> Any:  # the config's fields read as attributes: sae.d_in, sae.k, ...
        cfg = self.__dict__.get("cfg")
        return getattr(cfg, name) if name in getattr(cfg, "__dataclass_fields__", ()) else super().__getattr__(name)

    device = property(lambda self: self.W_enc.device, doc="Device of the parameters.")
    dtype = property(lambda self: self.W_enc.dtype, doc="dtype of the parameters.")

    def _default_k(self, x: Tensor) -> Tensor:  # [B] int64: the variant's rule for k
        raise NotImplementedError(f"{type(self).__name__} has no rule for k; pass k explicitly")

    def _check_x(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, {self.d_in}], got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must have shape [batch, d_in={self.d_in}], got {tuple(x.shape)}"
                             + ("; flatten leading dims with x.reshape(-1, d_in)" if x.ndim > 2 else ""))
        return finite_rows(x, "x", "drop those rows before encoding").to(self.dtype)

    def _resolve_k(self, x: Tensor, k: int | Tensor | None) -> Tensor:
        """Per-row k as an int64 tensor [B] on x's device: the variant's own, or ``k`` checked."""
        k = self._default_k(x) if k is None else sae_config.per_row_k(k, len(x), self.d_sae)
        return k.to(device=x.device, dtype=torch.int64)

    def _dead_idx(self, dead_mask: Tensor | None, k_aux: int) -> Tensor | None:
        """Indices of the dead latents, or None when AuxK is off (no mask, no dead latent, or k_aux = 0)."""
        if dead_mask is None:
            return None
        if dead_mask.shape != (self.d_sae,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor [d_sae={self.d_sae}], got "
                             f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
        idx = dead_mask.to(self.device).nonzero().flatten()
        return idx if idx.numel() > 0 and k_aux > 0 else None

    # -------------------------------------------------------------- encode / decode
    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations ``(x - b_dec) @ W_enc + b_enc`` [B, d_sae] (under autocast: its matmul dtype)."""
        x = self._check_x(x)
        return _addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode_sparse(self, x: Tensor, k: int | Tensor | None = None) -> SparseCode:
        """``variable_topk(self.pre_acts(x), k)``, faster (bucketed); ``k``: None (the variant's own), an int or
        an integer tensor [B]. Differentiable by plain autograd (``forward`` trains through a fused path)."""
        x = self._check_x(x)
        k = self._resolve_k(x, k)
        _, acts, idx, keep, _ = _encode_topk(x - self.b_dec, self.W_enc, self.b_enc, k)
        return SparseCode(acts * keep, idx, keep, k)

    def encode(self, x: Tensor, k: int | Tensor | None = None) -> Tensor:
        """Dense codes [B, d_sae] of :meth:`encode_sparse`."""
        return self.encode_sparse(x, k).to_dense(self.d_sae)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction [B, d_in] from dense codes [B, d_sae]."""
        if codes.ndim != 2 or codes.shape[1] != self.d_sae:
            raise ValueError(f"codes must have shape [batch, d_sae={self.d_sae}], got {tuple(codes.shape)}")
        return codes @ self.W_dec + self.b_dec

    def decode_sparse(self, code: SparseCode | Tensor, top_indices: Tensor | None = None,
                      keep: Tensor | None = None) -> Tensor:
        """Reconstruction [B, d_in] of a :class:`SparseCode`'s kept entries via ``embedding_bag``; also
        ``(top_acts, top_indices, keep=None)`` [B, k], where no ``keep`` sums every entry (gradients reach zeros)."""
        if isinstance(code, SparseCode):
            code, top_indices, keep = code.top_acts, code.top_indices, code.mask
        if top_indices is None or code.shape != top_indices.shape or code.ndim != 2:
            raise ValueError(f"top_acts and top_indices must both be [B, k], got {tuple(code.shape)} and "
                             f"{None if top_indices is None else tuple(top_indices.shape)}")
        if keep is None:
            return F.embedding_bag(top_indices, self.W_dec, mode="sum", per_sample_weights=code) + self.b_dec
        return _bag(top_indices, keep, self.W_dec, code) + self.b_dec

    # -------------------------------------------------------------- training forward and loss
    def forward(self, x: Tensor, k: int | Tensor | None = None, *, dead_mask: Tensor | None = None,
                k_aux: int | None = None, k_soft: Tensor | None = None, k_temperature: float = 1.0
                ) -> ForwardOutput:
        """Encode ``x [B, d_in]`` with per-row ``k`` (None: the variant's own), decode, and the losses.

        ``dead_mask [d_sae]`` (bool) enables AuxK over the dead latents, ``k_aux`` of them per row (default
        ``d_in // 2``). ``k_soft [B]`` (extension, off by default): a float k that carries a gradient; the
        rank mask gets the backward of ``sigmoid((k_soft - rank - 0.5) / k_temperature)``, its forward stays hard.
        """
        x = self._check_x(x)
        if len(x) == 0:
            raise ValueError("x has no rows: forward's training losses need one (encode and decode take an empty batch)")
        k_aux = self.d_in // 2 if k_aux is None else k_aux
        dead_idx = self._dead_idx(dead_mask, k_aux)
        if k_soft is not None:
            top, idx, k, x_hat, aux_hat = self._soft_forward(x, k, dead_idx, k_aux, k_soft, k_temperature)
        elif type(self).encode_sparse is SparseAutoencoder.encode_sparse:  # top-k: the fused sparse path
            k = self._resolve_k(x, k)
            top, idx, _, x_hat, aux_hat = fused_forward(x, self.W_enc, self.b_enc, self.b_dec, self.W_dec, k,
                                                        dead_idx, k_aux)
        else:  # a variant's own encoder: plain autograd
            top, idx, _, k = code = self.encode_sparse(x, k)
            x_hat = self.decode_sparse(code)
            aux_hat = None if dead_idx is None else self._aux_hat(self.pre_acts(x), dead_idx, k_aux)
        return self._losses(x, x_hat, top, idx, k, aux_hat if dead_idx is not None else None)

    def _soft_forward(self, x: Tensor, k: Any, dead_idx: Tensor | None, k_aux: int, k_soft: Tensor,
                      temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The straight-through rank mask: every rank up to k_max is decoded, so dropped ranks get a gradient."""
        k, pre = self._resolve_k(x, k), self.pre_acts(x)
        full = variable_topk(pre, torch.full_like(k, int(k.max())))  # every rank up to k_max, unmasked
        ranks = torch.arange(full.top_acts.shape[1], device=x.device, dtype=pre.dtype)
        soft = torch.sigmoid((k_soft.to(pre.dtype)[:, None] - ranks - 0.5) / temperature)  # [B, k_max]
        top = full.top_acts * ((ranks < k[:, None]) + soft - soft.detach())  # value: the hard mask
        aux_hat = None if dead_idx is None else self._aux_hat(pre, dead_idx, k_aux)
        return top, full.top_indices, k, self.decode_sparse(top, full.top_indices), aux_hat

    def _aux_hat(self, pre: Tensor, dead_idx: Tensor, k_aux: int) -> Tensor:
        """AuxK's reconstruction [B, d_in] from the ``k_aux`` largest ReLU'd pre-activations of dead latents."""
        aux, pos = pre.index_select(1, dead_idx).topk(min(k_aux, dead_idx.numel()), dim=1, sorted=False)
        return F.embedding_bag(dead_idx[pos], self.W_dec, mode="sum", per_sample_weights=aux.relu())

    def _losses(self, x: Tensor, x_hat: Tensor, top: Tensor, idx: Tensor, k: Tensor,
                aux_hat: Tensor | None) -> ForwardOutput:
        err = (x - x_hat).pow(2)  # [B, d_in]
        tiny = torch.finfo(x.dtype).tiny
        fvu = err.sum() / (x - x.mean(0)).pow(2).sum().clamp_min(tiny)
        l1 = top.sum(1).mean() / x.norm(dim=1).mean().clamp_min(tiny)
        auxk = x.new_zeros(())
        if aux_hat is not None:
            e = (x - x_hat).detach()  # residual the dead latents should explain
            auxk = ((aux_hat - e).pow(2).sum(1).mean() / (e - e.mean(0)).pow(2).sum(1).mean()).nan_to_num(0.0)
        return ForwardOutput(x_hat, top, idx, k, fvu, err.mean(), l1, auxk, self.d_sae)

    def loss(self, out: ForwardOutput, cfg: TrainConfig) -> Tensor:
        """The variant's training objective of one batch: MSE + l1_weight · L1 + auxk_alpha · AuxK."""
        return out.mse + cfg.l1_weight * out.l1 + cfg.auxk_alpha * out.auxk_loss

    # -------------------------------------------------------------- decoder constraint, init
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row to unit norm (after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of ``W_dec.grad`` the component parallel to each decoder row (before each step)."""
        if self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad  # [d_sae, d_in]
        dots = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1)  # [d_sae] row-wise g·W, without a temporary
        g.addcmul_(W, (dots / W.norm(dim=1).square().clamp_min(1e-12))[:, None], value=-1.0)

    @torch.no_grad()
    def init_b_dec(self, x: Tensor, method: str = "geometric_median") -> None:
        """Set ``b_dec`` from a batch [B, d_in]: its geometric median (reference), mean, or leave it."""
        x = self._check_x(x)
        if len(x) == 0:
            raise ValueError("init_b_dec needs at least one row of x (b_dec is set from the batch)")
        if method == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        elif method == "mean":
            self.b_dec.copy_(x.mean(0))
        elif method != "none":
            raise ValueError(f"method must be 'geometric_median', 'mean' or 'none', got {method!r}")

    # -------------------------------------------------------------- save / load
    def _extra_tensors(self) -> dict[str, Tensor]:  # saved beside the state dict (AdaptiveK: its probe)
        return {}

    def _load_extra(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:  # takes those back, returns the rest
        return tensors

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/adaptivek_sae.safetensors`` and then ``path/adaptivek_cfg.json`` (atomically)."""
        tensors = {k: v.detach() for k, v in self.state_dict().items()} | self._extra_tensors()
        sae_config.write_saved(Path(path), self.cfg, tensors, self.dtype)
        return Path(path)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.cfg).items())


class TopKSAE(SparseAutoencoder, config=TopKConfig):
    """TopK SAE: every row keeps its ``k`` largest positive pre-activations."""

    def __init__(self, d_in: int, d_sae: int, k: int, *, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> None:
        super().__init__(TopKConfig(d_in, d_sae, k, dtype=dtype_name(dtype)), seed=seed, device=device)

    k_max = property(lambda self: self.cfg.k, doc="Largest k: k itself.")

    def _default_k(self, x: Tensor) -> Tensor:
        return torch.full((len(x),), self.k, device=x.device, dtype=torch.int64)

    def export_saelens(self, path: str | os.PathLike, *, model_name: str | None = None,
                       hook_name: str | None = None) -> Path:
        """Write the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``, architecture "topk")."""
        tensors = {k: v.detach() for k, v in self.state_dict().items()}
        sae_config.write_saelens(Path(path), self.cfg, tensors, self.dtype, model_name, hook_name)
        return Path(path)


class AdaptiveKSAE(SparseAutoencoder, config=AdaptiveKConfig):
    """AdaptiveK SAE: row i keeps ``k_i = complexity_to_k(probe.predict(x_i))`` latents (k in [34, 306] by default).

    ``probe``: a :class:`~adaptivek.probe.RidgeProbe` fitted on the same features, saved with the weights
    (or None / unfitted: ``train_sae`` fits it in phase 1)."""

    def __init__(self, d_in: int, d_sae: int, probe: Any = None, *, k_min: int = 20, k_max: int = 320,
                 steepness: float = 6.0, c_min: float = 0.0, c_max: float = 10.0, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> None:
        cfg = AdaptiveKConfig(d_in, d_sae, k_min=k_min, k_max=k_max, steepness=float(steepness),
                              c_min=float(c_min), c_max=float(c_max), dtype=dtype_name(dtype))
        super().__init__(cfg, seed=seed, device=device)
        self.probe = probe
        if probe is not None and getattr(probe, "is_fitted", False) and probe.d != d_in:
            raise ValueError(f"the probe reads {probe.d} features but the SAE has d_in={d_in}; fit the probe "
                             f"on the activations the SAE encodes")

    @property
    def has_probe(self) -> bool:
        return self.probe is not None and bool(getattr(self.probe, "is_fitted", True))

    def k_from_complexity(self, c: Tensor) -> Tensor:
        """The paper's map from (predicted) complexity [B] to k [B] int64."""
        from .probe import complexity_to_k

        return complexity_to_k(c, k_min=self.k_min, k_max=self.k_max, steepness=self.steepness,
                               c_min=self.c_min, c_max=self.c_max)

    def soft_k(self, c: Tensor) -> Tensor:
        """The same map without rounding, differentiable in ``c`` [B] -> float [B]."""
        z = self.steepness * ((c - self.c_min) / (self.c_max - self.c_min) - 0.5)
        return self.k_min + torch.sigmoid(z) * (self.k_max - self.k_min)

    def _default_k(self, x: Tensor) -> Tensor:
        if not self.has_probe:
            raise RuntimeError("this AdaptiveKSAE has no fitted probe, so it cannot choose k: train it with "
                               "train_sae(sae, X, y) (phase 1 fits the probe), pass a fitted RidgeProbe, or "
                               "give k explicitly")
        return self.k_from_complexity(self.probe.predict(x)).to(x.device)

    def _extra_tensors(self) -> dict[str, Tensor]:
        return self.probe.to_tensors(prefix="probe.") if self.has_probe else {}

    def _load_extra(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        from .probe import RidgeProbe

        has = any(k.startswith("probe.") for k in tensors)
        self.probe = RidgeProbe.from_tensors(tensors, prefix="probe.") if has else None
        return {k: v for k, v in tensors.items() if not k.startswith("probe.")}

    def export_saelens(self, path: str | os.PathLike, **_: Any) -> Path:
        raise NotImplementedError("SAELens has no architecture with a per-input k; save an AdaptiveKSAE with "
                                  ".save(path) and load it with adaptivek.load_sae(path)")


class BatchTopKSAE(TopKSAE, config=BatchTopKConfig):
    """BatchTopK (Bussmann et al. 2024): keep the ``k · B`` largest activations of the whole batch.

    Row i keeps as many latents as it has among the batch's top ``k · B`` (mean k: ``k``); in training mode
    ``threshold`` tracks a moving average (``threshold_beta``) of the smallest kept one. Once calibrated
    (:meth:`freeze`), eval mode keeps what exceeds ``threshold`` whatever the batch (mean L0 about ``k``).
    The paper averages from step 1,000 with β = 0.999; our short runs from step 1 with β = 0.99."""

    def __init__(self, d_in: int, d_sae: int, k: int, *, threshold_beta: float = 0.99, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> None:
        cfg = BatchTopKConfig(d_in, d_sae, k, threshold_beta=threshold_beta, dtype=dtype_name(dtype))
        SparseAutoencoder.__init__(self, cfg, seed=seed, device=device)  # TopKSAE's builds a TopKConfig
        self.register_buffer("threshold", torch.tensor(math.nan, dtype=self.dtype, device=device))
        self.register_buffer("frozen", torch.tensor(False, device=device))  # calibrated: eval uses threshold
        self.threshold_ema = math.nan

    @torch.no_grad()
    def freeze(self, X: Tensor | None = None, *, max_rows: int = 4096, seed: int = 0,
               chunk: int = 512) -> BatchTopKSAE:
        """Calibrate the threshold and switch to eval mode, where it decides which latents are active.

        Without ``X``: the training-time moving average. With ``X`` (training vectors): the ``k · N``-th
        largest activation of up to ``max_rows`` of them taken as one batch, so that the batch rule holds
        there (``threshold_ema`` keeps the average, which in short runs still remembers the first steps).
        """
        if not torch.isfinite(self.threshold):
            raise RuntimeError("this BatchTopKSAE has no threshold yet: train it (train_sae) before freezing")
        if X is not None and len(X) == 0:
            raise ValueError("freeze(X) needs rows of X to calibrate on (or no X: the training-time average)")
        self.threshold_ema = float(self.threshold)
        if X is not None:
            rows = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:max_rows]]
            keep, top = self.k * len(rows), self.threshold.new_zeros(0)
            for part in rows.split(chunk):  # running top-(k·N) over chunks: memory O(k·N + chunk·d_sae)
                pre = self.pre_acts(part.to(self.device)).relu_().flatten()
                top = torch.cat([top, pre]).topk(min(keep, len(top) + len(pre))).values
            self.threshold.fill_(float(top[-1]))
        self.frozen.fill_(True)
        return self.eval()

    @torch.no_grad()
    def batch_k(self, x: Tensor) -> Tensor:
        """The batch rule on ``x`` as one batch: how many of its top ``k · B`` activations each row holds [B] (may be 0)."""
        return self._batch_rule(x.to(self.device))[0]

    @torch.no_grad()
    def _batch_rule(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.pre_acts(x).relu_()  # [B, d_sae]
        vals, flat = pre.flatten().topk(min(self.k * len(x), pre.numel()))  # [k·B] kept values
        return torch.bincount(torch.div(flat, self.d_sae, rounding_mode="floor"), minlength=len(x)), vals

    @torch.no_grad()
    def _default_k(self, x: Tensor) -> Tensor:
        if self.frozen and not self.training:
            return (self.pre_acts(x) > self.threshold).sum(1)
        k, vals = self._batch_rule(x)
        if self.training and (vals > 0).any():  # learn the threshold: moving average of the smallest kept
            low, t, beta = vals[vals > 0].min(), self.threshold, self.threshold_beta
            t.copy_(low if not torch.isfinite(t) else beta * t + (1 - beta) * low)
        return k


def load_sae(path: str | os.PathLike, *, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Restore an SAE written by ``save(path)`` (probe included; format 1 too) as the class registered for
    its architecture (whose module must have been imported), in eval mode. A truncated or edited file is a
    ValueError naming it; a folder without our files a FileNotFoundError saying what it holds instead."""
    saved, cfg_file, weights = sae_config.read_saved(Path(path))
    cls = sae_config.registered(saved.get("architecture"), where=f"{cfg_file} holds an SAE of")
    try:
        sae = cls(**sae_config.config_fields(cls.config_class, saved, cfg_file))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file} holds an invalid config: {e}") from e
    tensors = sae_config.check_state(sae.state_dict(), sae_config.read_weights(weights), weights)
    try:
        sae.load_state_dict(sae._load_extra(tensors))
    except (KeyError, ValueError, RuntimeError) as e:  # e.g. a probe with entries missing
        raise ValueError(f"{weights} holds damaged entries ({str(e).strip().splitlines()[0]}); save the SAE "
                         f"again") from e
    return (sae.to(device) if device is not None else sae).eval()


__all__ = ["SparseAutoencoder", "TopKSAE", "AdaptiveKSAE", "BatchTopKSAE", "SparseCode", "ForwardOutput",
           "variable_topk", "load_sae"]  # the configs: adaptivek.sae_config (importable from here too)
