# The two commands a newcomer runs on a fresh machine:
#   make run    - the main job, offline, on the default CPU spec: a small sweep (MiniLM-L6 -> 3
#                 layers, RTE), live trials table, best trial at the end; tables in
#                 results/rte-cpu-quick (git-ignored: the checkout stays clean)
#   make test   - the test suite
# One distillation is one command away: make run-one (tables in results/rte-cpu-run).
# Both create .venv and install what they need first (torch pinned to the CPU build on this kind
# of machine). Every kdray command runs with the offline/loopback variables below.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPEC ?= search_spaces/rte-cpu.yaml
TORCH ?= torch==2.13.0
# GLUE in the download_glue_data.py layout; default: ../shared/glue beside the checkout.
KDRAY_GLUE_DIR ?= $(abspath ../shared/glue)

# Offline and loopback only: no hub downloads, no telemetry, Ray bound to 127.0.0.1, any
# non-local HTTP(S) sent to a closed loopback port. Set only for kdray/pytest, never for pip.
OFFLINE := env HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
	HF_HUB_DISABLE_TELEMETRY=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
	HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
	http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 \
	NO_PROXY=127.0.0.1,localhost,::1 no_proxy=127.0.0.1,localhost,::1 \
	KDRAY_GLUE_DIR=$(KDRAY_GLUE_DIR)

.PHONY: install lock run run-one test sweep lint bench clean

install: $(VENV)/.installed

# Installs the versions in constraints.txt (the lock: what the tests last passed with), so a
# newcomer and CI get what was tested; pyproject.toml's ranges stay open for other installs.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	touch $@

# Refresh the lock on purpose: the newest releases within pyproject.toml's ranges, in a fresh
# venv; then make test (CI of the commit that changes constraints.txt is the proof).
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[test,bench]"
	{ sed -n '1,/^[^#]/{/^#/p}' constraints.txt; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^kdray' | sed 's/+cpu$$//'; \
	} > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

# A small sweep of about 10 minutes on 2 cores, teacher included: the CPU spec's search
# block, 6 trials on the first 1,000 RTE training rows (ASHA prunes the weak ones).
QUICK := --set tune.num_samples=6 --set train.max_train_examples=1000
# A git-ignored folder: make run never touches the committed results/rte-cpu.
RUN_OUT ?= results/rte-cpu-quick

run: install
	$(OFFLINE) $(VENV)/bin/kdray sweep $(SPEC) $(QUICK) --out $(RUN_OUT) --overwrite

run-one: install
	$(OFFLINE) $(VENV)/bin/kdray run $(SPEC) --out results/rte-cpu-run --overwrite

sweep: install
	$(OFFLINE) $(VENV)/bin/kdray sweep $(SPEC)

test: install
	$(OFFLINE) $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check kdray tests benchmarks conftest.py results/rederive.py
	$(VENV)/bin/ruff format --check kdray tests benchmarks conftest.py results/rederive.py

clean:
	rm -rf $(VENV) .pytest_cache
