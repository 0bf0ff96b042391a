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
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# the temporary API server a flow starts waits 20 s by default: too short on a busy 2-core box
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export GLOG_v ?= 3

export MINDRLHF_REPO := $(CURDIR)
PREFECT_PORT ?= 4200
POOL := mindrlhf-local

.PHONY: demo test fetch setup clean ui deploy system-deps bench-peers soak mutants lint

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

# Debian's chromium renders the Prefect UI in the screenshot test (installed as root via apt).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }

test: fetch system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=12 tests

# Each tests/mutants/*.patch is a realistic bug: applied to a copy of the checkout, the tests it
# names must fail. Not part of make test (about 40 minutes); prints which test killed each mutant.
mutants: fetch
	$(BIN)/python tests/mutants/run.py

# The formatter and linter, configured in pyproject.toml; make test runs the check.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Reliability soak (not part of make test, ~10 min): 4 concurrent runs of one config, a stage killed
# with SIGKILL, 3 rounds; one id per stage, a clean store, no orphan processes (tests/soak.py).
soak: fetch
	$(BIN)/python tests/soak.py

# The Prefect server on 127.0.0.1 (SQLite under .prefect/) plus a worker serving the deployments.
# Open http://127.0.0.1:$(PREFECT_PORT) : Runs shows the flow runs (task timeline, streamed stage logs,
# summary artifacts); the asset materialization events with their upstream edges are in Event Feed.
# PREFECT_PORT moves both the server and the API address its UI calls. Ctrl-C stops the worker
# and the server (a shell's background jobs ignore SIGINT: they are sent SIGTERM, then SIGKILL).
ui: fetch
	@trap 'kill $$worker $$server 2>/dev/null; sleep 3; kill -9 $$worker $$server 2>/dev/null; exit 0' INT TERM; \
	  PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & server=$$!; \
	  until $(BIN)/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$(PREFECT_PORT)/api/health')" 2>/dev/null; do \
	    kill -0 $$server 2>/dev/null || exit 1; sleep 1; done; \
	  PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(MAKE) --no-print-directory deploy | grep -v -i -e "start a worker" -e "prefect worker start" -e "pulls work from"; \
	  PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect worker start --pool $(POOL) & worker=$$!; \
	  echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT) (a worker serves the deployments; Ctrl-C stops both)"; \
	  wait $$worker

# Register deployments/prefect.yaml against the server at PREFECT_API_URL (default: the local one).
deploy: fetch
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api} sh -c '\
	  $(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || $(BIN)/prefect work-pool create $(POOL) --type process; \
	  $(BIN)/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml'

# A separate venv with PyTorch (CPU) and TRL, the peers bench/ measures against.
bench-peers: .venv-bench/.installed
.venv-bench/.installed: bench/requirements-peers.txt
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements-peers.txt
	touch $@

clean:
	rm -rf artifacts .prefect
