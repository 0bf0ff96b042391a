# Two commands are the contract: `make demo` and `make test`. Each does all set-up on a fresh
# machine: a .venv from pinned requirements, the project installed into it, and the pinned
# registry inputs fetched and sha256-checked into .cache/ (kept between runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MINDRLHF_CACHE ?= $(CURDIR)/.cache
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_API_HOST ?= 127.0.0.1
export GLOG_v ?= 3

.PHONY: demo test fetch setup clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

fetch: $(STAMP)
	$(BIN)/python -m mindrlhf.data.registry

demo: fetch
	$(BIN)/python -m flows.pipeline demo

test: fetch
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf artifacts .prefect
