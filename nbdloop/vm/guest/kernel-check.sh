#!/bin/sh
# nbdloop kernel check (busybox sh): a filesystem over the kernel NBD client.
#
# Run by the guest's /init (init.sh) as /nbdloop/script.sh; written by
# kernel_check_script() in nbdloop/vm/kernel_check.py, which puts every
# parameter in the payload as data ($NBDLOOP_PAYLOAD/kernel-check/):
#   params           NAME=value lines (values shell-quoted), sourced below:
#                    FSTYPE, DEVICE, SYSBLOCK, MOUNTPOINT, SERVER and
#                    EXPECT_CONNECTIONS (empty: do not count connections)
#   nbd-client.argv  the connect command, one argument a line
#   mkfs.argv        the mkfs command, device included, one argument a line
#   fsck.argv        the fsck command, device included, one argument a line
#   files            the files to write, one relative path a line; each is
#                    $NBDLOOP_PAYLOAD/<path> and goes to $MOUNTPOINT/<path>
#   expected.sha256  a `sha256sum -c` file of the files under $MOUNTPOINT
#
# Each step prints "NBDLOOP-STEP: <step>"; a failing step prints
# "NBDLOOP-STEP-FAILED: ...", writes the reason to $NBDLOOP_REASON and ends
# the script with status 1.
STEP=start
step() {
    STEP=$1
    echo "NBDLOOP-STEP: $1"
}
must() {
    "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "NBDLOOP-STEP-FAILED: $STEP: $* (exit $rc)"
        echo "step $STEP: $* exited with status $rc" > "$NBDLOOP_REASON"
        exit 1
    fi
}
fail() {
    echo "NBDLOOP-STEP-FAILED: $STEP: $*"
    echo "step $STEP: $*" > "$NBDLOOP_REASON"
    exit 1
}
# Run the command whose arguments are the lines of the file $1, with must.
must_argv() {
    [ -s "$1" ] || fail "no command in $1"
    argv_file=$1
    set --
    while IFS= read -r arg; do
        set -- "$@" "$arg"
    done < "$argv_file"
    must "$@"
}
drop_caches() {
    sync
    blockdev --flushbufs "$DEVICE"
    echo 3 > /proc/sys/vm/drop_caches
}

CHECK=$NBDLOOP_PAYLOAD/kernel-check
[ -f "$CHECK/params" ] || fail "no $CHECK/params in the payload"
# Made per run by kernel_check_script(), so there is nothing here to follow.
# shellcheck source=/dev/null
. "$CHECK/params"
must cp "$CHECK/expected.sha256" /tmp/expected.sha256

step connect
must_argv "$CHECK/nbd-client.argv"
size=$(cat "$SYSBLOCK/size")
[ "$size" -gt 0 ] || fail "$DEVICE has size $size after nbd-client"
echo "$DEVICE: $size sectors, logical block $(cat "$SYSBLOCK/queue/logical_block_size")," \
     "physical block $(cat "$SYSBLOCK/queue/physical_block_size")," \
     "timeout $(cat "$SYSBLOCK/queue/io_timeout") ms"
if [ -n "$EXPECT_CONNECTIONS" ]; then
    conns=$(netstat -tn | grep -c "$SERVER *ESTABLISHED")
    echo "$conns connection(s) to the server"
    [ "$conns" -eq "$EXPECT_CONNECTIONS" ] ||
        fail "$conns connections to the server, expected $EXPECT_CONNECTIONS"
fi

step mkfs
must_argv "$CHECK/mkfs.argv"

step mount
must mount -t "$FSTYPE" "$DEVICE" "$MOUNTPOINT"

step write
while IFS= read -r name; do
    case $name in
        */*) must mkdir -p "$MOUNTPOINT/${name%/*}" ;;
    esac
    must cp "$NBDLOOP_PAYLOAD/$name" "$MOUNTPOINT/$name"
done < "$CHECK/files"
must sync

step verify-written
must sha256sum -c /tmp/expected.sha256

step umount
must umount "$MOUNTPOINT"

step fsck
drop_caches
must_argv "$CHECK/fsck.argv"

step remount
drop_caches
must mount -t "$FSTYPE" "$DEVICE" "$MOUNTPOINT"

step verify-remounted
must sha256sum -c /tmp/expected.sha256

step umount-again
must umount "$MOUNTPOINT"

step disconnect
must nbd-client -d "$DEVICE"
tries=0
while [ "$(cat "$SYSBLOCK/size")" -ne 0 ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 50 ] && fail "$DEVICE still has size $(cat "$SYSBLOCK/size") after nbd-client -d"
    sleep 0.1
done
step "done"
