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


def write_saelens(path: Path, cfg: TopKConfig, tensors: dict[str, Any], dtype: torch.dtype,
                  model_name: str | None, hook_name: str | None) -> None:
    """SAELens' layout of a TopK SAE: ``cfg.json`` + ``sae_weights.safetensors``, architecture "topk".

    Refuses a folder whose ``cfg.json`` or weights were not written by this function (a sparsify SAE, a
    format-1 save, another tool's export): exporting there would overwrite them.
    """
    _refuse_foreign(path)
    save_tensors(path / "sae_weights.safetensors", tensors)
    write_json(path / "cfg.json", {
        "architecture": "topk", "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k, "dtype": dtype_name(dtype),
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
        "metadata": {"model_name": model_name, "hook_name": hook_name, "exported_by": "adaptivek"}})


def _refuse_foreign(path: Path) -> None:
    """A FileExistsError when an export into ``path`` would overwrite a file that another writer made."""
    cfg, weights = path / "cfg.json", path / "sae_weights.safetensors"
    ours = False
    if cfg.is_file():
        try:
            ours = json.loads(cfg.read_bytes()).get("metadata", {}).get("exported_by") == "adaptivek"
        except (ValueError, AttributeError):  # not JSON, or not an object: not ours
            ours = False
    if (cfg.is_file() or weights.is_file()) and not ours:
        raise FileExistsError(f"{path} already holds a cfg.json or sae_weights.safetensors that export_saelens did "
                              f"not write (a sparsify SAE, a format-1 save, another export); exporting there would "
                              f"overwrite it: export into another folder")


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
    found = ""
    if (path / "sae_weights.safetensors").is_file():
        found = "; this folder holds a SAELens export (read it with sae_lens.SAE.load_from_disk)"
    elif has_cfg and (path / "sae.safetensors").is_file():
        found = "; this folder holds a sparsify SAE (read it with sparsify.SparseCoder.load_from_disk)"
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

__all__ = ["SAEConfig", "TopKConfig", "AdaptiveKConfig", "BatchTopKConfig", "read_saved", "write_saved",
           "read_json", "read_weights",
           "register", "registered",
           "write_saelens", "dtype_name", "check_k", "FORMAT_VERSION", "CFG_FILE", "WEIGHTS_FILE"]
