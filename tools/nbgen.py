"""Tiny helper to write a chapter notebook from a list of (kind, source) cells, without outputs.

Usage from a throwaway script:  write_notebook(path, [("md", "# Title"), ("params", "x = 1"), ("code", ...)])
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def write_notebook(path: str | Path, cells: list[tuple[str, str]]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(src))
        elif kind == "params":
            nb.cells.append(nbformat.v4.new_code_cell(src, metadata={"tags": ["parameters"]}))
        elif kind == "code":
            nb.cells.append(nbformat.v4.new_code_cell(src))
        elif kind.startswith("code:"):  # code with tags, e.g. "code:hide-input"
            nb.cells.append(nbformat.v4.new_code_cell(src, metadata={"tags": kind.split(":", 1)[1].split(",")}))
        else:
            raise ValueError(f"unknown cell kind {kind!r}")
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, str(path))


if __name__ == "__main__":
    sys.exit("import write_notebook from this module")
