"""The SAE family: TopK, AdaptiveK (per-sample k from a complexity probe), BatchTopK and JumpReLU, one implementation.

Every SAE shares :class:`SparseAutoencoder` (SAEBench/SAELens layout): pre-activations ``(x - b_dec) @ W_enc
+ b_enc`` (:meth:`~SparseAutoencoder.pre_acts`), of which row ``i`` keeps its ``k_i`` largest positive ones
(:func:`variable_topk`: top-k at the largest k, then the rank mask ``arange(k_max) < k[:, None]``; the reference
code loops over rows), and the decoder ``x_hat = f @ W_dec + b_dec`` with unit-norm rows of ``W_dec``.

A variant is one small class plus its config (:mod:`adaptivek.sae_config`), registered under the config's
``architecture``; the class gives the rule for k (``_default_k``): fixed (:class:`TopKSAE`),
``complexity_to_k(probe.predict(x))`` (:class:`AdaptiveKSAE`, the paper's Eq. 7) or the batch rule
(:class:`BatchTopKSAE`). A variant with another encoder overrides ``encode_sparse``, one with another
objective ``loss``: :class:`JumpReLUSAE` does both (learned per-latent thresholds, an L0 penalty steered to a
target L0). :mod:`adaptivek.fused` holds the fast paths, tested against :func:`variable_topk`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sae_config
from .checks import finite_rows, matrix, positive_int
from .fused import _addmm, _bag, _encode_topk, fused_forward, geometric_median
from .sae_config import AdaptiveKConfig, BatchTopKConfig, JumpReLUConfig, SAEConfig, TopKConfig, dtype_name

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
                       hook_name: str | None = None, metadata: dict[str, Any] | None = None) -> Path:
        """Write SAELens' layout (``cfg.json`` + ``sae_weights.safetensors``): architecture "topk" (a frozen
        BatchTopK: "jumprelu"), read by ``sae_lens.SAE.load_from_disk``; ``metadata`` joins SAELens' own."""
        tensors = {k: v.detach() for k, v in self.state_dict().items()}
        meta = {"model_name": model_name, "hook_name": hook_name, **(metadata or {})}
        sae_config.write_saelens(Path(path), self.cfg, tensors, self.dtype, meta)
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

    def export_saelens(self, path: str | os.PathLike, *, model_name: str | None = None,
                       hook_name: str | None = None, metadata: dict[str, Any] | None = None) -> Path:
        """Write SAELens' layout with architecture "adaptivek", probe included. SAELens has no plugin hook:
        ``sae_lens.SAE.load_from_disk`` reads it once ``adaptivek.interop.register_saelens()`` has run."""
        tensors = {k: v.detach() for k, v in self.state_dict().items()} | self._extra_tensors()
        meta = {"model_name": model_name, "hook_name": hook_name, **(metadata or {})}
        sae_config.write_saelens(Path(path), self.cfg, tensors, self.dtype, meta)
        return Path(path)


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


# ----------------------------------------------------------------------------- JumpReLU
class L0TargetWarning(UserWarning):
    """A JumpReLU SAE whose mean L0 missed its ``target_l0`` by more than ``l0_tolerance``; the message
    gives the numbers and the fix."""


def _window(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """The rectangle kernel ``K((pre - θ) / ε)``: 1 where ``|pre - θ| < ε/2``, else 0 [B, d_sae]."""
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre - θ)``; backward ``∂/∂pre = H(pre - θ)`` and the straight-through ``∂/∂θ = -(θ/ε) K((pre - θ)/ε)``."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors  # θ: [d_sae] beside pre [B, d_sae], or gathered like pre
        g_theta = (-(theta / ctx.eps) * grad * _window(pre, theta, ctx.eps)).sum_to_size(theta.shape)
        return grad * (pre > theta), g_theta, None


class _Step(torch.autograd.Function):
    """``H(pre - θ)``; backward: the straight-through ``∂/∂θ = -(1/ε) K((pre - θ)/ε)``, nothing to ``pre``."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        return None, (-grad * _window(pre, theta, ctx.eps) / ctx.eps).sum_to_size(theta.shape), None


class _GatheredPre(torch.autograd.Function):
    """Entries ``idx [B, m]`` of the pre-activations ``(x - b_dec) @ W_enc + b_enc``, given their values, with
    a sparse backward: ∂W_enc, ∂b_enc and ∂b_dec from those entries alone (no dense ``B x d_in x d_sae`` matmul;
    ``x`` gets no gradient). What :mod:`adaptivek.fused` does for top-k, for any set of entries."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, idx: Tensor,
                values: Tensor) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec, idx)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor, Tensor, Tensor, None, None]:
        x, W_enc, b_dec, idx = ctx.saved_tensors
        d_sae, (B, m) = W_enc.shape[1], idx.shape
        lat, g = idx.flatten(), g.flatten().to(W_enc.dtype)  # [B·m]
        g_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, lat, g)
        order = torch.sort(lat, stable=True).indices  # entries grouped by latent
        counts = torch.bincount(lat, minlength=d_sae)
        rows = torch.arange(B, device=idx.device).repeat_interleave(m)[order]
        g_We = F.embedding_bag(rows, (x - b_dec).to(W_enc.dtype), counts.cumsum(0) - counts, mode="sum",
                               per_sample_weights=g[order])  # [d_sae, d_in]: Σ_b g[b, j] (x_b - b_dec)
        return None, g_We.T, g_b_enc, -(W_enc @ g_b_enc), None, None


def _compact(f: Tensor) -> SparseCode:
    """Dense codes ``f [B, d_sae]`` (>= 0) as a SparseCode of each row's nonzeros, largest first (k: its L0)."""
    l0 = (f > 0).sum(1)
    acts, idx = f.topk(int(l0.max()) if len(f) else 0, dim=1)  # [B, max L0]
    return SparseCode(acts, idx, acts > 0, l0)


class JumpReLUOutput(NamedTuple("_JumpReLUFields", [*((n, Any) for n in ForwardOutput._fields), ("l0_loss", Any)])):
    """:class:`ForwardOutput`'s fields, then ``l0_loss``: () the batch's mean L0, whose gradient (the step's
    straight-through estimator) reaches the thresholds only."""

    __slots__ = ()
    codes = ForwardOutput.codes
    l0 = ForwardOutput.l0


LAMBDA_RANGE = 1e6
"""The controller keeps λ within a factor of this of its initial value."""
L0_EMA_BETA = 0.9
"""Weight of the old value in ``JumpReLUSAE.l0_ema``, the running mean of the training batches' L0."""


class JumpReLUSAE(SparseAutoencoder, config=JumpReLUConfig):
    """JumpReLU SAE (Rajamanoharan et al. 2024, https://arxiv.org/abs/2407.14435): latent j is active where
    its pre-activation exceeds its own learned threshold θ_j: ``f = pre · H(pre - θ)``. The parameter is
    ``scaled_log_threshold = log θ / threshold_speed`` (:attr:`log_threshold` is log θ).

    :meth:`loss` is ``MSE + λ · L0 + auxk_alpha · AuxK`` (the family's per-element MSE and AuxK; no L1: the
    penalty is L0). The step H has a straight-through gradient for θ only, a rectangle kernel of width
    ``bandwidth``; the reconstruction reaches θ through the JumpReLU's. Decoder rows stay unit norm as in the
    family (L0 does not depend on their scale, so the paper's norm-in-penalty variant would change nothing).
    With ``target_l0`` every training batch steps λ by a controller (:meth:`step_controller`), so one run
    lands at a chosen L0; leaving training mode warns (:class:`L0TargetWarning`) when the last batches missed
    it, and :meth:`l0_gap` checks other rows (held-out L0 can exceed training's). There is no k: passing one
    is an error. ``train_sae(sae, X, cfg=...)`` trains it unchanged: it calls ``forward`` and :meth:`loss`."""

    def __init__(self, d_in: int, d_sae: int, *, target_l0: float | None = None, bandwidth: float = 0.2,
                 init_threshold: float | None = None, threshold_speed: float = 30.0,
                 l0_coefficient: float | None = None, controller_rate: float = 0.1, controller_gain: float = 3.0,
                 l0_tolerance: float = 0.1, seed: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> None:
        cfg = JumpReLUConfig(d_in, d_sae, target_l0=target_l0, bandwidth=bandwidth, init_threshold=init_threshold,
                             threshold_speed=threshold_speed, l0_coefficient=l0_coefficient,
                             controller_rate=controller_rate, controller_gain=controller_gain,
                             l0_tolerance=l0_tolerance, dtype=dtype_name(dtype))
        super().__init__(cfg, seed=seed, device=device)
        theta = init_threshold if init_threshold is not None else bandwidth  # with target_l0: until the first batch
        log_theta = torch.full((d_sae,), math.log(theta) / threshold_speed, device=device, dtype=self.dtype)
        self.scaled_log_threshold = nn.Parameter(log_theta)  # [d_sae] log θ / threshold_speed
        f64 = {"dtype": torch.float64, "device": device}
        self.register_buffer("lambda_integral", torch.tensor(self.initial_lambda, **f64))  # the controller's λ_I
        self.register_buffer("l0_ema", torch.tensor(math.nan, **f64))  # running mean of the training batches' L0
        self.register_buffer("threshold_ready", torch.tensor(init_threshold is not None or target_l0 is None,
                                                             device=device))
        self._controlled_steps = 0  # loss() calls in training mode since the last check

    @property
    def log_threshold(self) -> Tensor:
        """log θ [d_sae] = ``threshold_speed · scaled_log_threshold``, whose gradient reaches the parameter
        unscaled (so gradient clipping sees the gradient of log θ itself)."""
        u = self.scaled_log_threshold
        return u + (self.threshold_speed - 1) * u.detach()

    threshold = property(lambda self: self.log_threshold.detach().exp(), doc="θ [d_sae], the thresholds.")
    initial_lambda = property(lambda self: self.l0_coefficient if self.l0_coefficient is not None
                              else 1 / self.d_in, doc="λ at the start (``l0_coefficient``, default 1/d_in).")

    @property
    def l0_lambda(self) -> float:
        """λ now: ``λ_I · exp(κ · e)`` with ``e = clamp(l0_ema / target_l0 - 1, -1, 1)`` (λ_I alone without a
        target or before the first training batch)."""
        lam, e = float(self.lambda_integral), self._l0_error()
        return lam if e is None else lam * math.exp(self.controller_gain * e)

    def _l0_error(self) -> float | None:
        """``clamp(l0_ema / target_l0 - 1, -1, 1)``, or None without a target or a training batch yet."""
        ema, t = float(self.l0_ema), self.target_l0
        return None if t is None or not math.isfinite(ema) else min(1.0, max(-1.0, ema / t - 1))

    def _no_k(self, k: Any, name: str = "k") -> None:
        if k is not None:
            raise TypeError(f"JumpReLUSAE has no {name}: each latent fires above its learned threshold; call it "
                            f"without {name} (to match another SAE's L0, build it with target_l0=that L0)")

    def encode_sparse(self, x: Tensor, k: None = None) -> SparseCode:
        """Each row's active latents, largest first, as a :class:`SparseCode` whose ``k`` is the row's L0."""
        return _compact(self.encode(x, k))

    def encode(self, x: Tensor, k: None = None) -> Tensor:
        """Dense codes ``pre · H(pre - θ)`` [B, d_sae]."""
        self._no_k(k)
        return _JumpReLU.apply(self.pre_acts(x), self.log_threshold.exp(), self.bandwidth)

    def forward(self, x: Tensor, k: None = None, *, dead_mask: Tensor | None = None, k_aux: int | None = None,
                k_soft: None = None, k_temperature: float = 1.0) -> JumpReLUOutput:
        """Encode ``x [B, d_in]``, decode and the losses (AuxK as in the family); in training mode a first batch
        sets θ if ``init_threshold`` is None. The decode is sparse: it sums the active latents and, with weight 0,
        those in the window just below θ, whose ∂L/∂f the straight-through gradient of θ needs (as a dense
        ``f @ W_dec`` would give, at a fraction of its cost)."""
        self._no_k(k)
        self._no_k(k_soft, "k_soft")
        x = self._check_x(x)
        if len(x) == 0:
            raise ValueError("x has no rows: forward's training losses need one (encode and decode take an empty batch)")
        if self.training and not bool(self.threshold_ready):
            self.init_thresholds(x)
        theta, eps = self.log_threshold.exp(), self.bandwidth
        with torch.no_grad():
            pre = self.pre_acts(x)  # [B, d_sae]; gradients go through _GatheredPre's entries only
            score = pre - theta  # > -ε/2: active, or in the window below θ
            idx = score.topk(max(1, int((score > -eps / 2).sum(1).max())), dim=1).indices  # [B, m]
        pre_m = _GatheredPre.apply(x, self.W_enc, self.b_enc, self.b_dec, idx, pre.gather(1, idx))  # [B, m]
        theta_m = theta[idx]
        acts = _JumpReLU.apply(pre_m, theta_m, eps)  # [B, m]: 0 below θ (their gradient still reaches θ)
        x_hat = self.decode_sparse(acts, idx)  # every entry summed: gradients reach the zeros
        k_aux = self.d_in // 2 if k_aux is None else k_aux
        dead_idx = self._dead_idx(dead_mask, k_aux)
        aux_hat = None if dead_idx is None else self._sparse_aux_hat(x, pre, dead_idx, k_aux)
        top, order = acts.detach().sort(dim=1, descending=True)
        out = self._losses(x, x_hat, top, idx.gather(1, order), (top > 0).sum(1), aux_hat)
        return JumpReLUOutput(*out, _Step.apply(pre_m, theta_m, eps).sum(1).mean())

    def _sparse_aux_hat(self, x: Tensor, pre: Tensor, dead_idx: Tensor, k_aux: int) -> Tensor:
        """:meth:`_aux_hat` (the family's AuxK decode) with gradients through :class:`_GatheredPre`."""
        vals, pos = pre.index_select(1, dead_idx).topk(min(k_aux, dead_idx.numel()), dim=1, sorted=False)
        idx = dead_idx[pos]  # [B, k_aux] latents
        aux = _GatheredPre.apply(x, self.W_enc, self.b_enc, self.b_dec, idx, vals).relu()
        return F.embedding_bag(idx, self.W_dec, mode="sum", per_sample_weights=aux)

    @torch.no_grad()
    def init_thresholds(self, x: Tensor, l0: float | None = None) -> None:
        """Set θ from a batch ``x`` so that its mean L0 is ``l0`` (default ``target_l0``): θ_j = mean_j + c·std_j
        of latent j's pre-activations, one c for all (BatchTopK's batch rule, per latent), floored at ``bandwidth``."""
        l0 = self.target_l0 if l0 is None else l0
        if l0 is None or len(x) < 2:
            raise ValueError(f"init_thresholds needs l0 (or target_l0) and at least 2 rows, got l0={l0}, {len(x)} "
                             f"row(s); give init_threshold=... or train with batches of 2 rows or more")
        pre = self.pre_acts(x)
        mean, std = pre.mean(0), pre.std(0).clamp_min(torch.finfo(pre.dtype).tiny)
        z = ((pre - mean) / std).flatten()  # [B·d_sae] standardised pre-activations
        n = min(max(1, round(l0 * len(x))), z.numel() - 1)
        c = z.topk(n + 1).values[-2:].mean()  # between the n-th and (n+1)-th largest
        self.scaled_log_threshold.copy_((mean + c * std).clamp_min(self.bandwidth).log() / self.threshold_speed)
        self.threshold_ready.fill_(True)

    @torch.no_grad()
    def step_controller(self, l0: float) -> float:
        """One step from a training batch's mean L0 ``l0``; returns the new λ (:attr:`l0_lambda`).

        A PI controller on log λ: the running mean ``l0_ema`` takes ``l0`` (weight 1 - :data:`L0_EMA_BETA`),
        ``e = clamp(l0_ema / target_l0 - 1, -1, 1)``, the integral ``λ_I ← λ_I · exp(η e)`` (η:
        ``controller_rate``; λ_I kept within a factor :data:`LAMBDA_RANGE` of the initial λ) and λ = ``λ_I ·
        exp(κ e)`` (κ: ``controller_gain``), which reacts at once. Anti-wind-up: λ_I holds while ``l0_ema``
        already moves toward the target, so early steps, where the dictionary rather than λ moves L0, do not
        push it far off. Without a target only ``l0_ema`` moves."""
        old = float(self.l0_ema)
        new = l0 if not math.isfinite(old) else L0_EMA_BETA * old + (1 - L0_EMA_BETA) * l0
        self.l0_ema.fill_(new)
        e = self._l0_error()
        if e is not None and not (math.isfinite(old) and (new - old) * (new - self.target_l0) < 0):
            lam0 = self.initial_lambda
            self.lambda_integral.mul_(math.exp(self.controller_rate * e)).clamp_(lam0 / LAMBDA_RANGE,
                                                                                 lam0 * LAMBDA_RANGE)
        return self.l0_lambda

    def loss(self, out: JumpReLUOutput, cfg: TrainConfig) -> Tensor:
        """``MSE + λ · l0_loss + auxk_alpha · AuxK`` at the current λ (``cfg.l1_weight`` does not apply). In
        training mode it then steps the controller on the batch's L0: once per call, as ``train_sae`` makes."""
        total = out.mse + self.l0_lambda * out.l0_loss + cfg.auxk_alpha * out.auxk_loss
        if self.training:
            self.step_controller(float(out.k.double().mean()))
            self._controlled_steps += 1
        return total

    def train(self, mode: bool = True) -> JumpReLUSAE:
        """Set the mode; leaving training mode after training steps warns when their L0 missed the target."""
        leaving = self.training and not mode
        super().train(mode)
        if leaving and self._controlled_steps > 0:
            self._controlled_steps = 0
            if self.target_l0 is not None and math.isfinite(float(self.l0_ema)):
                self._check_l0(float(self.l0_ema), self.target_l0, "the last training batches (running mean)",
                               stacklevel=5)  # the caller of train_sae, which calls eval()
        return self

    def _check_l0(self, l0: float, target: float, where: str, stacklevel: int) -> dict[str, Any]:
        """The gap of ``l0`` to ``target``; an :class:`L0TargetWarning` with the numbers and the fix if too large."""
        gap, tol, lam = l0 / target - 1, self.l0_tolerance, self.l0_lambda
        within = abs(gap) <= tol
        if not within:
            bound = not 1 / LAMBDA_RANGE < float(self.lambda_integral) / self.initial_lambda < LAMBDA_RANGE
            at_bound = f", at its bound: no λ within {LAMBDA_RANGE:g}x of l0_coefficient reaches the target"
            warnings.warn(
                f"JumpReLUSAE: mean L0 on {where} is {l0:.2f}, target {target:g} ({gap:+.1%}; tolerance ±{tol:.0%}). "
                f"λ is {lam:.3g} (started at {self.initial_lambda:.3g}{at_bound if bound else ''}). Fix: train "
                f"longer (steps=), raise controller_rate (now {self.controller_rate:g}) or lr; on held-out rows, "
                f"a gap that training did not have means the thresholds do not transfer", L0TargetWarning,
                stacklevel=stacklevel)
        return {"l0": l0, "target": float(target), "gap": gap, "tolerance": tol, "within": within}

    @torch.no_grad()
    def l0_gap(self, X: Tensor, *, target: float | None = None, batch_size: int = 4096) -> dict[str, Any]:
        """Mean L0 on ``X [n, d_in]`` against ``target`` (default ``target_l0``, e.g. AdaptiveK's realised mean
        L0): ``{"l0", "target", "gap": l0/target - 1, "tolerance", "within"}``; warns when ``|gap| > l0_tolerance``."""
        t = self.target_l0 if target is None else target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"l0_gap needs a target L0 > 0: pass target=... (e.g. AdaptiveK's realised mean L0) or "
                             f"build the SAE with target_l0; got {t!r}")
        X = matrix(X, "X", d=self.d_in)
        positive_int(batch_size, "batch_size")
        active = sum(int((self.encode(xb.to(self.device)) > 0).sum()) for xb in X.split(batch_size))
        return self._check_l0(active / len(X), t, f"{len(X)} rows", stacklevel=4)  # past torch.no_grad's wrapper


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


__all__ = ["SparseAutoencoder", "TopKSAE", "AdaptiveKSAE", "BatchTopKSAE", "JumpReLUSAE", "SparseCode", "ForwardOutput",
           "JumpReLUOutput", "L0TargetWarning", "variable_topk", "load_sae"]  # the configs: adaptivek.sae_config (importable from here too)
