"""Our SAEs in SAELens and EleutherAI sparsify, and theirs in adaptivek.

Exports: :func:`export_saelens` (``sae.export_saelens(path)`` on TopK and AdaptiveK): TopK, AdaptiveK (probe
included), JumpReLU and a frozen BatchTopK (as "jumprelu"); :func:`export_sparsify`: TopK. Imports:
:func:`from_saelens` (architectures in :data:`SAELENS_IMPORTS`; a TopK *training* checkpoint's unfolded
decoder norm is folded) and :func:`from_sparsify` (TopK sparse coders). All four read and write the files
themselves: neither library is needed, nor imported (importing SAELens takes seconds).

:func:`register_saelens` registers AdaptiveK as SAELens architecture "adaptivek" (:class:`AdaptiveKSAELens`,
per-row ``k = complexity_to_k(probe.predict(x))``), so that ``sae_lens.SAE.load_from_disk`` returns a working
AdaptiveK. SAELens has no plugin entry point, so the call must come first in each process; it is the only
name here that imports SAELens (``AdaptiveKSAELens`` and its config are built on first access).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import sae_config
from .io import save_tensors, write_json
from .sae import SparseAutoencoder, variable_topk
from .sae_config import dtype_name, folder_format, read_json, read_weights, refuse_foreign

SAELENS_IMPORTS = ("topk", "adaptivek", "jumprelu")
"""SAELens architectures :func:`from_saelens` reads ("jumprelu" into adaptivek's JumpReLU SAE, or a BatchTopK
when adaptivek exported it)."""
_SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
_SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
_CORE = ("W_enc", "b_enc", "W_dec", "b_dec")
_INSTALL = "pip install 'adaptivek[interop]' (sae-lens==6.54.12, eai-sparsify==1.3.3)"


# ----------------------------------------------------------------------------- exports
def export_saelens(sae: SparseAutoencoder, path: str | os.PathLike, *, model_name: str | None = None,
                   hook_name: str | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` in SAELens' layout (``cfg.json`` + ``sae_weights.safetensors``); ``model_name``,
    ``hook_name`` and ``metadata`` land in SAELens' ``cfg.metadata``. TopK, AdaptiveK (load it in SAELens
    after :func:`register_saelens`), JumpReLU, and a frozen BatchTopK (as "jumprelu")."""
    _check_sae(sae)
    tensors = {k: v.detach() for k, v in sae.state_dict().items()} | sae._extra_tensors()
    if sae.cfg.architecture == "jumprelu":  # θ is held as a scaled log
        tensors["threshold"] = sae.threshold.detach()
    meta = {"model_name": model_name, "hook_name": hook_name, **(metadata or {})}
    sae_config.write_saelens(Path(path), sae.cfg, tensors, sae.dtype, meta)
    return Path(path)


def export_sparsify(sae: SparseAutoencoder, path: str | os.PathLike) -> Path:
    """Write a TopK SAE in sparsify's layout (``cfg.json`` + ``sae.safetensors``: ``encoder.weight [d_sae, d_in]``,
    ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``), read by ``sparsify.SparseCoder.load_from_disk``.
    ``sparsify.SparseCoder.load_many`` expects one such folder per hookpoint, named after it."""
    _check_sae(sae)
    if sae.cfg.architecture != "topk":
        raise ValueError(f"sparsify's SparseCoder keeps a fixed k per row; a {type(sae).__name__} "
                         f"({sae.cfg.architecture!r}) has no equivalent there: export it to SAELens instead "
                         f"(export_saelens), or save it with sae.save(path)")
    path = Path(path)
    refuse_foreign(path, _SPARSIFY_FILES, "export_sparsify", _our_sparsify)
    tensors = {"encoder.weight": sae.W_enc.detach().T, "encoder.bias": sae.b_enc.detach(), "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}
    save_tensors(path / "sae.safetensors", tensors, metadata={"exported_by": "adaptivek"})  # sparsify's cfg: no room
    write_json(path / "cfg.json", {
        "activation": "topk", "expansion_factor": max(1, sae.d_sae // sae.d_in), "normalize_decoder": True,
        "num_latents": sae.d_sae, "k": sae.k, "multi_topk": False, "skip_connection": False, "transcode": False,
        "d_in": sae.d_in})
    return path


def _our_sparsify(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path / "sae.safetensors"), framework="pt") as f:
        return (f.metadata() or {}).get("exported_by") == "adaptivek"


def _check_sae(sae: Any) -> None:
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"sae must be an adaptivek SAE (TopKSAE, AdaptiveKSAE, ...), got {type(sae).__name__}")


# ----------------------------------------------------------------------------- imports
def from_saelens(path: str | os.PathLike, *, device: str | torch.device | None = None) -> SparseAutoencoder:
    """An adaptivek SAE from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), in eval mode, with
    the same codes and reconstructions as SAELens gives: "topk" (a training checkpoint's
    ``rescale_acts_by_decoder_norm`` folded into the weights, ``apply_b_dec_to_input=False`` into ``b_enc``),
    "adaptivek" (probe included) and "jumprelu". Inputs are the flat activations (``hook_z``: heads joined)."""
    path = Path(path)
    cfg_file, weights = _need(path, _SAELENS_FILES, "SAELens")
    cfg = _saelens_config(read_json(cfg_file), cfg_file)
    arch, fields = _saelens_architecture(cfg, cfg_file)
    tensors = _saelens_tensors(cfg, read_weights(weights), arch, cfg_file, weights)
    sae = _build(arch, {**fields, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"],
                        "dtype": str(cfg.get("dtype", "float32")).removeprefix("torch.")}, cfg_file)
    _load(sae, tensors, weights)
    return (sae.to(device) if device is not None else sae).eval()


def from_sparsify(path: str | os.PathLike, *, device: str | torch.device | None = None) -> SparseAutoencoder:
    """A :class:`~adaptivek.sae.TopKSAE` from a sparsify folder (``cfg.json`` + ``sae.safetensors``, one
    hookpoint's), in eval mode, with sparsify's codes and reconstructions. Transcoders, skip connections and
    "groupmax" are refused: adaptivek's SAEs have no equivalent."""
    path = Path(path)
    cfg_file, weights = _need(path, _SPARSIFY_FILES, "sparsify")
    cfg = read_json(cfg_file)
    d_in, n, k = _sparsify_config(cfg, cfg_file)
    t = read_weights(weights)
    _check_tensors(t, {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)},
                   cfg_file, weights)
    sae = _build("topk", {"d_in": d_in, "d_sae": n, "k": k, "dtype": dtype_name(t["encoder.weight"].dtype)}, cfg_file)
    _load(sae, {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
                "b_dec": t["b_dec"]}, weights)
    return (sae.to(device) if device is not None else sae).eval()


def _need(path: Path, names: tuple[str, str], library: str) -> tuple[Path, Path]:
    """The two files of a ``library`` folder, or a FileNotFoundError saying what the folder holds instead."""
    if all((path / n).is_file() for n in names):
        return path / names[0], path / names[1]
    found = folder_format(path)
    found = f"; this folder holds {found}" if found else "" if path.is_dir() else "; the folder does not exist"
    raise FileNotFoundError(f"no {library} SAE in {path}: expected {names[0]} and {names[1]}{found}")


def _sparsify_config(cfg: dict[str, Any], cfg_file: Path) -> tuple[int, int, int]:
    """``(d_in, num_latents, k)`` of a sparsify ``cfg.json``; a ValueError for what adaptivek cannot hold."""
    if "format_version" in cfg:
        raise ValueError(f"{cfg_file} is an adaptivek save of format 1, not a sparsify SAE: load it with "
                         f"adaptivek.load_sae(path)")
    refused = {"transcode": "a transcoder (it predicts another activation; adaptivek SAEs reconstruct their input)",
               "skip_connection": "a skip connection W_skip (adaptivek SAEs have none)"}
    for key, what in refused.items():
        if cfg.get(key):
            raise ValueError(f"{cfg_file} describes {what}: from_sparsify imports plain TopK sparse coders only")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_file} has activation {cfg.get('activation')!r}: from_sparsify imports 'topk' "
                         f"only (groupmax keeps the largest of each of k groups, which no adaptivek SAE does)")
    if not isinstance(cfg.get("d_in"), int):
        raise ValueError(f"{cfg_file} lacks an integer d_in (sparsify's save_to_disk writes it): truncated or "
                         f"edited; save the SparseCoder again with save_to_disk")
    return cfg["d_in"], cfg.get("num_latents") or cfg["d_in"] * cfg.get("expansion_factor", 32), cfg.get("k", 32)


def _major(version: Any) -> int | None:
    head = str(version).split(".")[0] if version else ""
    return int(head) if head.isdigit() else None


def _saelens_config(cfg: dict[str, Any], cfg_file: Path) -> dict[str, Any]:
    """A SAELens ``cfg.json`` in 6.x terms (a pre-6.0 TopK names itself by its activation), options checked."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    major = _major(cfg.get("sae_lens_version") or meta.get("sae_lens_version"))
    if major is None or major < 6:  # SAELens' handle_pre_6_0_config: the activation decides
        kw = cfg.get("activation_fn_kwargs") or {}
        if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk" and kw.get("k") is not None:
            cfg = {**cfg, "architecture": "topk", "k": kw["k"]}
        cfg = {"architecture": "standard", **cfg}
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    missing = [k for k in ("d_in", "d_sae") if not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"{cfg_file} lacks integer {missing}: truncated or edited; save the SAE again with SAELens")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise ValueError(f"{cfg_file} has normalize_activations={norm!r}: adaptivek SAEs read raw activations. Fold "
                         f"it into the weights in SAELens and save again ('expected_average_only_in': "
                         f"sae.fold_activation_norm_scaling_factor(factor); 'covariance_whitening': "
                         f"sae.fold_activation_whitening(...)); 'layer_norm' and 'constant_norm_rescale' depend on "
                         f"each input and cannot be imported")
    return cfg


def _saelens_architecture(cfg: dict[str, Any], cfg_file: Path) -> tuple[str, dict[str, Any]]:
    """adaptivek's architecture and config fields for a SAELens config."""
    arch = cfg.get("architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{cfg_file} names no architecture (SAELens 6 writes one): edited; save it again with SAELens")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    ours = meta.get("adaptivek") if meta.get("exported_by") == "adaptivek" else None
    ours = ours if isinstance(ours, dict) else {}
    if arch == "topk":
        if not isinstance(cfg.get("k"), int):
            raise ValueError(f"{cfg_file} describes a TopK SAE without an integer k: edited; save it again")
        return "topk", {"k": cfg["k"]}
    if arch == "adaptivek":
        return "adaptivek", {k: cfg[k] for k in ("k_min", "k_max", "steepness", "c_min", "c_max") if k in cfg}
    if arch == "jumprelu":
        mine = ours.get("architecture") in ("batchtopk", "jumprelu")
        return (ours["architecture"] if mine else "jumprelu"), (_drop(ours) if mine else {})
    hint = {"batchtopk": "; a BatchTopK or Matryoshka training checkpoint: load it with SAELens and "
                         "save_inference_model(path) (it becomes 'jumprelu') and import that",
            "matryoshka_batchtopk": "; load it with SAELens and save_inference_model(path) (it becomes "
                                    "'jumprelu') and import that"}.get(arch, "")
    raise ValueError(f"{cfg_file} holds a SAELens {arch!r} SAE; from_saelens imports {list(SAELENS_IMPORTS)} "
                     f"(standard, gated and the other architectures have no adaptivek equivalent){hint}")


def _drop(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in ("architecture", "d_in", "d_sae", "dtype")}


def _saelens_tensors(cfg: dict[str, Any], t: dict[str, Tensor], arch: str, cfg_file: Path,
                     weights: Path) -> dict[str, Tensor]:
    """The tensors to load (float64): shapes checked, ``b_dec`` applied to the input and decoder norms folded."""
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    scale = t.pop("scaling_factor", None)  # pre-6.0 fine-tuning scale: all ones unless it was used
    if scale is not None and not bool((scale == 1).all()):
        raise ValueError(f"{weights} holds a fine-tuning scaling_factor that is not all ones: multiply it into "
                         f"W_dec's rows in SAELens and save again")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (d_sae,)
    _check_tensors(t, shapes, cfg_file, weights, extra="probe." if arch == "adaptivek" else None)
    w = {k: v.double() for k, v in t.items() if k in shapes}
    if not cfg.get("apply_b_dec_to_input", True):  # x @ W + b = (x - b_dec) @ W + (b + b_dec @ W)
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):  # SAELens: (pre · ‖W_dec‖) top-k, / ‖W_dec‖
        norm = w["W_dec"].norm(dim=1).clamp_min(1e-8)  # SAELens' clamp
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * norm, w["b_enc"] * norm, w["W_dec"] / norm[:, None]
    return w | {k: v for k, v in t.items() if k.startswith("probe.")}


def _check_tensors(t: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], cfg_file: Path, weights: Path,
                   extra: str | None = None) -> None:
    """A ValueError naming both files when ``t`` lacks an entry of ``shapes``, has another shape, or more."""
    problems = [f"missing {k}" for k in shapes if k not in t]
    problems += [f"{k} is {tuple(t[k].shape)}, expected {s}" for k, s in shapes.items()
                 if k in t and tuple(t[k].shape) != s]
    problems += [f"unexpected {k}" for k in t if k not in shapes and not (extra and k.startswith(extra))]
    if problems:
        raise ValueError(f"{weights} does not match {cfg_file.name} ({'; '.join(problems[:4])}): the two files "
                         f"come from different SAEs or were edited; save the SAE again with its library")


def _build(arch: str, fields: dict[str, Any], cfg_file: Path) -> SparseAutoencoder:
    cls = sae_config.registered(arch, where=f"{cfg_file} needs adaptivek's")
    try:
        cfg = cls.config_class(**sae_config.config_fields(cls.config_class, fields, cfg_file))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file} describes an SAE adaptivek cannot build: {e}") from e
    return SparseAutoencoder.from_config(cfg)


@torch.no_grad()
def _load(sae: SparseAutoencoder, w: dict[str, Tensor], weights: Path) -> None:
    """Copy the weights into ``sae`` (and the architecture's extras); warn about decoder rows off unit norm."""
    for k in _CORE:
        getattr(sae, k).copy_(w[k])
    arch = sae.cfg.architecture
    if arch == "adaptivek":
        probe = {k: v for k, v in w.items() if k.startswith("probe.")}
        if not probe:
            raise ValueError(f"{weights} holds no probe.* tensors: an AdaptiveK SAE chooses k with its probe; "
                             f"export it again with AdaptiveKSAE.export_saelens")
        try:
            sae._load_extra(probe)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{weights} holds a damaged probe ({e}); export the SAE again") from e
    elif arch in ("jumprelu", "batchtopk"):
        _load_threshold(sae, w["threshold"], weights)
    norms = sae.W_dec.detach().double().norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        warnings.warn(f"{weights}: decoder rows are not unit norm (norms {float(norms.min()):.3g} to "
                      f"{float(norms.max()):.3g}); the SAE computes what its library does, but latent sizes are in "
                      f"units of those norms and train_sae would renormalise the rows (changing the SAE)",
                      UserWarning, stacklevel=4)


def _load_threshold(sae: SparseAutoencoder, theta: Tensor, weights: Path) -> None:
    """A JumpReLU's thresholds, or a frozen BatchTopK's one (a ValueError when they differ or are <= 0)."""
    if sae.cfg.architecture == "batchtopk":
        if not bool((theta == theta[0]).all()):
            raise ValueError(f"{weights} holds thresholds that differ between latents, not a BatchTopK export: "
                             f"remove metadata.adaptivek from its cfg.json to import it as a JumpReLU SAE")
        sae.threshold.fill_(float(theta[0]))
        sae.frozen.fill_(True)
        return
    if not bool((theta > 0).all()):
        raise ValueError(f"{weights} holds {int((theta <= 0).sum())} threshold(s) <= 0: adaptivek's JumpReLU keeps "
                         f"θ = exp(log θ) > 0, so it cannot reproduce them")
    if hasattr(sae, "scaled_log_threshold"):  # θ = exp(scaled_log_threshold · threshold_speed)
        sae.scaled_log_threshold.copy_(theta.double().log() / sae.threshold_speed)
    else:
        sae.log_threshold.copy_(theta.log())
    if not torch.allclose(sae.threshold.double(), theta.double(), rtol=1e-5, atol=0):
        raise RuntimeError(f"{type(sae).__name__} did not take the thresholds of {weights}: adaptivek.interop "
                           f"does not know how this version stores θ; please report it")


# ----------------------------------------------------------------------------- AdaptiveK in SAELens
def register_saelens() -> type:
    """Register AdaptiveK as SAELens architecture "adaptivek" (once; later calls do nothing) and return its
    class, :class:`AdaptiveKSAELens`. Afterwards ``sae_lens.SAE.load_from_disk(path)`` loads an
    ``AdaptiveKSAE.export_saelens`` folder (and every tool built on SAELens can use it)."""
    cls, cfg_cls = _saelens_classes()
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class

    have = SAE_CLASS_REGISTRY.get("adaptivek")
    if have is None:
        register_sae_class("adaptivek", cls, cfg_cls)
    elif have[0] is not cls:
        raise RuntimeError(f"SAELens architecture 'adaptivek' is already registered to {have[0]!r}; register "
                           f"adaptivek's before any other package claims the name")
    return cls


def __getattr__(name: str) -> Any:  # the SAELens classes, built (importing SAELens) on first access
    if name in ("AdaptiveKSAELens", "AdaptiveKSAELensConfig"):
        return _saelens_classes()[name == "AdaptiveKSAELensConfig"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _saelens_classes() -> tuple[type, type]:
    """(AdaptiveKSAELens, AdaptiveKSAELensConfig): subclasses of SAELens' SAE and SAEConfig."""
    try:
        from sae_lens.saes.sae import SAE, SAEConfig
    except ImportError as e:
        raise ImportError(f"AdaptiveK in SAELens needs SAELens: {_INSTALL}") from e
    cfg_cls = _saelens_config_class(SAEConfig)
    cls = _saelens_sae_class(SAE[cfg_cls])
    for c, name in ((cls, "AdaptiveKSAELens"), (cfg_cls, "AdaptiveKSAELensConfig")):
        c.__module__, c.__name__, c.__qualname__ = __name__, name, name  # picklable as adaptivek.interop.<name>
    return cls, cfg_cls


def _saelens_config_class(base: type) -> type:
    @dataclass
    class Config(base):
        """SAELens config of an AdaptiveK SAE: the map from predicted complexity to k (the probe is in the weights)."""

        k_min: int = 20
        k_max: int = 320
        steepness: float = 6.0
        c_min: float = 0.0
        c_max: float = 10.0

        @classmethod
        def architecture(cls) -> str:
            return "adaptivek"

    return Config


def _saelens_sae_class(base: type) -> type:
    from torch import nn

    from .probe import RidgeProbe, complexity_to_k

    class SAE(base):
        """AdaptiveK in SAELens: row i keeps its ``k_i = complexity_to_k(probe.predict(x_i))`` largest positive
        pre-activations (:meth:`k_for`); ``probe`` is the :class:`~adaptivek.probe.RidgeProbe` saved with it."""

        def __init__(self, cfg: Any, use_error_term: bool = False) -> None:
            super().__init__(cfg, use_error_term)
            self.probe: RidgeProbe | None = None

        def initialize_weights(self) -> None:
            super().initialize_weights()
            self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

        def k_for(self, x: Tensor) -> Tensor:
            """Per-row k [...] (int64) of activations ``x [..., d_in]``."""
            if self.probe is None:
                raise RuntimeError("this AdaptiveKSAELens has no probe: load it with SAE.load_from_disk from an "
                                   "AdaptiveKSAE.export_saelens folder")
            c = self.probe.predict(self.reshape_fn_in(x.to(self.dtype)))
            cfg = self.cfg
            return complexity_to_k(c, k_min=cfg.k_min, k_max=cfg.k_max, steepness=cfg.steepness, c_min=cfg.c_min,
                                   c_max=cfg.c_max).to(x.device)

        def encode(self, x: Tensor) -> Tensor:
            pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)  # [..., d_sae]
            code = variable_topk(pre.reshape(-1, pre.shape[-1]), self.k_for(x).reshape(-1))  # rows flattened
            return self.hook_sae_acts_post(code.to_dense(pre.shape[-1]).reshape(pre.shape))

        def decode(self, feature_acts: Tensor) -> Tensor:
            out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
            return self.reshape_fn_out(self.run_time_activation_norm_fn_out(out), self.d_head)

        def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
            probe = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith("probe.")]}
            if not probe:
                raise ValueError("these AdaptiveK weights hold no probe.* tensors, and k comes from the probe: "
                                 "export the SAE again with AdaptiveKSAE.export_saelens")
            self.probe = RidgeProbe.from_tensors(probe, prefix="probe.")

        def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
            if self.probe is not None:
                state_dict.update(self.probe.to_tensors(prefix="probe."))

    return SAE


__all__ = ["export_saelens", "export_sparsify", "from_saelens", "from_sparsify", "register_saelens",
           "SAELENS_IMPORTS"]  # AdaptiveKSAELens(Config): module attributes built on first access (import SAELens)
