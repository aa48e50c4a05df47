#!/bin/bash
# The demo behind `make demo`: what a user runs (scripts/demo-steps.sh:
# create -> attach -> mkfs -> mount -> write -> list -> umount -> detach ->
# fsck, in both modes, and the two modes side by side).  With an NBD driver
# in this kernel it runs here; without one (this project's usual host), in
# a VM that boots this machine's own root with a kernel that has it.
set -euo pipefail
cd "$(dirname "$0")/.."
# make puts the sbin directories on PATH (Makefile); the venv comes first.
export PATH="$PWD/.venv/bin:$PATH"

if [ -b /dev/nbd0 ] && command -v nbd-client >/dev/null; then
    dir=${NBDLOOP_DEMO_DIR:-$PWD/demo}
    mkdir -p "$dir"
    exec sh scripts/demo-steps.sh "$dir"
fi
echo "demo: this kernel has no NBD driver, so the same steps run in a VM that boots this machine's own root (nbdloop vm-run)"
exec nbdloop vm-run scripts/demo-steps.sh
