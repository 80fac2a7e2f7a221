# gradiv: two commands do everything on a fresh machine.
#   make book   create .venv, install, execute every notebook, build _build/html
#   make test   the same set-up, then unit tests, nbval over every notebook, the strict book build,
#               the headless-browser check of the built pages, and the Colab/Binder reader's path
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LIBHASH := _build/.gradiv_lib.sha
# nbval keeps the notebooks it executed here (book/conftest.py); the build takes them from the cache.
EXECUTED := _build/executed
# Two notebooks run side by side in CI (2 cores); the book's models are small,
# and gl.setup() uses one torch thread unless GRADIV_THREADS says otherwise.
NB_WORKERS ?= 2


.PHONY: help install book test unit notebooks build-book check-book browser reader-path results results-check benchmarks gpu-check mutation clean distclean

help:
	@echo "make book       build the HTML book into _build/html (installs everything into .venv first)"
	@echo "make test       unit tests + nbval over every notebook + strict book build + browser check"
	@echo "make reader-path  a fresh venv with torch + gradiv_lib[book] (what a Colab set-up cell installs) runs notebooks"
	@echo "make benchmarks run benchmarks/ and print the side-by-side ratios"
	@echo "make results    remake every shipped result in place from its recorded command (clean checkout; then commit them)"
	@echo "make results-check rerun the cheap shipped results and compare them with the shipped files (part of make test)"
	@echo "make mutation   mutation testing (mutmut) of the algorithm modules against their own tests; not in CI"
	@echo "make gpu-check  on a CUDA machine: norms harness in every dtype, train/simulator on CUDA, per-sample-norm benchmarks (JSON in gpu_check/)"
	@echo "make clean      remove _build (keeps .venv); make distclean also removes .venv"

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "gradiv needs Python >= 3.10, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

# jupyter-cache keys on a notebook's code cells only, so a change to gradiv_lib would leave stale
# outputs in the book: drop the cache whenever the library's source changes.
_build/.cache-checked: FORCE
	@mkdir -p _build
	@new=$$(cat $$(find gradiv_lib -name '*.py' -o -name '*.json' | sort) | sha256sum | cut -d' ' -f1); \
	if [ "$$(cat $(LIBHASH) 2>/dev/null)" != "$$new" ]; then rm -rf _build/.jupyter_cache; echo "$$new" > $(LIBHASH); fi
FORCE:

build-book: $(STAMP) _build/.cache-checked
	$(BIN)/jupyter-book build . -W --keep-going || { cat _build/html/reports/*.log 2>/dev/null | tail -n 60; exit 1; }

book: build-book
	@echo "The book is at _build/html/index.html"

unit: $(STAMP)
	$(BIN)/pytest tests --ignore=tests/book -n 2 -q

notebooks: $(STAMP) _build/.cache-checked
	rm -rf $(EXECUTED)
	GRADIV_EXECUTED_DIR=$(EXECUTED) $(BIN)/pytest book --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=120 -n $(NB_WORKERS) --dist loadscope -q
	$(BIN)/python tests/cache_executed_notebooks.py $(EXECUTED) _build/.jupyter_cache

# Chromium for the browser check: installed from Debian's packages when we are root and it is missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "NOTE: no Chromium found; the built-book browser check will be skipped (install chromium to run it)"; fi; }

check-book: $(STAMP) browser
	$(BIN)/pytest tests/book -q

# Shipped results (gradiv_lib/_results) are remade from the commands the registry records
# (gradiv_lib/experiments/registry.py). `results` rewrites them in place: run it from a clean checkout and commit.
# `results-check` reruns the cheap ones into a temporary folder and fails if a number moved beyond its tolerance.
results: $(STAMP)
	$(BIN)/python -m gradiv_lib.experiments.regenerate

results-check: $(STAMP)
	$(BIN)/python -m gradiv_lib.experiments.regenerate --cheap --check

# The Colab/Binder reader: torch + exactly what a notebook's set-up cell installs, from this checkout, in a new venv.
reader-path: $(STAMP)
	$(BIN)/python tests/reader_path.py

test: unit results-check notebooks build-book check-book reader-path
	@echo "make test: all checks passed"

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/bench_norms.py
	$(BIN)/python benchmarks/bench_workers.py
	$(BIN)/python benchmarks/bench_federated.py

# Mutation testing (not in CI; minutes per module; needs `pip install mutmut`, the [dev] extra): a seeded sample of
# mutants of batching, federated, topology, sharpness, plasticity, stateless and the norm engine's fused.py, engine.py,
# batch_axes.py, rules.py and rules_attention.py, each against its own tests (tests/mutation/modules.txt).
# ONLY='<mutmut name glob>' checks every mutant of one function instead of a sample (with MODULES=<its module>).
MUTATION_SAMPLE ?= 120
MODULES ?=
ONLY ?=
mutation: $(STAMP)
	PYTHON=$(abspath $(BIN))/python bash tests/mutation/run.sh $(MODULES) --sample $(MUTATION_SAMPLE) $(if $(ONLY),--only '$(ONLY)')

# On a CUDA machine (not in CI): the norms harness in every dtype on CUDA, train() and the simulator on CUDA, and the
# per-sample-norm benchmarks (ResNet-18 at B = 128, a transformer block) with peak memory. --allow-cpu: a smoke run.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out gpu_check

clean:
	rm -rf _build
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
