# radfed developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := orthanc orthanc-python orthanc-dicomweb dcmtk iproute2 openssl openssh-client chromium
STAMPS := .cache/stamps

.PHONY: install install-system install-python install-node install-ohif lint typecheck imports unit test bench demo clean wheel

OHIF_VERSION := 3.13.2
install: install-system install-python install-node install-ohif

# Debian packages: Orthanc (the real PACS in tests), its Python and DICOMweb plugins, DCMTK (DIMSE peer),
# Chromium (the viewer and report tests drive it headless through Playwright; never a downloaded browser).
install-system: $(STAMPS)/apt
$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@touch $@

# One venv in the repository; editable install in strict mode (only packaged files are importable).
install-python: $(STAMPS)/python
$(STAMPS)/python: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]' --config-settings editable_mode=strict
	@touch $@

# OHIF's SEG parser (@cornerstonejs/adapters) for the contract tests, from the committed lockfile.
install-node: $(STAMPS)/node
$(STAMPS)/node: tests/node/package-lock.json
	@mkdir -p $(STAMPS)
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm; }
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The prebuilt OHIF viewer (npm @ohif/app, pinned; npm checks its integrity), for radfed viewer and the viewer tests.
install-ohif: .cache/ohif/$(OHIF_VERSION)/dist/index.html
.cache/ohif/$(OHIF_VERSION)/dist/index.html: deploy/ohif/fetch-ohif.sh
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm; }
	bash deploy/ohif/fetch-ohif.sh $(OHIF_VERSION) .cache/ohif/$(OHIF_VERSION)

lint: install-python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-python
	$(VENV)/bin/mypy -p radfed.inference -p radfed.dicom_sr -p radfed.federation -p radfed.plugin

imports: install-python
	$(VENV)/bin/lint-imports

# The suite runs inside a private network namespace: every server the tests start (Orthanc binds all
# interfaces) is reachable on loopback only. Where unshare is refused, the run says so and goes on.
PYTEST_ARGS ?=
unit: install
	@bash .ci/isolated $(PY) -m pytest $(PYTEST_ARGS)

test: install lint typecheck imports unit

bench: install
	@bash .ci/isolated $(PY) -m bench

# The main job: three hospitals, a federated job, rollout, AI results in Orthanc, a report (radfed-demo/report).
# DEMO_ARGS lets CI run a reduced demo, e.g. DEMO_ARGS="--studies-per-site 4 --rounds 2".
demo: install
	bash .ci/isolated $(VENV)/bin/radfed demo $(DEMO_ARGS)

# The product: the wheel (code, deploy/ as radfed.deploy, task specs) in build/dist, then what it carries and
# finds from itself checked by tests/test_wheel.py (which builds its own copy from the sources).
wheel: install-python
	rm -rf build/dist
	$(PIP) wheel -q --no-deps --no-build-isolation -w build/dist .
	$(PY) -m pytest -q tests/test_wheel.py

clean:
	rm -rf build .cache .pytest_cache .mypy_cache .ruff_cache *.egg-info
