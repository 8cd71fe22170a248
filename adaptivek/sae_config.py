"""SAE configs, the registry of architectures, and the files an SAE is saved in.

One frozen dataclass per architecture, held by an SAE as ``sae.cfg``; its ``architecture`` is the key
under which its class in :mod:`adaptivek.sae` is registered (:func:`register`), written to and read back
from a saved folder (:func:`read_saved`), as in SAELens and sparsify.

Format 2 (``sae.save(path)``): ``adaptivek_cfg.json`` (``format_version``, ``architecture``, the config's
fields) beside ``adaptivek_sae.safetensors``, names that cannot be mistaken for SAELens' (``cfg.json`` +
``sae_weights.safetensors``) or sparsify's (``cfg.json`` + ``sae.safetensors``) layouts. Format 1 (before
the registry): ``cfg.json`` with ``"format_version": 1`` and the class name, beside ``sae.safetensors``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from .checks import one_of, positive_int
from .io import save_tensors, write_json

FORMAT_VERSION = 2
CFG_FILE, WEIGHTS_FILE = "adaptivek_cfg.json", "adaptivek_sae.safetensors"


def check_k(k: Any, name: str, d_sae: int) -> int:
    """``k`` if it is an int in [1, d_sae]."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1 (every row needs at least one active latent), got {k}")
    if k > d_sae:
        raise ValueError(f"{name} ({k}) > d_sae ({d_sae}): a row cannot keep more latents than the dictionary "
                         f"has; lower {name} or enlarge the dictionary")
    return k


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"float32"`` for ``torch.float32`` (names pass through)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class SAEConfig:
    """What every SAE is built from; subclasses add their fields and name their ``architecture``."""

    architecture: ClassVar[str] = ""
    """The registry key of the SAE class this config builds (saved with it)."""
    d_in: int
    """Input width (the model's d_model)."""
    d_sae: int
    """Dictionary size (number of latents)."""
    dtype: str = field(default="float32", kw_only=True)
    """Parameter dtype at construction, a torch dtype name (``save`` records the parameters' current one)."""

    def __post_init__(self) -> None:
        positive_int(self.d_in, "d_in")
        positive_int(self.d_sae, "d_sae")
        one_of(self.dtype, "dtype", ("float32", "float64", "bfloat16", "float16"))


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    """TopK: every row keeps its ``k`` largest positive pre-activations."""

    architecture: ClassVar[str] = "topk"
    k: int
    """Active latents per row."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k, "k", self.d_sae)


@dataclass(frozen=True)
class AdaptiveKConfig(SAEConfig):
    """AdaptiveK: ``k = round(k_min + sigmoid(steepness · ((c - c_min)/(c_max - c_min) - 0.5)) · (k_max - k_min))``."""

    architecture: ClassVar[str] = "adaptivek"
    k_min: int = 20
    """Smallest k of the map (paper 20)."""
    k_max: int = 320
    """Largest k of the map (paper 320)."""
    steepness: float = 6.0
    """Steepness of the sigmoid (paper 6)."""
    c_min: float = 0.0
    """Complexity mapped to the sigmoid's low end (the rubric's 0)."""
    c_max: float = 10.0
    """Complexity mapped to the sigmoid's high end (the rubric's 10)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k_min, "k_min", self.d_sae)
        check_k(self.k_max, "k_max", self.d_sae)
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) > k_max ({self.k_max}); swap them or raise k_max")
        if not (math.isfinite(self.steepness) and self.steepness > 0):
            raise ValueError(f"steepness must be finite and > 0, got {self.steepness}")
        if not (math.isfinite(self.c_min) and math.isfinite(self.c_max) and self.c_max > self.c_min):
            raise ValueError(f"need finite c_min < c_max, got c_min={self.c_min}, c_max={self.c_max}")


@dataclass(frozen=True)
class BatchTopKConfig(TopKConfig):
    """BatchTopK: the ``k · B`` largest activations of a batch, a learned threshold at inference."""

    architecture: ClassVar[str] = "batchtopk"
    threshold_beta: float = 0.99
    """Weight of the old value in the threshold's moving average (the BatchTopK paper: 0.999 after 1,000 steps)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.threshold_beta < 1:
            raise ValueError(f"threshold_beta must be in [0, 1), got {self.threshold_beta}")


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    """JumpReLU (Rajamanoharan et al. 2024, https://arxiv.org/abs/2407.14435): per-latent learned thresholds,
    objective ``MSE + λ · L0`` through straight-through estimators, λ steered to ``target_l0`` when given."""

    architecture: ClassVar[str] = "jumprelu"
    target_l0: float | None = None
    """Mean active latents per row to land at: λ then follows a controller on the training batches' L0
    (``controller_rate``, ``controller_gain``). None: λ stays ``l0_coefficient`` (the paper's fixed penalty)."""
    bandwidth: float = 0.2
    """ε, width of the rectangle kernel of the straight-through estimators, in pre-activation units, which are
    O(1) on activations scaled to E‖x‖² = d_in (the paper's ε = 0.001 is for its own scale and 100k+ steps).
    A few hundred steps need rows in each θ's window: 0.2 landed closer to the target than 0.05 or 0.1, with
    fewer dead latents and the same FVE (tests/test_jumprelu.py's data; 20k SmolLM2 tokens)."""
    init_threshold: float | None = None
    """θ at the start. None: with ``target_l0``, set from the first training batch
    (``JumpReLUSAE.init_thresholds``) so that L0 starts at the target; without, ``bandwidth`` (the paper
    starts θ and ε equal, small: about half the latents fire and L0 comes down). Starting at the target gave
    0.66 held-out FVE at L0 ≈ 20 (SmolLM2, 400 steps) against 0.55 when coming down from half the latents."""
    threshold_speed: float = 30.0
    """s in ``θ = exp(s · scaled_log_threshold)``. Adam and sign-SGD move a parameter by about ``lr`` a step
    whatever its gradient's scale, so log θ moves ``s · lr`` (3 % a step at lr 1e-3): fast enough for thresholds
    to follow the encoder's scale in a few hundred steps (s = 1 gives 0.1 %, which the paper's 100k+ steps allow)."""
    l0_coefficient: float | None = None
    """λ at the start. None: ``1 / d_in``, where the reconstruction's pull on a threshold θ ≈ 0.7 (about 2θ²/d_in
    for O(1) pre-activations) balances the penalty's."""
    controller_rate: float = 0.1
    """η, the controller's integral rate: after each training batch ``λ_I ← λ_I · exp(η · e)`` with ``e =
    clamp(L0/target_l0 - 1, -1, 1)`` of the batches' running mean L0 (``JumpReLUSAE.step_controller``)."""
    controller_gain: float = 3.0
    """κ, its proportional gain: the loss uses ``λ = λ_I · exp(κ · e)``, which reacts at once (0 with η = 0: λ fixed)."""
    l0_tolerance: float = 0.1
    """Relative gap ``|L0/target_l0 - 1|`` beyond which the end of training and ``l0_gap`` warn."""

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.target_l0
        if t is not None and not (_real(t) and 0 < t < self.d_sae):
            raise ValueError(f"target_l0 must be a number in (0, d_sae={self.d_sae}), got {t!r}: pass the L0 to match "
                             f"(e.g. AdaptiveK's realised mean L0, evaluate(...)['l0_mean']), or None for a fixed λ")
        if not (_real(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"bandwidth must be a finite number > 0 (the straight-through window in pre-activation "
                             f"units), got {self.bandwidth!r}; the default 0.2 suits activations with E‖x‖² = d_in")
        for name in ("init_threshold", "l0_coefficient"):
            v = getattr(self, name)
            if v is not None and not (_real(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0 or None (the default), got {v!r}"
                                 + ("; thresholds are positive (stored as log θ)" if name == "init_threshold" else ""))
        if not (_real(self.threshold_speed) and self.threshold_speed > 0):
            raise ValueError(f"threshold_speed must be a finite number > 0 (1: log θ is the parameter; default 30), "
                             f"got {self.threshold_speed!r}")
        for name, default in (("controller_rate", 0.1), ("controller_gain", 3.0)):
            if not (_real(getattr(self, name)) and 0 <= getattr(self, name) <= 10):
                raise ValueError(f"{name} must be a number in [0, 10] (the default is {default}; 0 with both: λ "
                                 f"fixed), got {getattr(self, name)!r}")
        if not (_real(self.l0_tolerance) and self.l0_tolerance > 0):
            raise ValueError(f"l0_tolerance must be a finite number > 0 (relative gap, e.g. 0.1), got "
                             f"{self.l0_tolerance!r}")


def _real(v: Any) -> bool:
    """A finite int or float (bools refused)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type] = {}


def register(architecture: str, cls: type) -> None:
    """Make ``cls`` the SAE class of ``architecture`` (``SparseAutoencoder`` subclasses do it when defined)."""
    old = _REGISTRY.get(architecture)
    if not architecture or (old is not None and old.__qualname__ != cls.__qualname__):
        raise ValueError(f"{cls.__name__}: architecture {architecture!r} is empty or already taken by {old}")
    _REGISTRY[architecture] = cls


def registered(architecture: Any, where: str = "no SAE class is registered for") -> type:
    """The SAE class registered for ``architecture``."""
    if architecture not in _REGISTRY:
        raise ValueError(f"{where} architecture {architecture!r}; known: {sorted(_REGISTRY)} (import the module "
                         f"that defines it first)")
    return _REGISTRY[architecture]


# ----------------------------------------------------------------------------- saved folders
def write_saved(path: Path, cfg: SAEConfig, tensors: dict[str, Any], dtype: torch.dtype) -> None:
    """Format 2: the tensors, then the config (atomically; the JSON last, so its presence means complete)."""
    save_tensors(path / WEIGHTS_FILE, tensors)
    write_json(path / CFG_FILE, {"format_version": FORMAT_VERSION, "architecture": cfg.architecture,
                                 **asdict(cfg), "dtype": dtype_name(dtype)})


SAELENS_FORMAT = "6.54.12"
"""The SAELens version whose ``cfg.json`` layout the exports follow (tested against it). SAELens 6.x reads a
``cfg.json`` without ``sae_lens_version`` as pre-6.0 and drops its ``metadata`` (model_name, hook_name)."""


def write_saelens(path: Path, cfg: SAEConfig, tensors: dict[str, Any], dtype: torch.dtype,
                  metadata: dict[str, Any]) -> None:
    """SAELens' layout: ``cfg.json`` + ``sae_weights.safetensors``, architecture "topk", "adaptivek" (probe
    included; SAELens loads it once ``adaptivek.interop.register_saelens()`` ran) or "jumprelu" (a JumpReLU or
    a frozen BatchTopK); ``metadata["adaptivek"]`` keeps the config for ``adaptivek.interop.from_saelens``.

    ``metadata`` (model_name, hook_name, ...) lands in SAELens' ``cfg.metadata``. Refuses a folder whose
    ``cfg.json`` or weights this function did not write (a sparsify SAE, another tool's export): exporting
    there would overwrite them."""
    fields_, tensors, extra = _saelens_fields(cfg, tensors)
    refuse_foreign(path, ("cfg.json", "sae_weights.safetensors"), "export_saelens", _our_saelens)
    save_tensors(path / "sae_weights.safetensors", tensors)
    write_json(path / "cfg.json", {
        **fields_, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": dtype_name(dtype), "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": None, **metadata,
                     "exported_by": "adaptivek", **extra}})


def _saelens_fields(cfg: SAEConfig, tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """SAELens' architecture fields, the tensors to write, and metadata that restores the exact config."""
    base = {k: tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    ours = {"adaptivek": {"architecture": cfg.architecture, **asdict(cfg)}}
    if cfg.architecture == "topk":
        return {"architecture": "topk", "k": cfg.k, "rescale_acts_by_decoder_norm": False}, base, ours
    if cfg.architecture == "adaptivek":
        how = "pip install adaptivek, then adaptivek.interop.register_saelens() before SAE.load_from_disk"
        return {"architecture": "adaptivek", **asdict(cfg)}, base | _probe_tensors(tensors), ours | {"load_with": how}
    if cfg.architecture == "batchtopk":
        if not bool(tensors["frozen"]):
            raise ValueError("this BatchTopKSAE is not frozen: its k depends on the batch, which no other tool "
                             "reproduces; call sae.freeze(X_train) first (it exports as SAELens 'jumprelu' with "
                             "the calibrated threshold)")
        threshold = tensors["threshold"].detach().expand(cfg.d_sae).clone()  # [d_sae], one value
        return {"architecture": "jumprelu"}, base | {"threshold": threshold}, ours
    if cfg.architecture == "jumprelu":  # f = pre · H(pre - θ) with θ > 0 = SAELens' relu(pre) · H(pre - θ)
        return {"architecture": "jumprelu"}, base | {"threshold": tensors["threshold"]}, ours  # θ [d_sae]
    raise ValueError(f"no SAELens export for architecture {cfg.architecture!r}; exported: 'topk', 'adaptivek', "
                     f"'jumprelu' and a frozen 'batchtopk' (as 'jumprelu'). Save it with sae.save(path) instead")


def _probe_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """An AdaptiveK SAE's ``probe.*`` tensors; a ValueError without them, a warning where SAELens loses precision."""
    probe = {k: v for k, v in tensors.items() if k.startswith("probe.")}
    if not probe:
        raise ValueError("this AdaptiveKSAE has no fitted probe, so SAELens could not choose its per-input k: "
                         "train it with train_sae(sae, X, y) or pass a fitted RidgeProbe before exporting")
    if dtype_name(tensors["W_enc"].dtype) not in ("float32", "float64"):
        warnings.warn(f"SAELens casts every saved tensor to the SAE's dtype, the probe too: in "
                      f"{dtype_name(tensors['W_enc'].dtype)} a row near a k boundary may get another k there; "
                      f"export a float32 copy (sae.float()) for the same k", UserWarning, stacklevel=4)
    return probe


def _our_saelens(path: Path) -> bool:
    cfg = json.loads((path / "cfg.json").read_bytes())
    return isinstance(cfg, dict) and isinstance(cfg.get("metadata"), dict) and \
        cfg["metadata"].get("exported_by") == "adaptivek"


def refuse_foreign(path: Path, names: tuple[str, ...], writer: str, ours: Callable[[Path], bool]) -> None:
    """A FileExistsError when writing ``names`` into ``path`` would overwrite files that ``writer`` did not
    write, as ``ours(path)`` judges (an unreadable file is not ours)."""
    present = [n for n in names if (path / n).exists()]
    if not present:
        return
    try:
        mine = all((path / n).is_file() for n in present) and ours(path)
    except Exception:  # not JSON, not safetensors, missing: not ours (safetensors raises its own error type)
        mine = False
    if not mine:
        what = folder_format(path) or "files of another tool"
        raise FileExistsError(f"{path} already holds a {' and a '.join(present)} that {writer} did not write "
                              f"({what.split(':')[0]}); exporting there would overwrite it: export into "
                              f"another folder")


def folder_format(path: Path, *, nested: bool = True) -> str | None:
    """What an SAE folder holds and how to load it, in words (None: nothing known); ``nested``: also look one
    level down (sparsify keeps one folder per hookpoint)."""
    has = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if {CFG_FILE, WEIGHTS_FILE} <= has:
        return "an adaptivek save: load it with adaptivek.load_sae(path)"
    if has & {CFG_FILE, WEIGHTS_FILE}:
        return f"an incomplete adaptivek save ({' '.join(sorted(has & {CFG_FILE, WEIGHTS_FILE}))} alone): save it again"
    if {"cfg.json", "sae_weights.safetensors"} <= has:
        return ("a SAELens export (cfg.json + sae_weights.safetensors): import it with "
                "adaptivek.interop.from_saelens(path), or load it with sae_lens.SAE.load_from_disk(path)")
    if {"cfg.json", "sae.safetensors"} <= has:
        if b"format_version" in (path / "cfg.json").read_bytes():
            return "an adaptivek save of format 1: load it with adaptivek.load_sae(path)"
        return ("a sparsify SAE (cfg.json + sae.safetensors): import it with adaptivek.interop.from_sparsify(path), "
                "or load it with sparsify.SparseCoder.load_from_disk(path)")
    inner = sorted(p.name for p in path.iterdir() if p.is_dir() and folder_format(p, nested=False)) \
        if nested and path.is_dir() else []
    if inner:
        return f"one SAE per sub-folder ({', '.join(inner[:6])}{', ...' if len(inner) > 6 else ''}): pass one of them"
    return None


_FORMAT1_ARCHITECTURES = {"TopKSAE": "topk", "AdaptiveKSAE": "adaptivek"}


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or a one-line ValueError naming the file (truncated, edited, not an object)."""
    try:
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0]}): truncated or edited; save the SAE "
                         f"again (sae.save(path)) or restore the file") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an SAE config object; save the SAE again")
    return obj


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a one-line ValueError naming it (truncated or not safetensors)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path} is not a readable safetensors file ({first}): truncated or damaged; save the "
                         f"SAE again (sae.save(path)) or restore the file") from e


def read_saved(path: Path) -> tuple[dict[str, Any], Path, Path]:
    """The saved config (format 2, or format 1 translated), the config file and the weights file of an SAE folder."""
    if (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        cfg = read_json(path / CFG_FILE)
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path / CFG_FILE} has format_version {cfg.get('format_version')!r}; this "
                             f"adaptivek reads 1 and {FORMAT_VERSION}")
        return cfg, path / CFG_FILE, path / WEIGHTS_FILE
    has_cfg = (path / "cfg.json").is_file()
    if has_cfg and (path / "sae.safetensors").is_file() and b"format_version" in (path / "cfg.json").read_bytes():
        cfg = read_json(path / "cfg.json")  # format 1 (a sparsify cfg.json has no format_version)
        if cfg.get("format_version") != 1 or cfg.get("class") not in _FORMAT1_ARCHITECTURES:
            raise ValueError(f"{path / 'cfg.json'} describes a {cfg.get('class')!r} of format_version "
                             f"{cfg.get('format_version')!r}; format 1 is read for {sorted(_FORMAT1_ARCHITECTURES)}")
        return cfg | {"architecture": _FORMAT1_ARCHITECTURES[cfg["class"]]}, path / "cfg.json", path / "sae.safetensors"
    found = folder_format(path)
    found = f"; this folder holds {found}" if found else "" if path.is_dir() else "; the folder does not exist"
    raise FileNotFoundError(f"no saved SAE in {path}: expected {CFG_FILE} and {WEIGHTS_FILE} (written by "
                            f"sae.save(path)){found}")



def per_row_k(k: Any, n: int, d_sae: int) -> torch.Tensor:
    """A k given for ``n`` rows (an int, or an integer tensor [n] or []) as a tensor [n], each in [1, d_sae]."""
    if not isinstance(k, torch.Tensor):
        return torch.full((n,), check_k(k, "k", d_sae))
    k = k.expand(n) if k.ndim == 0 else k
    if k.shape != (n,) or k.is_floating_point() or k.dtype == torch.bool or k.is_complex():
        raise ValueError(f"k must be an int or an integer tensor of shape [batch={n}], got {k.dtype} {tuple(k.shape)}")
    if n and (int(k.min()) < 1 or int(k.max()) > d_sae):
        raise ValueError(f"k must lie in [1, d_sae={d_sae}], got values in [{int(k.min())}, {int(k.max())}]")
    return k


def config_fields(config_class: type, saved: dict[str, Any], cfg_file: Path) -> dict[str, Any]:
    """The fields of ``config_class`` found in a saved config; a ValueError naming the file if one is missing."""
    missing = [f.name for f in fields(config_class) if f.name not in saved and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{cfg_file} lacks {missing}: truncated or edited; save the SAE again")
    return {f.name: saved[f.name] for f in fields(config_class) if f.name in saved}


def check_state(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], weights: Path
                ) -> dict[str, torch.Tensor]:
    """``tensors`` if they hold every entry of an SAE's ``state`` with its shape; else a ValueError naming the file."""
    problems = [f"missing {k}" for k in state if k not in tensors]
    problems += [f"{k} is {tuple(tensors[k].shape)}, expected {tuple(v.shape)}" for k, v in state.items()
                 if k in tensors and tensors[k].shape != v.shape]
    problems += [f"unexpected {k}" for k in tensors if k not in state and not k.startswith("probe.")]
    if problems:
        raise ValueError(f"{weights} does not match its config ({'; '.join(problems[:4])}): the files come from "
                         f"different saves or were edited; save the SAE again")
    return tensors

__all__ = ["SAEConfig", "TopKConfig", "AdaptiveKConfig", "BatchTopKConfig", "JumpReLUConfig", "read_saved", "write_saved",
           "read_json", "read_weights",
           "register", "registered",
           "write_saelens", "refuse_foreign", "folder_format", "SAELENS_FORMAT", "dtype_name", "check_k", "FORMAT_VERSION", "CFG_FILE", "WEIGHTS_FILE"]
