"""Kept for modules that still import the old private name: the helpers live in :mod:`adaptivek.io`."""

from __future__ import annotations

from .io import (
    CACHE_ENV,
    _json_default,
    _umask,
    atomic_dir,
    atomic_path,
    cache_root,
    save_tensors,
    write_json,
)

__all__ = ["CACHE_ENV", "cache_root", "atomic_path", "atomic_dir", "write_json", "save_tensors", "_json_default", "_umask"]
