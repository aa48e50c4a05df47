# nbdloop: two commands do everything on a fresh Debian 12 machine, as root.
#   make demo   serve a demo image and put a filesystem on it through the kernel
#   make test   the whole test suite
# Each installs whatever is missing first (scripts/setup.sh).

SHELL := /bin/bash
VENV := $(CURDIR)/.venv
# Debian's python3 (the one nbdkit embeds) and our venv come first, whatever
# other python3 the machine has on PATH.
export PATH := $(VENV)/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PYTEST_ARGS ?=

.PHONY: all setup demo test test-fast install bench clean

all: setup

setup:
	@./scripts/setup.sh

demo: setup
	@./scripts/demo.sh

test: setup
	NBDLOOP_STRICT=1 $(VENV)/bin/python -m pytest -ra --durations=25 $(PYTEST_ARGS)

# Everything except the slow tests, for a quick check while editing.
test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# nbdloop on PATH, man pages, bash completion, the systemd unit (PREFIX=/usr/local).
install: setup
	@./scripts/install.sh

# The quick preset: direct mode against qemu-nbd and nbdkit's null plugin
# (the floor for server CPU per GiB), 3 interleaved rounds.
BENCH_ARGS ?= --quick --modes direct --peers qemu-nbd,nbdkit-null --rounds 3 --runtime 5 \
	--footprint 0
bench: setup
	$(VENV)/bin/nbdloop bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info nbdloop/engine/_uring*.so nbdloop/engine/_uring.c .pytest_cache
