#!/bin/sh
# tests/e2e/test_kernel.py: the kernel creates /sys/block/nbd0/pid on connect
# and removes it on disconnect (attach and list read it as "connected").
#
# Payload ($NBDLOOP_PAYLOAD): nbd-client.argv, the connect command, one
# argument a line.
fail() { echo "$*" > "$NBDLOOP_REASON"; exit 1; }
connect() {
    set --
    while IFS= read -r arg; do
        set -- "$@" "$arg"
    done < "$NBDLOOP_PAYLOAD/nbd-client.argv"
    "$@"
}
if [ ! -e /sys/block/nbd0 ] || [ ! -e /sys/block/nbd1 ]; then
    fail "no nbd0 and nbd1 in sysfs"
fi
[ -e /sys/block/nbd0/pid ] && fail "nbd0 has a pid file before nbd-client"
connect || fail "nbd-client failed"
[ -e /sys/block/nbd0/pid ] || fail "no /sys/block/nbd0/pid while connected"
[ -e /sys/block/nbd1/pid ] && fail "nbd1 has a pid file but was never connected"
nbd-client -d /dev/nbd0 || fail "nbd-client -d failed"
tries=0
while [ -e /sys/block/nbd0/pid ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 50 ] && fail "/sys/block/nbd0/pid still there after nbd-client -d"
    sleep 0.1
done
echo "pid file: present while connected, gone after disconnect"
