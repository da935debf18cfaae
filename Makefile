# tuneforge: `make run` installs into .venv and runs the default pipeline; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch==2.13.0 resolves to the CPU build on the supported CPU machines; on a CUDA box set
# TORCH="torch==2.13.0 --index-url <your CUDA index>" or preinstall torch in the venv.
TORCH  ?= torch==2.13.0
EXTRAS ?= unsloth,embeddings,export,dev
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# dvc.yaml commands call `python`: make it the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# `dvc plots show` writes its page from this template (.dvc/config: plots.html_template), with vega, vega-lite and
# vega-embed inlined from the npm registry: the page renders with no network (DVC's own loads them from a CDN).
PLOTS_PAGE := .dvc/plots/offline.html
VEGA_LIBS  ?= vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0

.PHONY: install run test test-fast lint bench clean plots-page chromium

install: $(VENV)/.installed $(PLOTS_PAGE)

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH) -e ".[$(EXTRAS)]"
	# unsloth pulls torchvision, whose registry build breaks `from transformers import Trainer`
	# beside the CPU torch; nothing here uses it.
	$(PIP) uninstall -y torchvision || true
	touch $@

run: install
	$(VENV)/bin/dvc repro
	@echo; echo "Eval table: reports/eval.md"; cat reports/eval.md

# Two pytest workers, whole files each (module fixtures are built once), one torch thread per worker: the
# serial suite kept one of the two cores idle most of the time (subprocess start-up, DVC, Prefect waits).
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check stages flows tests bench

plots-page: $(PLOTS_PAGE)

$(PLOTS_PAGE): .dvc/plots/page.html Makefile
	@if ! command -v npm >/dev/null; then \
	  echo "warning: npm not found: $@ loads vega from a CDN (install Node.js and run make plots-page)"; \
	  sed 's|^.*<!-- VEGA:.*$$|{scripts}|' $< > $@; exit 0; fi; \
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	(cd "$$tmp" && npm pack --silent $(VEGA_LIBS) >/dev/null); \
	{ sed '/<!-- VEGA:/,$$d' $<; \
	  for lib in $(VEGA_LIBS); do name=$${lib%@*}; \
	    printf '    <script data-lib="%s">\n' "$$lib"; \
	    tar -xzOf "$$tmp/$$name-$${lib##*@}.tgz" "package/build/$$name.min.js"; \
	    printf '\n    </script>\n'; done; \
	  sed '1,/<!-- VEGA:/d' $<; } > "$$tmp/page.html"; \
	if [ "$$(grep -ci '</script' "$$tmp/page.html")" != "$$(( $$(grep -ci '</script' $<) + $(words $(VEGA_LIBS)) ))" ]; then \
	  echo "error: a library holds '</script': it cannot be inlined" >&2; exit 1; fi; \
	mv "$$tmp/page.html" $@

# Debian's Chromium, for the test that renders `dvc plots show`'s page headless (.ci/run installs it; needs root)
chromium:
	command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

clean:
	rm -rf models reports data/raw data/clean data/formatted checkpoints
