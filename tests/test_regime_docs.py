"""The token-level regime around the chapters: the full profile, tools/device_check.sh, chapter 6's regime
tables (adaptivek.report, on small synthetic run folders) and the docs that describe the regime."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adaptivek import book, paper, report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "device_check.sh"
BASH = shutil.which("bash") or "/bin/bash"


# ---------------------------------------------------------------------------- the full profile


def test_full_profile_is_the_embedded_model_at_scale_on_every_token():
    params = book.effective_parameters("full", ROOT)
    ch4, ch5 = params["04_training"], params["05_comparison"]
    assert params["01_activations"]["model"] == "smollm2-135m" and params["01_activations"]["device"] == "auto"
    assert ch4["sae_data"] == ch5["sae_data"] == "all_tokens" and ch4["sae_layer"] == ch5["sae_layer"] == 12
    assert ch4["d_sae"] == ch5["d_sae"] == paper.SETTINGS["d_sae"]
    assert (ch4["k_min"], ch4["k_max"]) == (paper.SETTINGS["k_min"], paper.SETTINGS["k_max"])
    assert ch4["steps"] == ch5["steps"] and ch4["batch_size"] == ch5["train_batch_size"]
    assert not report.is_paper_profile(params)
    prof = book.load_profile("full", ROOT)
    assert "dry_run" not in prof and re.search(r"GPU.*min", prof["estimate"]) and "CPU" in prof["estimate"]
    # make dry-runs runs the paper profiles only: full is the embedded model already
    dry = re.search(r"^DRY_PROFILES \?= (.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1).split()
    assert "full" not in dry and all(report.is_paper_profile(book.effective_parameters(p, ROOT)) for p in dry)


def test_full_profile_takes_the_whole_embedded_corpus():
    from adaptivek.corpus import embedded_pool

    n_texts = book.effective_parameters("full", ROOT)["01_activations"]["n_texts"]
    assert n_texts >= len(embedded_pool())  # a larger n warns and returns the whole corpus


# ---------------------------------------------------------------------------- tools/device_check.sh


def test_device_check_is_valid_bash_and_executable():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_device_check_refuses_to_run_without_nvidia_smi(tmp_path):
    (tmp_path / "bin").mkdir()  # a PATH with no nvidia-smi (nor anything else)
    proc = subprocess.run([BASH, str(SCRIPT), str(tmp_path / "out")], env={"PATH": str(tmp_path / "bin")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "no GPU visible: nvidia-smi is not on PATH" in proc.stderr and "--allow-cpu" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def _fake_bin(tmp_path: Path) -> Path:
    """A PATH folder whose nvidia-smi lists one GPU and prints a memory sample every 0.2 s."""
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text('#!/bin/bash\nif [[ $1 == -L ]]; then echo "GPU 0: Fake (UUID: GPU-0)"; exit 0; fi\n'
                   'while :; do echo "0, 1234"; sleep 0.2; done\n')
    smi.chmod(0o755)
    return folder


def test_device_check_refuses_a_torch_that_sees_no_gpu(tmp_path):
    folder = _fake_bin(tmp_path)
    env = {"PATH": f"{folder}:/usr/bin:/bin", "ADAPTIVEK_PYTHON": sys.executable}
    with_cuda = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True).stdout.strip()
    if with_cuda == "True":
        pytest.skip("this torch sees a GPU")
    proc = subprocess.run([BASH, str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3 and "no GPU visible to torch" in proc.stderr, proc.stderr


def test_device_check_records_each_chapter_and_stops_at_a_failure(tmp_path):
    folder = _fake_bin(tmp_path)
    fake_py = folder / "python"  # the chapters "run" in 0.3 s; chapter 4 fails; anything else is real Python
    fake_py.write_text('#!/bin/bash\nif [[ $1 == -m && "$*" == *"book run"* ]]; then sleep 0.3; echo "ran $*"\n'
                       '  [[ "$*" == *04_training* ]] && exit 7; exit 0; fi\n'
                       'if [[ "$*" == *cuda.is_available* ]]; then echo "9.9 12.0 True"; exit 0; fi\n'
                       f'exec {sys.executable} "$@"\n')
    fake_py.chmod(0o755)
    env = {"PATH": f"{folder}:/usr/bin:/bin", "ADAPTIVEK_PYTHON": str(fake_py), "HOME": str(tmp_path)}
    out = tmp_path / "out"
    proc = subprocess.run([BASH, str(SCRIPT), "--profile", "quick", str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert "04_training failed (exit 7)" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    chapters = [c["chapter"] for c in summary["chapters"]]
    assert chapters == ["01_activations", "02_complexity", "03_linear_encoding", "04_training"]
    assert [c["exit_status"] for c in summary["chapters"]] == [0, 0, 0, 7] and not summary["ok"]
    assert all(c["wall_s"] >= 0.3 for c in summary["chapters"]) and summary["gpu"].startswith("GPU 0: Fake")
    assert summary["peak_gpu_mib"] == 1234
    assert "ran -m adaptivek book run --profile quick --only 03_linear_encoding" in (out / "chapters.log").read_text()
    assert "| 04_training | 7 |" in (out / "summary.md").read_text()


# ---------------------------------------------------------------------------- chapter 6's regime tables


def _run(root: Path, name: str, *, training: dict | None = None, token_probe: dict | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    if training is not None:
        (run / "saes").mkdir()
        (run / "saes" / "training.json").write_text(json.dumps(training))
    if token_probe is not None:
        (run / "linear_encoding").mkdir()
        (run / "linear_encoding" / "token_probe.json").write_text(json.dumps(token_probe))
    return run


COUNTS = {"tokens": 1200, "excluded_first_positions": 10, "excluded_extreme_norm": 2, "train_rows": 950,
          "test_rows": 238, "train_texts": 8, "test_texts": 2, "train_documents": 6, "test_documents": 2,
          "train_labelled": 830, "train_unlabelled": 120}
REGIME = [{"sae": "AdaptiveK", "l0": 30.5, "train_fve": 0.81, "test_fve": 0.78, "gap": 0.03, "pca_fve": 0.6},
          {"sae": "TopK (k = 30)", "l0": 30.0, "train_fve": 0.8, "test_fve": 0.79, "gap": 0.01, "pca_fve": None}]
PROBE = {"layer": 12, "n_train_tokens": 830, "n_test_tokens": 200, "n_train_documents": 6, "n_test_documents": 2,
         "pearson": 0.61, "pearson_lo": 0.55, "pearson_hi": 0.66, "r2": 0.35, "last_token_pearson": 0.58,
         "last_token_pearson_lo": 0.4, "last_token_pearson_hi": 0.7}


@pytest.fixture
def runs(tmp_path):
    _run(tmp_path, "quick", training={"sae_data": "all_tokens", "counts": COUNTS, "regime": REGIME}, token_probe=PROBE)
    _run(tmp_path, "old", training={"train": [0, 1, 2], "test": [3], "history": {}})  # before the regime keys
    _run(tmp_path, "empty")
    return {p.name: report.collect_regime(p) for p in sorted(tmp_path.iterdir())}


def test_collect_regime_reads_new_old_and_missing_files(runs):
    assert runs["quick"]["sae_data"] == "all_tokens" and runs["quick"]["counts"]["train_documents"] == 6
    assert runs["quick"]["token_probe"]["pearson"] == 0.61 and len(runs["quick"]["regime"]) == 2
    assert runs["quick"]["regime"][1]["pca_fve"] != runs["quick"]["regime"][1]["pca_fve"]  # null read back as NaN
    assert runs["old"]["sae_data"] == "last_token" and runs["old"]["counts"] == {"train_rows": 3, "test_rows": 1}
    assert runs["old"]["regime"] == [] and runs["old"]["token_probe"] is None
    assert runs["empty"]["sae_data"] is None and runs["empty"]["counts"] == {}


def test_regime_runs_table(runs):
    t = report.regime_runs_table(runs)
    assert t.loc["quick", "SAE data"] == "every kept token"
    assert t.loc["quick", "rows (train / held out)"] == "950 / 238"
    assert t.loc["quick", "documents (train / held out)"] == "6 / 2"
    assert t.loc["quick", "excluded (position 0 / extreme norm)"] == "10 / 2"
    assert t.loc["old", "SAE data"].startswith("last token") and t.loc["old", "rows (train / held out)"] == "3 / 1"
    assert t.loc["old", "documents (train / held out)"] == "— / —"  # not recorded by that run
    assert (t.loc["empty"] == report.NOT_RUN).all()


def test_generalisation_and_token_probe_tables(runs):
    g = report.generalisation_runs_table(runs)
    assert g.loc[("quick", "AdaptiveK"), "gap"] == 0.03 and g.loc[("quick", "AdaptiveK"), "held-out FVE"] == 0.78
    assert g.loc[("old", report.NOT_RUN)].isna().all() and g.loc[("empty", report.NOT_RUN)].isna().all()
    p = report.token_probe_runs_table(runs)
    assert p.loc["quick", "Pearson [95% CI]"] == "0.610 [0.550, 0.660]"
    assert p.loc["quick", "tokens (train / held out)"] == "830 / 200" and p.loc["quick", "R²"] == "0.350"
    assert p.loc["quick", "last-token probe's Pearson"] == "0.580 [0.400, 0.700]" and p.loc["old", "layer"] == report.NOT_RUN
    assert p.loc["quick", "documents (train / held out)"] == "6 / 2"
    no_ci = {k: v for k, v in PROBE.items() if not k.startswith("last_token_pearson_")}
    assert report.token_probe_runs_table({"r": {"token_probe": no_ci}}).loc["r", "last-token probe's Pearson"] == "0.580"


def test_regime_summary_glues_every_key_in_every_case(runs):
    keys = set(report.regime_summary(runs["quick"]))
    for case in (runs["old"], runs["empty"], None):
        assert set(report.regime_summary(case)) == keys  # the chapter glues every key whatever ran
    assert set(report.regime_summary(None).values()) == {report.NOT_RUN}
    s = report.regime_summary(runs["quick"])
    assert s["train_rows"] == "950" and s["test_documents"] == "2" and s["max_gap"] == "+0.030"
    assert "better than held-out" in s["gap_verdict"]
    assert "carry over" in report.regime_summary(runs["quick"], tolerance=0.05)["gap_verdict"]
    assert s["token_pearson"] == "0.610 [0.550, 0.660]" and s["last_token_pearson"] == "0.580 [0.400, 0.700]"
    old = report.regime_summary(runs["old"])
    assert old["sae_data"].startswith("last token") and old["train_documents"] == "—" and old["max_gap"] == report.NOT_RUN


def test_profile_settings_add_the_sae_data_row():
    quick = report.profile_settings(book.effective_parameters("quick", ROOT)).set_index("setting")
    assert quick.loc["SAE training data", "profile"] == "all_tokens" and not quick.loc["SAE training data", "same"]
    for name in ("pythia-70m", "pythia-160m", "gemma-2-2b"):  # the paper's data: one last-token vector per context
        params = book.effective_parameters(name, ROOT)
        t = report.profile_settings(params).set_index("setting")
        assert t.loc["SAE training data", "same"], f"{name}.yaml runs sae_data {t.loc['SAE training data', 'profile']}"
        assert report.is_paper_profile(params)
        assert report.is_paper_profile(book.effective_parameters(name, ROOT, dry_run=True))
    assert report.profile_settings({}).set_index("setting").loc["SAE training data", "paper"] == "last_token"


# ---------------------------------------------------------------------------- docs


def test_docs_describe_the_regime():
    readme = (ROOT / "README.md").read_text()
    assert "tools/device_check.sh" in readme and "`full`" in readme and "`sae_data`" in readme
    assert ".. automodule:: adaptivek.sae_data" in (ROOT / "book" / "api.md").read_text()
    topics = {d.topic for d in paper.DEVIATIONS}
    assert {"SAE data (quick and full)", "token exclusions", "per-token labels", "intervals over documents"} <= topics
