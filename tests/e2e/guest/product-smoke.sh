#!/bin/sh
# tests/e2e/test_product_vm.py: the product VM (nbdloop.vm.run_product) is
# the host's own root, read-only under a tmpfs overlay, with the devices,
# modules and privileges the product needs. Run by the host's /bin/sh in
# the guest, in $NBDLOOP_DATA.
#
# Arguments: HOST_FILE HIDDEN_FILE ARG3
#   HOST_FILE    a file the host test made (outside /tmp) before booting
#   HIDDEN_FILE  a file the host test made under /tmp: the guest's fresh
#                /tmp hides it
#   ARG3         an argument with shell syntax in it, passed as data
# Environment: HOST_CONTENT (HOST_FILE's first line), PYTHON (the host
# test's interpreter: the venv's python), ARG3_EXPECTED (what ARG3 must be).
fail() { echo "$*" > "$NBDLOOP_REASON"; exit 1; }
step() { echo "NBDLOOP-STEP: $1"; }

# The fstype of the mount at $1 in /proc/mounts (the last one wins).
fstype() {
    found=
    while read -r _ mnt type _; do
        [ "$mnt" = "$1" ] && found=$type
    done < /proc/mounts
    echo "$found"
}

echo "product-smoke: this line is on stderr" >&2
[ "$#" -eq 3 ] || fail "expected 3 arguments, got $#"
[ "$3" = "$ARG3_EXPECTED" ] || fail "argument 3 is '$3', not '$ARG3_EXPECTED'"
[ -e /pwned ] && fail "an argument ran as code"
step args

[ "$(fstype /)" = overlay ] || fail "/ is $(fstype /), not an overlay"
grep -q ' / overlay .*lowerdir=/ro' /proc/mounts || fail "/ is not the overlay over /ro"
[ -f "$0" ] || fail "the script's own path $0 is not there"
read -r got < "$1" || fail "cannot read the host's file $1"
[ "$got" = "$HOST_CONTENT" ] || fail "the host's file $1 holds '$got', not '$HOST_CONTENT'"
[ -e "$2" ] && fail "the host's $2 shows through the guest's /tmp"
# A directory under the host's /tmp that run_product was asked to share
# (as it shares a checkout that CI cloned under /tmp) is there, read-only.
read -r got < "$SHARED_FILE" || fail "the shared $SHARED_FILE is not there"
[ "$got" = "$HOST_CONTENT" ] || fail "the shared $SHARED_FILE holds '$got'"
touch "${SHARED_FILE%/*}/new" 2> /dev/null && fail "the shared directory is writable"
step host-root

echo "written in the guest" > /nbdloop-smoke-written || fail "cannot write to /"
echo "changed in the guest" > "$1" || fail "cannot write over the host's file $1"
read -r got < "$1"
[ "$got" = "changed in the guest" ] || fail "a write over $1 did not stick in the overlay"
step overlay-writes

for dir in /run /tmp /dev/shm; do
    [ "$(fstype "$dir")" = tmpfs ] || fail "$dir is $(fstype "$dir"), not tmpfs"
done
[ -z "$(ls -A /run/nbdloop 2>/dev/null)" ] || fail "the host's /run/nbdloop shows through"
step tmpfs

[ "$(fstype "$NBDLOOP_DATA")" = ext4 ] || fail "$NBDLOOP_DATA is $(fstype "$NBDLOOP_DATA"), not ext4"
[ "$(pwd)" = "$NBDLOOP_DATA" ] || fail "cwd is $(pwd), not $NBDLOOP_DATA"
dd if=/dev/zero of=direct.bin bs=4096 count=64 oflag=direct 2>/dev/null \
    || fail "dd oflag=direct on $NBDLOOP_DATA failed"
dd if=direct.bin of=/dev/null bs=4096 iflag=direct 2>/dev/null \
    || fail "dd iflag=direct on $NBDLOOP_DATA failed"
echo "written to the data disk" > marker || fail "cannot write to $NBDLOOP_DATA"
step data-disk

i=0
# Loaded with nbds_max=8: the daemon makes more on demand.
while [ "$i" -lt 8 ]; do
    [ -e "/sys/block/nbd$i" ] || fail "no /sys/block/nbd$i"
    [ -b "/dev/nbd$i" ] || fail "no block device /dev/nbd$i"
    i=$((i + 1))
done
[ -e /sys/block/nbd8 ] && fail "more than 8 nbd devices"
# Loaded with max_part=8, which nbd rounds up to 2^n - 1: 15, 16 minors a device.
read -r max_part < /sys/module/nbd/parameters/max_part
[ "$max_part" = 15 ] || fail "nbd max_part is $max_part, not 15 (max_part=8 rounded up)"
read -r dev < /sys/block/nbd1/dev
[ "$dev" = 43:16 ] || fail "nbd1 is $dev, not 43:16 (16 minors a device)"
step nbd

for dev in /sys/class/net/*; do
    [ "${dev##*/}" = lo ] || fail "a network device besides lo: ${dev##*/}"
done
step no-network

# $(cat): sysctl files answer only a read at offset 0, and sh's read reads a byte at a time.
last_cap=$(cat /proc/sys/kernel/cap_last_cap)
want=$(printf '%016x' $(( (1 << (last_cap + 1)) - 1 )))
cap=$(grep '^CapEff:' /proc/self/status) || fail "no CapEff in /proc/self/status"
cap=${cap#CapEff:}
cap=$(echo "$cap" | tr -d '[:space:]')
[ "$cap" = "$want" ] || [ "$cap" = ffffffffffffffff ] \
    || fail "CapEff is $cap, not $want (cap_last_cap $last_cap)"
[ "$(id -u)" = 0 ] || fail "not root"
step capabilities

/usr/bin/python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || fail "/usr/bin/python3 is not Python 3.11"
"$PYTHON" -c 'import nbdloop.engine.uring' \
    || fail "$PYTHON cannot import nbdloop.engine.uring"
nbdloop --help > /tmp/help.txt || fail "nbdloop --help failed"
grep -q attach /tmp/help.txt || fail "nbdloop --help does not list attach"
nbdkit --version || fail "nbdkit --version failed"
command -v nbd-client > /dev/null || fail "no nbd-client on PATH"
step product

step all-checked
