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

.PHONY: setup demo test test-fast notebooks clean help
help:
	@echo "make demo   - assemble a highlight reel from the sample videos into $(OUT)/ (real models)"
	@echo "make test   - the whole test suite: unit, integration (real models) and notebooks"
	@echo "make test-fast - unit tests only (tiny random-weight models)"

# uv is bootstrapped into .tools/ when it is not on PATH (plain pip here would pick a torch wheel
# that breaks torchvision; uv installs exactly what uv.lock says).
.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet uv

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked
	touch $@

setup: .venv/.synced

demo: setup
	$(PY) -m atomkit.cli assemble $$($(PY) -m atomkit.cli samples) --prompt "$(PROMPT)" --out $(OUT)

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not integration and not notebook"

clean:
	rm -rf $(OUT) .pytest_cache
