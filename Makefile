# vfnic: setup, tests and tools. Stamps keep a repeated `make test` from redoing setup.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := $(or $(VFNIC_CACHE),$(CURDIR)/.vfnic)
export VFNIC_CACHE := $(CACHE)

VENV_STAMP := $(VENV)/.vfnic-installed
# Written by the setup scripts themselves, so a deleted cache is noticed.
QEMU_STAMP := $(CACHE)/qemu-kind
GUEST_STAMP := $(CACHE)/guest-root/.complete

.PHONY: setup test lint demo bench clean distclean

HOST_STAMP := $(CACHE)/.host-packages

setup: $(HOST_STAMP) $(VENV_STAMP) $(QEMU_STAMP) $(GUEST_STAMP)
	@# Cheap when current: the image is rebuilt only when its content hash changed.
	$(PY) -m vfnic.host.image

$(HOST_STAMP): scripts/host-packages.sh
	bash scripts/host-packages.sh
	mkdir -p $(CACHE) && touch $@

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(QEMU_STAMP): scripts/setup-qemu.sh
	sh scripts/setup-qemu.sh

$(GUEST_STAMP): scripts/build-guest.sh
	sh scripts/build-guest.sh
	touch $@

test: setup
	$(PY) -m pytest -q

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy vfnic
	$(VENV)/bin/lint-imports

demo: setup
	sh scripts/demo.sh

bench: setup
	$(PY) -m vfnic.bench

# Build products and tool caches; the QEMU runtime and guest root stay cached.
clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info \
		.import_linter_cache .grimp_cache
	rm -f $(CACHE)/guest.img $(CACHE)/guest.img.stamp $(CACHE)/guest.img.tmp
	find vfnic tests scripts -name __pycache__ -type d -prune -exec rm -rf {} +

# Everything, including the venv and the cached QEMU and guest roots.
distclean: clean
	rm -rf $(VENV) $(CACHE)
