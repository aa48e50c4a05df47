#!/bin/sh
# tests/e2e/test_powercut_vm.py: power cuts.  One boot of the one-kernel
# VM per cut; the host kills qemu (SIGKILL) at a random moment after this
# script prints NBDLOOP-POWERCUT-ARMED.  In each mode at once:
# - a block writer (powercut-writer.py) on a fresh, fully written image
#   served by `nbdloop serve`, reporting each acknowledgement and flush;
#   the host checks the image after the cut;
# - ext4 on /dev/nbdN (`nbdloop attach`) with a writer of fsynced files,
#   each reported with its sha256 after its fsync; the next boot replays
#   the journal, runs fsck and checks every reported file.
# Everything is reported on the report port (report_port) as it happens.
# Arguments: BOOT (1, 2, ...), then `cut` (write until the power goes) or
# `last` (check and stop), then the host's list of files reported so far
# ("MODE NAME SHA256" lines).
here=$(dirname "$0")
# shellcheck source=/dev/null
. "$here/product-lib.sh"
BOOT=$1 WHAT=$2 FILES=$3
MODES="direct buffered"
BLOCK_SIZE=48M
FS_SIZE=96M

port=$(report_port) || fail "no virtio port named nbdloop.report"
exec 9> "$port" || fail "cannot open $port"
echo "BOOT $BOOT" >&9

# wait_for FILE WHY: until FILE exists; fail with WHY after a minute.
wait_for() {
    n=0
    while [ ! -e "$1" ]; do
        n=$((n + 1))
        [ "$n" -lt 600 ] || fail "$2"
        sleep 0.1
    done
}

# fs_writer MODE DIR: files of 1 B to 256 KiB, each fsynced then reported,
# until the power goes.
fs_writer() {
    i=0
    while :; do
        n=$(( $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') * 4 + 1 ))
        head -c "$n" /dev/urandom > "/tmp/w.$1"
        name=b$BOOT-w$i
        if ! dd if="/tmp/w.$1" of="$2/$name" bs=64k conv=fsync status=none 2> "/tmp/w.$1.err"; then
            echo "ERROR $1 fs writer: $name: $(cat "/tmp/w.$1.err")" >&9
            return 1
        fi
        echo "FILE $1 $name $(sha256sum < "/tmp/w.$1" | cut -d' ' -f1)" >&9
        [ "$i" -eq 0 ] && touch "/tmp/started.fs.$1"
        i=$((i + 1))
    done
}

# check_fs MODE DEV: the filesystem after a cut: the journal replayed by a
# mount, fsck clean, every file the host heard of intact.
check_fs() {
    step "check-fs-$1"
    must mount "$2" "/mnt/$1"
    must umount "/mnt/$1"
    e2fsck -fn "$2" > "/tmp/fsck.$1" 2>&1 || fail "fsck of $1 after the cut: $(tail -n 3 "/tmp/fsck.$1" | tr '\n' ' ')"
    must mount "$2" "/mnt/$1"
    grep "^$1 " "$FILES" | while read -r _ name sum; do
        echo "$sum  /mnt/$1/$name"
    done > "/tmp/sums.$1"
    if [ -s "/tmp/sums.$1" ]; then
        sha256sum -c --quiet "/tmp/sums.$1" > "/tmp/sums.$1.out" 2>&1 ||
            fail "fsynced files of $1 differ: $(head -n 3 "/tmp/sums.$1.out" | tr '\n' ' ')"
    fi
    echo "NBDLOOP-POWERCUT-VERIFIED: $1 $(wc -l < "/tmp/sums.$1") files"
}

for mode in $MODES; do
    mkdir -p "/mnt/$mode"
    fsimg=$NBDLOOP_DATA/fs-$mode.img
    step "attach-$mode"
    [ "$BOOT" -eq 1 ] && must nbdloop create --preallocate "$fsimg" "$FS_SIZE"
    dev=$(nbdloop attach "$fsimg" --mode "$mode") || fail "attach of $fsimg exited $?"
    eval "dev_$mode=$dev"
    if [ "$BOOT" -eq 1 ]; then
        must mkfs.ext4 -q -F "$dev"
        must mount "$dev" "/mnt/$mode"
    else
        check_fs "$mode" "$dev"
    fi
    rm -f "$NBDLOOP_DATA/cut-$((BOOT - 1))-$mode.img"
done

if [ "$WHAT" = last ]; then
    for mode in $MODES; do
        eval "dev=\$dev_$mode"
        must umount "/mnt/$mode"
        must e2fsck -fn "$dev"
        must nbdloop detach "$dev"
    done
    exit 0
fi

for mode in $MODES; do
    step "serve-$mode"
    img=$NBDLOOP_DATA/cut-$BOOT-$mode.img
    must nbdloop create --preallocate "$img" "$BLOCK_SIZE"
    nbdloop serve "$img" --mode "$mode" --socket "/run/cut-$mode.sock" \
        --pidfile "/run/cut-$mode.pid" > "/tmp/serve.$mode" 2>&1 &
done
for mode in $MODES; do
    wait_for "/run/cut-$mode.pid" "nbdloop serve of $mode did not start: $(tail -n 3 "/tmp/serve.$mode")"
done
# What the writers write into must be on the disk before the power can go.
sync
step writers
for mode in $MODES; do
    python3 "$here/powercut-writer.py" "$mode" "/run/cut-$mode.sock" 9 \
        "/tmp/started.block.$mode" > "/tmp/block.$mode" 2>&1 &
    fs_writer "$mode" "/mnt/$mode" &
done
for mode in $MODES; do
    for kind in block fs; do
        wait_for "/tmp/started.$kind.$mode" "the $kind writer of $mode did not start"
    done
done
echo "NBDLOOP-POWERCUT-ARMED"
sleep 120
fail "the power was not cut within 120 s: $(cat /tmp/block.direct /tmp/block.buffered)"
