# Two commands from a fresh clone: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv first. On a machine without an NVIDIA GPU, torch comes as the CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-fast install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		args=$$(TORCH_CUDA="$(TORCH_CUDA)" TORCH_INDEX_URL="$(TORCH_INDEX_URL)" python3 scripts/torch-wheel --torch-version "$(TORCH_VERSION)") || exit 1; \
		echo "NVIDIA GPU found: installing $$args"; $(PIP) install $$args; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; $(PIP) install "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install -e ".[test,tensorboard,mlflow,wandb,serve]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/dpo-dist demo --out demo-out

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The inner loop, under 3 minutes on 2 CPU cores: every unit-level test; no end-to-end training, no launched ranks,
# no test marked slow (all of those run in `make test`).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not e2e and not distributed and not slow"

clean:
	rm -rf $(VENV) demo-out
