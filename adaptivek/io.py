"""File helpers for results and caches: the cache directory and atomic writes (public, for chapters too).

Every result file is written to a temporary file in the destination directory and then
renamed over the target (``os.replace`` is atomic on POSIX), so an interrupted run never
leaves a half-written file behind that a later run would trust. Use :func:`write_json` for JSON,
:func:`save_tensors` for safetensors and :func:`atomic_path` for any other format (write to the
yielded path). Every file gets ordinary permissions (``0o666`` less the umask, e.g. ``0o644``).
Caches live under :func:`cache_root`; they verify what they read with :func:`file_digest` and
report a corrupt entry with :class:`CacheError` (or, where they rebuild it, :class:`CacheWarning`).

JSON is strict: ``write_json`` writes NaN and +-inf as ``null`` (bare ``NaN`` / ``Infinity`` are
not JSON and strict parsers such as JavaScript's or jq reject them), so a reader gets ``None``
where the value was not finite.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "ADAPTIVEK_CACHE"


def cache_root() -> Path:
    """Root of adaptivek's on-disk cache: ``$ADAPTIVEK_CACHE`` or the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("adaptivek"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name is ``.NAME.<pid>-<random>.partial<suffix>``: the writer's process id tells a
    cleanup which half-written files belong to a run that is still going (:func:`writer_alive`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    mode = 0o666 & ~_umask()
    os.chmod(tmp_path, mode)  # mkstemp makes 0600; results are ordinary files
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # again: a writer may have replaced the file (safetensors does, as 0600)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def writer_alive(partial: str | os.PathLike) -> bool:
    """Whether the process that is writing ``partial`` (an :func:`atomic_path` name) still runs on this
    machine. A name without a process id (an older run's) counts as abandoned."""
    m = re.search(r"\.(\d+)-[^.]*\.partial", Path(partial).name)
    if m is None:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it to ``path`` only if the block succeeds.

    If another process created ``path`` first, its copy is kept and ours is discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON, atomically: NaN and +-inf become ``null``.

    NumPy scalars and arrays, torch tensors and paths are converted; anything else that JSON cannot
    hold is a TypeError naming its type.
    """
    text = json.dumps(_strict(obj), indent=2, sort_keys=True, allow_nan=False)
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(text + "\n")


def _strict(o: Any) -> Any:
    """``o`` with containers rebuilt, non-JSON leaves converted and non-finite floats as ``None``."""
    if isinstance(o, float):  # np.float64 too (a float subclass)
        return float(o) if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    if o is None or isinstance(o, (str, int)):
        return o
    return _strict(_json_default(o))


def nan_for_null(obj: Any) -> Any:
    """``obj`` (as read back from JSON) with every ``None`` replaced by NaN, recursively.

    The inverse of :func:`write_json`'s NaN -> ``null`` for a section that holds only numbers (metrics,
    intervals): apply it to such sections, not to a whole file whose ``null`` may mean "not set".
    """
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: nan_for_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_for_null(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if type(o).__module__ == "torch" and hasattr(o, "tolist"):  # a tensor, without importing torch
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    with atomic_path(path, ".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


class CacheError(ValueError):
    """A cache entry that fails verification (checksum, size, shape or coverage); the message names the file."""


class CacheWarning(UserWarning):
    """A corrupt cache entry was found and is being rebuilt; the message names the file and the problem."""


def digest_algorithm() -> str:
    """The checksum caches use: ``"xxh3_128"`` (``xxhash``, installed with ``datasets``), else ``"sha256"``.

    xxh3 reads about 6 GB/s (sha256 under 1 GB/s), so verifying a cache entry costs little next
    to reading it. Both catch accidental corruption (flipped bits, truncation, swapped blocks);
    neither protects against someone who can write the cache on purpose.
    """
    return "xxh3_128" if importlib.util.find_spec("xxhash") is not None else "sha256"


def bytes_digest(data, algorithm: str | None = None) -> str:
    """``"<algorithm>:<hex>"`` of a bytes-like object (``bytes``, ``memoryview``, ``mmap``)."""
    algorithm, h = new_hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def new_hasher(algorithm: str | None = None):
    """``(algorithm, hasher)`` for incremental checksums (``update(bytes)``, then ``hexdigest()``)."""
    algorithm = algorithm or digest_algorithm()
    if algorithm == "xxh3_128":
        import xxhash

        return algorithm, xxhash.xxh3_128()
    if algorithm == "sha256":
        return algorithm, hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; this adaptivek knows 'xxh3_128' and 'sha256'")


def file_digest(path: str | os.PathLike, algorithm: str | None = None) -> str:
    """``"<algorithm>:<hex>"`` of a file's bytes, read through a memory map (no copy)."""
    path = Path(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return bytes_digest(b"", algorithm)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return bytes_digest(mm, algorithm)


__all__ = ["CACHE_ENV", "cache_root", "atomic_path", "atomic_dir", "write_json", "save_tensors",
           "nan_for_null", "CacheError", "CacheWarning", "digest_algorithm", "new_hasher", "bytes_digest", "file_digest"]
