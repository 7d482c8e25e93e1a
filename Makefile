# radfed developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := orthanc orthanc-python orthanc-dicomweb orthanc-postgresql dcmtk iproute2 openssl openssh-client chromium postgresql
STAMPS := .cache/stamps
# The ONNX runtime of this venv: cpu (onnxruntime; what CI uses) or gpu (onnxruntime-gpu, CUDA and cuDNN from NVIDIA's
# wheels, only the driver from the host; PyPI's Linux torch wheel is its CUDA build). Never both: they install the same
# module, and the CPU one's files make the node run on the CPU. `RADFED_RUNTIME=gpu make install`.
RADFED_RUNTIME ?= cpu
ifeq ($(filter $(RADFED_RUNTIME),cpu gpu),)
$(error RADFED_RUNTIME must be cpu or gpu, not '$(RADFED_RUNTIME)')
endif
DEV_EXTRA_cpu := dev
DEV_EXTRA_gpu := dev-gpu
OTHER_RUNTIME_cpu := onnxruntime-gpu
OTHER_RUNTIME_gpu := onnxruntime

.PHONY: install install-system install-python install-node install-ohif lint typecheck imports extras unit test test-fast bench demo clean wheel

OHIF_VERSION := 3.13.2
install: install-system install-python install-node install-ohif

# Debian packages: Orthanc (the real PACS in tests), its Python and DICOMweb plugins, DCMTK (DIMSE peer),
# Chromium (the viewer and report tests drive it headless through Playwright; never a downloaded browser), PostgreSQL
# (the ledger tests start their own server on a loopback port; the Debian package also creates the postgres user).
install-system: $(STAMPS)/apt
$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@touch $@

# One venv in the repository; editable install in strict mode (only packaged files are importable). Switching the
# runtime removes both packages first (uninstalling one deletes files the other shares).
install-python: $(STAMPS)/python-$(RADFED_RUNTIME)
$(STAMPS)/python-$(RADFED_RUNTIME): pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PIP) show -q $(OTHER_RUNTIME_$(RADFED_RUNTIME)) >/dev/null 2>&1; then \
	  $(PIP) uninstall -y -q onnxruntime onnxruntime-gpu; fi
	$(PIP) install -q -e '.[$(DEV_EXTRA_$(RADFED_RUNTIME))]' --config-settings editable_mode=strict
	@rm -f $(STAMPS)/python-* && touch $@

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
	$(VENV)/bin/mypy -p radfed.inference -p radfed.dicom_sr -p radfed.federation -p radfed.plugin -p bench

imports: install-python
	$(VENV)/bin/lint-imports

# The runtime extras as pip resolves them from PyPI (gpu brings onnxruntime-gpu and never onnxruntime): outside the
# network namespace, since the resolver needs PyPI; dry runs, nothing is downloaded but metadata.
extras: install-python
	$(PY) -m pytest -q tests/test_install_extras.py

# The suite runs inside a private network namespace: every server the tests start (Orthanc binds all
# interfaces) is reachable on loopback only. Where unshare is refused, the run says so and goes on.
PYTEST_ARGS ?=
unit: install
	@bash .ci/isolated $(PY) -m pytest $(PYTEST_ARGS)

test: install lint typecheck imports extras unit

# The tests that need no Orthanc, Flower federation, browser or DICOM validator (markers in pyproject.toml).
FAST_MARKERS := not orthanc and not flower and not browser and not validators
test-fast: install-python
	@bash .ci/isolated $(PY) -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

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
