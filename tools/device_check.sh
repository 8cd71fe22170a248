#!/usr/bin/env bash
# Run a profile's chapters 1-5 (default: the `full` profile) on a GPU and record what each costs.
#
#   tools/device_check.sh [--profile NAME] [--allow-cpu] [OUT_DIR]
#
# OUT_DIR (default: $OUT when set, else _build/device_check/) receives:
#   summary.json, summary.md   per chapter: exit status, wall time, peak GPU memory, peak host RSS
#   chapters.log               each chapter's runner output (and /usr/bin/time's report), one after another
#   gpu_memory.csv             nvidia-smi samples every 500 ms: epoch seconds, GPU index, MiB used
#   executed.tar.gz            the executed chapters (from _build/executed/book/)
# The run itself writes where `adaptivek book run` always does: _build/artifacts/<profile>/ and
# _build/executed/book/ (replacing the quick profile's executed chapters there).
#
# Without a visible GPU (no working nvidia-smi, or torch.cuda.is_available() false) it stops at once with
# exit status 3, unless --allow-cpu is given. The Python is $ADAPTIVEK_PYTHON, else .venv/bin/python;
# a missing .venv is set up with `make setup` first. `make setup` installs the CPU build of torch: on a
# GPU machine, install a CUDA build of the same torch version into .venv (or point ADAPTIVEK_PYTHON at an
# environment that has one and adaptivek installed).
set -euo pipefail

usage() {
    echo "usage: tools/device_check.sh [--profile NAME] [--allow-cpu] [OUT_DIR]"
    echo "  runs chapters 01-05 of the profile (default: full) and writes timings and memory to OUT_DIR"
    echo "  (default: \$OUT when set, else _build/device_check/)"
}

fail() {  # fail STATUS MESSAGE: one line on stderr, then exit
    echo "device_check: error: $2" >&2
    exit "$1"
}

now() {  # seconds since the epoch, with a decimal point whatever the locale
    local t=${EPOCHREALTIME:-}
    [[ -n $t ]] || t=$(date +%s.%N)
    printf '%s' "${t/,/.}"
}

profile=full
allow_cpu=0
out_dir=""
while (($#)); do
    case "$1" in
        --profile) [[ $# -ge 2 ]] || fail 2 "--profile needs a name (see book/profiles/)"; profile=$2; shift 2 ;;
        --allow-cpu) allow_cpu=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; fail 2 "unknown option $1" ;;
        *) [[ -z $out_dir ]] || fail 2 "more than one OUT_DIR given ($out_dir, $1)"; out_dir=$1; shift ;;
    esac
done

# ---- a GPU, checked first with shell builtins only (nothing else is needed to say that there is none)
gpu_name="none"
if ((allow_cpu == 0)); then
    command -v nvidia-smi >/dev/null 2>&1 ||
        fail 3 "no GPU visible: nvidia-smi is not on PATH; run this on a machine with an NVIDIA GPU, or pass --allow-cpu to run on the CPU (days for the full profile)"
    gpu_list=$(nvidia-smi -L 2>/dev/null) || gpu_list=""
    [[ $gpu_list == *GPU* ]] ||
        fail 3 "no GPU visible: nvidia-smi -L lists no GPU (driver not loaded, or CUDA_VISIBLE_DEVICES hides it); pass --allow-cpu to run on the CPU"
    gpu_name=${gpu_list%%$'\n'*}
fi

script_dir=${BASH_SOURCE[0]%/*}
[[ $script_dir != "${BASH_SOURCE[0]}" ]] || script_dir=.
root=$(cd "$script_dir/.." && pwd -P)
cd "$root"
[[ -f book/profiles/$profile.yaml ]] || fail 2 "unknown profile $profile: book/profiles/$profile.yaml does not exist"

# ---- the Python environment, the project's way
py=${ADAPTIVEK_PYTHON:-$root/.venv/bin/python}
if [[ -z ${ADAPTIVEK_PYTHON:-} && ! -f .venv/.installed ]]; then
    command -v make >/dev/null 2>&1 || fail 2 ".venv is missing and make is not installed; install make, or set ADAPTIVEK_PYTHON"
    echo "device_check: .venv is missing: running make setup"
    make setup
fi
[[ -x $py ]] || fail 2 "no Python at $py; run make setup, or set ADAPTIVEK_PYTHON to a Python with adaptivek installed"
if ((allow_cpu == 0)); then
    torch_info=$("$py" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1) ||
        fail 2 "$py cannot import torch: $torch_info"
    [[ $torch_info == *True ]] ||
        fail 3 "no GPU visible to torch ($torch_info: version, CUDA build, cuda.is_available()): $py has a CPU-only torch or cannot reach the driver; install a CUDA build of torch there, or pass --allow-cpu"
fi

# ---- where the results go
out_dir=${out_dir:-${OUT:-$root/_build/device_check}}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd -P)
work=$(mktemp -d)
log="$out_dir/chapters.log"
gpu_csv="$out_dir/gpu_memory.csv"
: >"$log"
echo "epoch_s,gpu,memory_used_mib" >"$gpu_csv"

sampler_pid=""
# shellcheck disable=SC2329  # called by the EXIT trap
cleanup() {
    if [[ -n $sampler_pid ]]; then kill "$sampler_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 2>/dev/null |
        while IFS= read -r line; do printf '%s,%s\n' "$(now)" "${line// /}"; done >>"$gpu_csv" &
    sampler_pid=$!
fi

timer=()
if [[ -x /usr/bin/time ]] && /usr/bin/time -v true >/dev/null 2>&1; then
    timer=(/usr/bin/time -v -o "$work/time.txt")
fi

# ---- the chapters, one process each: its own wall time and peak RSS
chapters=(01_activations 02_complexity 03_linear_encoding 04_training 05_comparison)
runs="$work/runs.tsv"  # chapter, start epoch, end epoch, exit status, peak RSS in KiB (-1: unknown)
status=0
executed=()  # the executed notebooks of this run, relative to _build/executed (a failure keeps NAME.failed.ipynb)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
for chapter in "${chapters[@]}"; do
    echo "device_check: $chapter ..."
    printf '===== %s (profile %s) =====\n' "$chapter" "$profile" >>"$log"
    start=$(now)
    rc=0
    rm -f "$work/time.txt" "$work/rss.txt"
    if ((${#timer[@]})); then
        "${timer[@]}" "$py" -m adaptivek book run --profile "$profile" --only "$chapter" >>"$log" 2>&1 || rc=$?
        rss=$(sed -n 's/^[[:space:]]*Maximum resident set size (kbytes): //p' "$work/time.txt" 2>/dev/null || true)
        cat "$work/time.txt" >>"$log" 2>/dev/null || true
    else  # the peak RSS of the chapter's processes (the runner and its kernel), from Python's resource
        "$py" -c 'import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)' "$work/rss.txt" "$py" -m adaptivek book run --profile "$profile" --only "$chapter" >>"$log" 2>&1 || rc=$?
        rss=$(cat "$work/rss.txt" 2>/dev/null || true)
    fi
    end=$(now)
    printf '%s\t%s\t%s\t%s\t%s\n' "$chapter" "$start" "$end" "$rc" "${rss:--1}" >>"$runs"
    echo "device_check: $chapter exit $rc"
    nb="book/$chapter$( ((rc == 0)) || echo .failed).ipynb"
    if [[ -f _build/executed/$nb ]]; then executed+=("$nb"); fi
    if ((rc != 0)); then
        status=$rc
        echo "device_check: $chapter failed (exit $rc); later chapters need its results, stopping (see $log)" >&2
        break
    fi
done
if [[ -n $sampler_pid ]]; then
    sleep 1  # a last sample after the final chapter
    kill "$sampler_pid" 2>/dev/null || true
    sampler_pid=""
fi

# ---- the executed chapters and the summary
if ((${#executed[@]})); then
    tar -czf "$out_dir/executed.tar.gz" -C _build/executed "${executed[@]}"
fi

"$py" - "$runs" "$gpu_csv" "$out_dir" "$profile" "$gpu_name" <<'EOF'
"""Per chapter: wall time, peak GPU memory in its time window, peak host RSS -> summary.json and summary.md."""
import csv
import json
import platform
import subprocess
import sys
from pathlib import Path

runs_path, gpu_path, out, profile, gpu_name = sys.argv[1:6]
samples = []  # (epoch seconds, MiB used) of every GPU
with open(gpu_path) as f:
    for row in csv.DictReader(f):
        try:
            samples.append((float(row["epoch_s"]), float(row["memory_used_mib"])))
        except (TypeError, ValueError):  # a line cut off when the sampler stopped
            continue
rows = []
for line in Path(runs_path).read_text().splitlines() if Path(runs_path).is_file() else []:
    name, start, end, rc, rss = line.split("\t")
    start, end = float(start), float(end)
    in_window = [m for t, m in samples if start <= t <= end]
    rows.append({"chapter": name, "exit_status": int(rc), "wall_s": round(end - start, 1),
                 "peak_gpu_mib": max(in_window) if in_window else None,
                 "peak_rss_mib": round(int(rss) / 1024) if int(rss) >= 0 else None})
try:
    import torch
    torch_info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
except ImportError:
    torch_info = {}
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    commit = None
summary = {"profile": profile, "gpu": gpu_name, "host": platform.node(), "commit": commit, **torch_info,
           "total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
           "peak_gpu_mib": max((r["peak_gpu_mib"] for r in rows if r["peak_gpu_mib"] is not None), default=None),
           "peak_rss_mib": max((r["peak_rss_mib"] for r in rows if r["peak_rss_mib"] is not None), default=None),
           "ok": bool(rows) and all(r["exit_status"] == 0 for r in rows) and len(rows) == 5, "chapters": rows}
Path(out, "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
fmt = lambda v: "n/a" if v is None else str(v)  # noqa: E731
lines = [f"# Device check: profile `{profile}`", "",
         f"GPU: {gpu_name}; torch {torch_info.get('torch', '?')} (CUDA {torch_info.get('cuda')}); commit {commit}", "",
         "| chapter | exit | wall (s) | peak GPU memory (MiB) | peak host RSS (MiB) |", "|---|---|---|---|---|"]
lines += [f"| {r['chapter']} | {r['exit_status']} | {r['wall_s']} | {fmt(r['peak_gpu_mib'])} | {fmt(r['peak_rss_mib'])} |"
          for r in rows]
lines += [f"| **total** | | {summary['total_wall_s']} ({summary['total_wall_s'] / 60:.1f} min) | "
          f"{fmt(summary['peak_gpu_mib'])} | {fmt(summary['peak_rss_mib'])} |", "",
          "Peak GPU memory is nvidia-smi's memory.used (every process on the card) sampled every 500 ms.", ""]
Path(out, "summary.md").write_text("\n".join(lines))
print("\n".join(lines))
EOF

echo "device_check: results in $out_dir"
exit "$status"
