"""adaptivek.paper: the paper's settings against our profiles, the deviations list, and citations that resolve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from adaptivek import book, paper, report

ROOT = Path(__file__).resolve().parents[1]
APPENDIX = ROOT / "book" / "reference_code.md"


@pytest.mark.parametrize("name", ["pythia-70m", "pythia-160m", "gemma-2-2b"])
def test_paper_profiles_run_every_chapter_with_the_papers_settings(name):
    table = report.profile_vs_paper(book.effective_parameters(name, ROOT)).set_index("setting")
    differs = set(table.index[~table["same"]])
    # the labels are the one thing an offline default cannot copy (GPT-4.1-mini); everything else must match
    assert differs == {"complexity labels"}, table[~table["same"]]
    model = book.effective_parameters(name, ROOT)["01_activations"]["model"]
    assert table.loc["SAE layer", "profile"] == paper.SETTINGS["layers"][model]


def test_dry_runs_keep_the_architecture_and_sizes_but_not_the_data_scale():
    table = report.profile_vs_paper(book.effective_parameters("gemma-2-2b", ROOT, dry_run=True)).set_index("setting")
    assert table.loc["model", "profile"] == "random:google/gemma-2-2b" and table.loc["model", "same"]
    assert table.loc[["dictionary size", "k range", "SAE layer"], "same"].all()
    assert not table.loc["contexts (train + test)", "same"]
    # the dry run computes in float32 on purpose (bf16 matmuls are emulated on most CPUs); the profile keeps bf16
    assert table.loc["dtype", "profile"] == "float32"
    full = report.profile_vs_paper(book.effective_parameters("gemma-2-2b", ROOT)).set_index("setting")
    assert full.loc["dtype", "same"]


def test_quick_profile_is_reported_as_scaled_down():
    table = report.profile_vs_paper(book.effective_parameters("quick", ROOT)).set_index("setting")
    assert table.loc["model", "profile"] == "smollm2-135m" and not table.loc["model", "same"]
    assert table.loc["dictionary size", "profile"] == "4 x d_model"  # from the chapter's own default


def test_parameter_defaults_reads_literals_and_skips_expressions(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("a = 1\nb = [1, (2, 3)]\nc = None  # comment = x\nd = len('x')",
                                          metadata={"tags": ["parameters"]})]
    nbformat.write(nb, str(tmp_path / "n.ipynb"))
    assert book.parameter_defaults(tmp_path / "n.ipynb") == {"a": 1, "b": [1, (2, 3)], "c": None}


def test_every_deviation_names_a_real_chapter_and_says_why():
    chapters = {p.stem for p in book.toc_chapters(ROOT)}
    table = report.deviations_table()
    assert len(table) == len(paper.DEVIATIONS) >= 10
    for d in paper.DEVIATIONS:
        assert d.where in chapters, d
        assert all(len(getattr(d, f)) > 3 for f in ("topic", "reference", "ours", "why")), d
        assert d.kind in paper.DEVIATION_KINDS, d
        assert "flaw" not in d.why, d  # the flaw is a field, explained in the appendix, not a bare "flaw N"
    assert table["topic"].is_unique
    assert set(table["kind"]) == set(paper.DEVIATION_KINDS)
    assert list(table["kind"].cat.codes) == sorted(table["kind"].cat.codes)  # grouped, in DEVIATION_KINDS order


def _appendix_flaws() -> set[int]:
    """The numbers of the appendix's numbered flaw list (section 3)."""
    text = APPENDIX.read_text()
    section = text[text.index("## 3. The flaws"):text.index("## 4.")]
    return {int(n) for n in re.findall(r"^(\d+)\. \*\*", section, flags=re.M)}


def test_the_appendix_numbers_every_flaw_a_deviation_cites():
    flaws = _appendix_flaws()
    assert flaws == set(range(1, 13))
    cited = {d.flaw for d in paper.DEVIATIONS if d.flaw is not None}
    assert cited <= flaws and {1, 2, 3, 4, 5, 6, 7, 8, 9, 10} <= cited
    assert "https://arxiv.org/abs/2508.17320" in APPENDIX.read_text()
    assert "https://github.com/hiyukie/adaptiveK" in APPENDIX.read_text()
    assert "book/reference_code" in (ROOT / "_toc.yml").read_text()
    assert "book/reference_code.md" in (ROOT / "docs" / "reference-code.md").read_text()


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    keep = (".py", ".md", ".ipynb", ".yaml", ".yml", ".toml", ".txt", ".cfg")
    return [ROOT / f for f in out if f.endswith(keep) and (ROOT / f).is_file()]


def test_citations_resolve_inside_the_repository():
    """Nothing cites a file outside the repository; every "flaw N" is one the appendix numbers."""
    flaws = _appendix_flaws()
    problems = []
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        if rel == Path("tests/test_paper.py"):
            continue
        problems += [f"{rel}: cites {m}" for m in re.findall(r"reference/paper\.md|/work/shared|shared/reference", text)]
        problems += [f"{rel}: flaw {n} is not in the appendix" for n in re.findall(r"flaws? (\d+)", text)
                     if int(n) not in flaws]
    assert not problems, "\n".join(problems)
