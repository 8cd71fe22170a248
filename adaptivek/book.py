"""Run the book's chapters with papermill under a profile, check them, and build the HTML.

Source notebooks in ``book/`` are committed without outputs. ``run_book`` executes every
notebook listed in ``_toc.yml``, in order, into ``_build/executed/book/`` with the parameters
of ``book/profiles/<profile>.yaml``; all chapters share one artifacts directory
(``_build/artifacts/<profile>``), so later chapters read what earlier ones wrote.
``build_book`` stages the executed copies beside ``_config.yml``/``_toc.yml`` and runs
jupyter-book 1.x on the stage, writing HTML to ``_build/html``.

A profile is checked before anything runs: invalid YAML names the file and line; a chapter key
that is not a chapter of ``_toc.yml`` and a parameter that no chapter (or not that chapter)
declares are refused with the valid names. A run killed mid-chapter leaves a hidden
``.NAME.ipynb.*.partial.ipynb`` beside the executed chapters; the next run deletes it and
:func:`executed_notebooks` (what ``book check`` reads) never lists it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_path, write_json, writer_alive

EMBEDDED = ("smollm2-135m",)
PROFILE_KEYS = ("description", "defaults", "chapters", "estimate", "dry_run")
DRY_RUN_KEYS = ("defaults", "chapters", "estimate")


class ChapterFailed(RuntimeError):
    """A chapter raised while executing; the message names the chapter, cell and error."""


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file (and line) and what to change."""


@dataclass
class ChapterRun:
    name: str
    seconds: float
    output: Path


def repo_root(start: Path | None = None) -> Path:
    """The directory holding ``_toc.yml`` (searched upwards from ``start`` or the cwd)."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "_toc.yml").is_file() and (d / "book").is_dir():
            return d
    raise FileNotFoundError(f"no _toc.yml with a book/ folder above {here}; run from the adaptivek repository")


def toc_chapters(root: Path) -> list[Path]:
    """Notebooks listed in ``_toc.yml``, in reading order (Markdown pages are skipped)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    entries: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                entries.append(node["file"])
            for key in ("chapters", "sections", "parts"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    out = []
    for entry in entries:
        path = root / (entry if entry.endswith(".ipynb") else f"{entry}.ipynb")
        if path.is_file():
            out.append(path)
        elif not (root / f"{entry}.md").is_file() and not (root / entry).is_file():
            raise FileNotFoundError(f"_toc.yml lists {entry!r} but neither {entry}.ipynb nor {entry}.md exists")
    return out


def load_profile(name: str, root: Path) -> dict[str, Any]:
    """Read and check ``book/profiles/<name>.yaml`` (keys: ``description``, ``defaults``, ``chapters``,
    ``estimate``, ``dry_run``) against the chapters of ``_toc.yml`` and their parameters cells."""
    path = root / "book" / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "book" / "profiles").glob("*.yaml"))
        raise FileNotFoundError(f"unknown profile {name!r}: {path} does not exist; known profiles: {known}")
    prof = _read_yaml(path)
    _check_shape(prof, path)
    prof["defaults"] = prof.get("defaults") or {}
    prof["chapters"] = {k: v or {} for k, v in (prof.get("chapters") or {}).items()}
    _check_names(prof, path, {nb.stem: declared_parameters(nb) for nb in toc_chapters(root)})
    return prof


def _read_yaml(path: Path) -> Any:
    """The YAML in ``path``; a syntax error becomes a one-line ProfileError naming the file and line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark, start = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if start is not None and getattr(e, "context", None):
            problem += f", {e.context} that starts at line {start.line + 1}, column {start.column + 1}"
        raise ProfileError(f"{where}: not valid YAML ({problem}); fix the file there") from None
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _check_shape(prof: Any, path: Path) -> None:
    """Refuse a profile whose sections are not the mappings the runner reads."""
    def mapping(value: Any, where: str) -> None:
        if value is not None and not isinstance(value, dict):
            raise ProfileError(f"{path}: {where} must be a mapping (name: value), got {type(value).__name__} "
                               f"{value!r:.60}")

    mapping(prof, "the top level")
    _check_keys(prof, PROFILE_KEYS, path, "top-level key")
    mapping(prof.get("dry_run"), "dry_run")
    for section, where in ((prof, ""), (prof.get("dry_run") or {}, "dry_run.")):
        mapping(section.get("defaults"), f"{where}defaults")
        mapping(section.get("chapters"), f"{where}chapters")
        for chapter, params in (section.get("chapters") or {}).items():
            mapping(params, f"{where}chapters.{chapter}")
    _check_keys(prof.get("dry_run") or {}, DRY_RUN_KEYS, path, "dry_run key")


def _check_keys(given: dict, valid: Any, path: Path, what: str) -> None:
    """Refuse keys of ``given`` outside ``valid``, suggesting the closest valid name."""
    unknown = [k for k in given if k not in valid]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), list(valid), 1))
                 else repr(k) for k in unknown]
        raise ProfileError(f"{path}: unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                           f"valid: {sorted(valid)}")


def _check_names(prof: dict[str, Any], path: Path, declared: dict[str, set[str]]) -> None:
    """Every chapter key names a chapter of ``_toc.yml``, every parameter is one its chapter declares
    (a ``defaults`` entry: one that some chapter declares), in the profile and its ``dry_run``."""
    every = set().union(*declared.values()) if declared else set()
    for section, where in ((prof, ""), (prof.get("dry_run") or {}, "dry_run.")):
        _check_keys(section.get("defaults") or {}, every, path, f"{where}defaults parameter")
        chapters = section.get("chapters") or {}
        _check_keys(chapters, declared, path, f"{where}chapters key")
        for chapter, params in chapters.items():
            _check_keys(params or {}, declared[chapter], path, f"{where}chapters.{chapter} parameter")


def dry_run_profile(prof: dict[str, Any]) -> dict[str, Any]:
    """The profile a ``--dry-run`` uses: its ``dry_run`` overrides applied, the model made random.

    The model keeps its architecture and size (``random:<hub id>`` builds it from the stored
    config, with the embedded tokenizer), so the paper profile's code path runs offline.
    """
    over = prof.get("dry_run") or {}
    out = {**prof, "defaults": {**prof["defaults"], **(over.get("defaults") or {})}}
    out["chapters"] = {name: {**(prof["chapters"].get(name) or {}), **((over.get("chapters") or {}).get(name) or {})}
                       for name in set(prof["chapters"]) | set(over.get("chapters") or {})}
    model = out["defaults"].get("model")
    if model and model not in EMBEDDED and not str(model).startswith("random:"):
        out["defaults"]["model"] = f"random:{model}"
    if over.get("estimate"):
        out["estimate"] = over["estimate"]
    return out


def _parameter_assignments(notebook: Path) -> list[tuple[str, Any]]:
    """``(name, value node)`` of each assignment in the notebook's ``parameters`` cell, parsed with ``ast``."""
    import ast

    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, ast.AnnAssign) else []
                out += [(t.id, node.value) for t in targets if isinstance(t, ast.Name)]
    return out


def declared_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's ``parameters`` cell (comments may hold '=')."""
    return {name for name, _ in _parameter_assignments(notebook)}


def parameter_defaults(notebook: Path) -> dict[str, Any]:
    """The literal default values of the notebook's ``parameters`` cell (non-literals are skipped)."""
    import ast

    out: dict[str, Any] = {}
    for name, value in _parameter_assignments(notebook):
        try:
            out[name] = ast.literal_eval(value)
        except ValueError:  # an expression, or an annotation without a value
            continue
    return out


def effective_parameters(profile: str, root: Path | None = None, *, dry_run: bool = False) -> dict[str, dict[str, Any]]:
    """What each chapter runs with under ``profile``: its own defaults, overlaid with the profile's values."""
    root = root or repo_root()
    prof = load_profile(profile, root)
    if dry_run:
        prof = dry_run_profile(prof)
    return {nb.stem: parameter_defaults(nb) | chapter_parameters(nb, prof, {}) for nb in toc_chapters(root)}


def chapter_parameters(notebook: Path, profile: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Parameters for one chapter: profile defaults it declares + its own section + ``extra``."""
    declared = declared_parameters(notebook)
    if not declared:
        raise ValueError(f"{notebook.name} has no cell tagged 'parameters'; every chapter needs one")
    own = profile["chapters"].get(notebook.stem, {}) or {}
    undeclared = set(own) - declared
    if undeclared:
        raise ValueError(f"profile sets {sorted(undeclared)} for {notebook.stem}, which its parameters "
                         f"cell does not declare (declared: {sorted(declared)})")
    params = {k: v for k, v in profile["defaults"].items() if k in declared}
    params.update(own)
    params.update({k: v for k, v in extra.items() if k in declared})
    return params


KERNEL_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
"""glibc settings for the chapters' kernels: large tensors come from the heap and freed memory stays there, so
a tensor the size of [tokens, vocab] reuses pages instead of faulting in fresh ones on every allocation (the
splice's softmax-sized temporaries spent most of their time in page faults). Other C libraries ignore them."""


def run_book(
    profile: str = "quick",
    *,
    only: list[str] | None = None,
    root: Path | None = None,
    dry_run: bool = False,
    log=print,
) -> list[ChapterRun]:
    """Execute the chapters in ``_toc.yml`` order; stop at the first failing chapter."""
    root = root or repo_root()
    prof = load_profile(profile, root)
    if dry_run:
        prof = dry_run_profile(prof)
    chapters = _select_chapters(toc_chapters(root), only)
    tag = f"{profile}-dry" if dry_run else profile
    artifacts = root / "_build" / "artifacts" / tag
    artifacts.mkdir(parents=True, exist_ok=True)
    # dry runs must not replace the executed chapters the HTML is built from
    out_dir = root / "_build" / ("executed" if not dry_run else f"executed-dry/{profile}")
    _clean_partials(out_dir, log)
    extra = {"profile": profile, "artifacts_dir": str(artifacts), "dry_run": dry_run}
    if prof.get("description"):
        log(f"profile {profile}: {prof['description'].strip()}")
    if prof.get("estimate"):
        log(f"estimate: {prof['estimate']}")
    runs: list[ChapterRun] = []
    for key, value in KERNEL_ENV.items():  # the chapters' kernels inherit it (a value set by the user wins)
        os.environ.setdefault(key, value)
    for nb in chapters:
        params = chapter_parameters(nb, prof, extra)
        log(f"[{nb.stem}] running with {json.dumps({k: v for k, v in params.items() if k != 'artifacts_dir'})}")
        runs.append(_execute(nb, out_dir / nb.relative_to(root), params))
        log(f"[{nb.stem}] done in {runs[-1].seconds:.1f} s")
    timings = {r.name: round(r.seconds, 1) for r in runs}
    write_json(out_dir / f"timings-{tag}.json", timings)
    problems = check_executed([r.output for r in runs])
    if problems:
        raise ChapterFailed("executed chapters have problems:\n" + "\n".join(problems))
    log(f"all {len(runs)} chapters ran in {sum(timings.values()):.0f} s: {timings}")
    return runs


def _clean_partials(out_dir: Path, log=print) -> None:
    """Delete the half-written notebooks (``.NAME.ipynb.*.partial.ipynb``) that a killed run left behind
    (never those of a run that is still going: another ``book run`` may be executing a chapter)."""
    found = sorted(out_dir.rglob(".*.partial.ipynb")) if out_dir.is_dir() else []
    stale = [p for p in found if not writer_alive(p)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} half-written notebook(s) a killed run left: {[p.name for p in stale]}")


def executed_notebooks(root: Path) -> list[Path]:
    """The executed chapters ``book check`` reads: ``_build/executed/book/*.ipynb`` without hidden
    half-written copies (``.*.partial.ipynb``) and without the ``*.failed.ipynb`` a failure keeps."""
    folder = root / "_build" / "executed" / "book"
    return sorted(p for p in folder.glob("*.ipynb")
                  if not p.name.startswith(".") and not p.name.endswith((".failed.ipynb", ".partial.ipynb")))


def _select_chapters(chapters: list[Path], only: list[str] | None) -> list[Path]:
    """The chapters named in ``only`` (all when empty), in reading order; an unknown name raises."""
    if not only:
        return chapters
    names = {c.stem for c in chapters}
    missing = [o for o in only if o not in names]
    if missing:
        raise ValueError(f"--only {missing}: no such chapter; chapters are {sorted(names)}")
    return [c for c in chapters if c.stem in only]


def _execute(nb: Path, target: Path, params: dict[str, Any]) -> ChapterRun:
    """Run one chapter with papermill into ``target`` (atomically); a failure keeps ``*.failed.ipynb``."""
    import papermill as pm

    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    failed = target.with_suffix(".failed.ipynb")
    failed.unlink(missing_ok=True)
    with atomic_path(target, ".ipynb") as tmp:
        try:
            pm.execute_notebook(str(nb), str(tmp), parameters=params, cwd=str(nb.parent),
                                kernel_name="python3", progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as e:
            shutil.copyfile(tmp, failed)
            raise ChapterFailed(
                f"chapter {nb.stem} failed in cell {e.exec_count} (index {e.cell_index}): {e.ename}: "
                f"{e.evalue}\n(the partly executed notebook is {failed})") from None
    return ChapterRun(nb.stem, time.perf_counter() - start, target)


def check_executed(notebooks: list[Path]) -> list[str]:
    """Problems in executed notebooks: error outputs, a chapter without a single figure, or a glue reference
    in its markdown to a key that no code cell glued (:func:`glue_problems`)."""
    import nbformat

    problems = []
    for path in notebooks:
        problems += glue_problems(path)
        nb = nbformat.read(str(path), as_version=4)
        images = 0
        for i, cell in enumerate(nb.cells):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    problems.append(f"{path.name}: cell {i} has an error output: {out.get('ename')}: "
                                    f"{out.get('evalue')}")
                if "image/png" in out.get("data", {}) or "image/svg+xml" in out.get("data", {}):
                    images += 1
        if images == 0:
            problems.append(f"{path.name}: no figure rendered (every chapter plots at least one)")
    return problems


# myst-nb's glue roles ({glue}, {glue:}, {glue:any}, {glue:text}, {glue:md}) and directives (```{glue:figure} key)
_GLUE_ROLE = re.compile(r"\{(glue(?::any|:text|:md|:)?)\}`([^`]+)`")
_GLUE_DIRECTIVE = re.compile(r"^[ \t]*(?:`{3,}|:{3,})\{(glue(?::any|:figure|:math|:md|:)?)\}[ \t]+(\S+)", re.MULTILINE)


def glued_keys(notebook: Path) -> set[str]:
    """The keys that the code cells of an executed notebook glued (``myst_nb.glue``: outputs whose metadata
    holds ``scrapbook.name``)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    return {out["metadata"]["scrapbook"]["name"] for cell in nb.get("cells", []) if cell.get("cell_type") == "code"
            for out in cell.get("outputs", []) if "name" in out.get("metadata", {}).get("scrapbook", {})}


def glue_references(text: str) -> list[tuple[str, str, str | None, str]]:
    """``(role, key, doc, as written)`` of every glue role and directive in markdown ``text``, the key and the
    other document (``doc::key``, else None) parsed as myst-nb parses them: ``{glue:text}`` and ``{glue:md}``
    end in an optional ``:format`` (``key:.2f``); only ``{glue:text}`` and ``{glue:any}`` take ``doc::``."""
    out = []
    for role, body in _GLUE_ROLE.findall(text):
        key = body.rsplit(":", 1)[0] if role in ("glue:text", "glue:md") else body
        doc, key = key.split("::", 1) if role != "glue:md" and "::" in key else (None, key)
        out.append((role, key, doc, f"{{{role}}}`{body}`"))
    out += [(role, key, None, f"{{{role}}} {key}") for role, key in _GLUE_DIRECTIVE.findall(text)]
    return out


def glue_problems(notebook: Path) -> list[str]:
    """One line per glue reference in the markdown of an executed ``notebook`` whose key no code cell glued,
    in this chapter or, for ``doc::key``, in the executed chapter ``doc`` beside it: a verdict or number that
    the prose names but the run never computed renders as nothing (and only as a build warning)."""
    own, known, problems = glued_keys(notebook), {}, []
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "markdown":
            continue
        source = "".join(cell.get("source", []))
        for _role, key, doc, written in glue_references(source):
            where = f"{notebook.name}: markdown cell {i} uses {written}"
            if doc is None:
                if key not in own:
                    problems.append(f"{where}, but no code cell of {notebook.name} glues {key!r}; glue it there "
                                    f"(myst_nb.glue({key!r}, value, display=False)) or correct the key")
                continue
            other = notebook.parent / doc
            if not other.is_file():
                problems.append(f"{where}, but {doc} is not an executed chapter beside it ({other} is missing); "
                                "run that chapter too, or correct the name")
            elif key not in known.setdefault(doc, glued_keys(other)):
                problems.append(f"{where}, but no code cell of {doc} glues {key!r}; glue it in {doc} or correct "
                                "the key")
    return problems


def build_book(root: Path | None = None, *, log=print) -> Path:
    """Stage executed chapters (sources where none ran) and build HTML into ``_build/html``."""
    root = root or repo_root()
    stage = root / "_build" / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "book").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        if (root / name).is_file():
            shutil.copy2(root / name, stage / name)
    for src in (root / "book").iterdir():
        if src.is_file() and src.suffix != ".ipynb":
            shutil.copy2(src, stage / "book" / src.name)
        elif src.is_dir() and src.name not in ("profiles", "__pycache__", ".ipynb_checkpoints"):
            shutil.copytree(src, stage / "book" / src.name)
    executed = root / "_build" / "executed" / "book"
    for nb in toc_chapters(root):
        done = executed / nb.name
        if done.is_file():
            shutil.copy2(done, stage / "book" / nb.name)
        else:
            log(f"warning: {nb.stem} has not been executed; building its source without outputs")
            shutil.copy2(nb, stage / "book" / nb.name)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(stage), "--path-output", str(root)]
    if not Path(cmd[0]).exists():
        cmd[0] = "jupyter-book"
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    html = root / "_build" / "html"
    all_executed = all((executed / nb.name).is_file() for nb in toc_chapters(root))
    problems = check_html(html, [nb.stem for nb in toc_chapters(root)], build_log=proc.stdout + proc.stderr,
                          require_glue=all_executed)
    if problems:
        raise ChapterFailed("the built HTML has problems:\n" + "\n".join(problems))
    log(f"book built: {html / 'index.html'}")
    return html


def check_html(html: Path, chapters: list[str], *, build_log: str = "", require_glue: bool = True) -> list[str]:
    """Problems in the built book: a chapter page missing, an error output, no figure or an image file
    missing, no Colab launch button; with ``require_glue``, any glued value that could not be found."""
    import re

    problems = []
    for stem in chapters:
        page = html / "book" / f"{stem}.html"
        if not page.is_file():
            problems.append(f"{stem}: no page {page}")
            continue
        text = page.read_text(errors="replace")
        if re.search(r'class="output (traceback|error)', text):
            problems.append(f"{stem}: the page shows an error output")
        images = re.findall(r'<img[^>]+src="([^"]+)"', text)
        if not images:
            problems.append(f"{stem}: no figure on the page")
        for src in images:
            if not src.startswith(("data:", "http")) and not (page.parent / src).resolve().is_file():
                problems.append(f"{stem}: image {src} is missing")
        if "colab.research.google.com" not in text:
            problems.append(f"{stem}: no Colab launch button (launch_buttons.colab_url in _config.yml)")
    if require_glue:
        problems += [f"unresolved glue: {line.strip()}" for line in build_log.splitlines()
                     if "glue" in line.lower() and "warning" in line.lower()]
    return problems
