#!/bin/bash
# The demo behind `make demo`: make an image, serve it in direct mode, and put
# a filesystem on it through the real kernel.  With /dev/nbd0 the kernel's
# own NBD client attaches it; without (this project's usual host), a small VM
# runs the kernel NBD client against the same server.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

DEMO_DIR=${NBDLOOP_DEMO_DIR:-$PWD/demo}
IMAGE=$DEMO_DIR/demo.img
SIZE=${NBDLOOP_DEMO_SIZE:-1G}
mkdir -p "$DEMO_DIR"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "create a sparse $SIZE image"
if [ -e "$IMAGE" ]; then
    nbdloop create --force "$IMAGE" "$SIZE"
else
    nbdloop create "$IMAGE" "$SIZE"
fi

if [ -b /dev/nbd0 ] && command -v nbd-client >/dev/null; then
    step "attach it with the kernel NBD client (nbdloop attach)"
    dev=$(nbdloop attach "$IMAGE")
    trap 'nbdloop detach "$dev" || true' EXIT
    nbdloop list
    step "mkfs, mount, write, fsck on $dev"
    mkfs.ext4 -q "$dev"
    mnt=$(mktemp -d)
    mount "$dev" "$mnt"
    head -c 64M /dev/urandom > "$mnt/data"
    sha=$(sha256sum < "$mnt/data")
    umount "$mnt"
    e2fsck -fn "$dev"
    mount "$dev" "$mnt"
    [ "$(sha256sum < "$mnt/data")" = "$sha" ] && echo "data intact after remount"
    umount "$mnt"
    nbdloop detach "$dev"
    trap - EXIT
else
    step "no /dev/nbd0 here: running the kernel NBD client in a VM (nbdloop vm-check)"
    nbdloop vm-check "$IMAGE" --fstype ext4
fi

step "the image on the host: e2fsck -fn $IMAGE"
e2fsck -fn "$IMAGE"
step "done: $IMAGE holds a clean ext4 filesystem"
