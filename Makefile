# tagflow: `make demo` runs the main job, `make test` runs every test. Both build what they need first.
PYTHON ?= python3
VENV := .venv
MXVENV := .venv-mxnet
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.8
export UV_LINK_MODE := copy
# playwright (a dev dependency) drives Debian's chromium; it must never download a browser of its own
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: demo test up down venvs browser lint lock s3-start s3-stop clean-state bench

demo: venvs
	$(VENV)/bin/tagflow demo

test: venvs browser
	$(VENV)/bin/python -m pytest

# Debian's chromium for tests/test_browser.py, from apt when it is missing (CI runs as root on a clean machine).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v chromium >/dev/null || { echo "chromium is missing: install Debian's chromium package (apt-get install chromium)" >&2; exit 1; }

# Airflow's UI (standalone), the local S3 server and the local endpoint; `make up PORT=8090` picks the UI's port.
up: venvs
	$(VENV)/bin/python -m tagflow.local.stack up $(if $(PORT),--port $(PORT))

# Stops them by PID; needs the venv, not a rebuilt one.
down: | $(VENV)/.installed
	$(VENV)/bin/python -m tagflow.local.stack down

venvs: $(VENV)/.installed $(MXVENV)/.installed

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# The Airflow environment: the lock, the dev tools and tagflow itself (editable).
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml | $(UV)
	$(UV) pip install --quiet --python $(VENV)/bin/python -r requirements.txt -r requirements-dev.txt
	$(UV) pip install --quiet --python $(VENV)/bin/python --no-deps -e .
	touch $@

# The algorithm environment: MXNet 1.9.1 needs numpy 1.23.5, so it never shares a venv with Airflow.
$(MXVENV)/.installed: requirements-mxnet.txt | $(UV)
	test -x $(MXVENV)/bin/python || $(UV) venv --quiet --python $(PYTHON) $(MXVENV)
	$(UV) pip install --quiet --python $(MXVENV)/bin/python -r requirements-mxnet.txt
	touch $@

lint: venvs
	$(VENV)/bin/ruff check include plugins dags tests bench algo
	$(VENV)/bin/ruff format --check include plugins dags tests bench algo

# Regenerate the three locks from their .in files (needs the package registry).
lock: | $(UV)
	$(UV) pip compile --quiet --python-version 3.11 --generate-hashes requirements.in -o requirements.txt
	$(UV) pip compile --quiet --python-version 3.11 --generate-hashes requirements-dev.in -o requirements-dev.txt
	$(UV) pip compile --quiet --python-version 3.11 --generate-hashes requirements-mxnet.in -o requirements-mxnet.txt

s3-start: venvs
	$(VENV)/bin/tagflow s3 start

s3-stop: venvs
	$(VENV)/bin/tagflow s3 stop
