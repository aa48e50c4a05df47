#!/bin/sh
# tests/e2e/test_recover_vm.py: a device that outlives its server.  In the
# one-kernel VM: ext4 on /dev/nbdN, a writer writing and fsyncing files with
# known checksums in a loop, and the server killed with SIGKILL at random
# moments (every other time the daemon first, so that the next daemon, which
# the next command starts, finds the server dead), in both modes, with one
# and two connections; then `nbdloop restart` under the same load.  The writer
# must see no error, the filesystem must stay read-write, the kernel log
# must have no I/O error, fsck must be clean and every fsynced file intact.
# Then a server that cannot come back (its image has gone): the device fails
# the writer's I/O with EIO within the recovery timeout, nothing hangs, list
# says stale and why.
# And a reconfigure for the wrong device is refused.
# Arguments: KILLS (per mode and connection count).  Images go in $NBDLOOP_DATA.
here=$(dirname "$0")
# shellcheck source=/dev/null
. "$here/product-lib.sh"
KILLS=${1:-5}
TIMEOUT=4            # the request timeout: how long a request the dead server read waits
STATE=/run/nbdloop/attached

# field DEV NAME: a number from the device's record (one key a line).
field() {
    sed -n "s/^ *\"$2\": \([0-9.-]*\),\{0,1\}$/\1/p" "$STATE/${1#/dev/}.json" | tail -n 1
}
state() { sed -n 's/^  "state": "\(.*\)",$/\1/p' "$STATE/${1#/dev/}.json"; }

wait_recovered() {
    # wait_recovered DEV COUNT: until the record counts COUNT recoveries and is attached
    n=0
    while [ "$(field "$1" recoveries)" != "$2" ] || [ "$(state "$1")" != attached ]; do
        n=$((n + 1))
        [ "$n" -lt 600 ] || fail "no recovery $2 of $1 within 120 s: $(state "$1")"
        sleep 0.2
    done
}

survive() {
    # survive MODE CONNECTIONS: kills and a restart under a writer
    mode=$1 conns=$2
    img=$NBDLOOP_DATA/kill-$mode-$conns.img
    step "$mode-$conns-attach"
    dmesg -C
    must nbdloop create "$img" 128M
    dev=$(nbdloop attach "$img" --mode "$mode" --connections "$conns" --timeout "$TIMEOUT") ||
        fail "attach exited $?"
    must mkfs.ext4 -q -F "$dev"
    must mount "$dev" /mnt/a
    rm -f /tmp/stop /tmp/sums
    writer /mnt/a /tmp/sums /tmp/stop > /tmp/writer.out 2>&1 &
    wpid=$!
    # A failed step must not leave the writer writing into the next scenario.
    trap 'kill "$wpid" 2> /dev/null; wait "$wpid" 2> /dev/null' EXIT
    k=0
    while [ "$k" -lt "$KILLS" ]; do
        sleep "$(random_ms 300 2500)"
        pid=$(field "$dev" server_pid)
        if [ $((k % 2)) -eq 0 ]; then who=nbdkit; else who=both; fi
        step "$mode-$conns-kill-$k-$who"
        kill -0 "$wpid" 2> /dev/null || fail "the writer stopped: $(cat /tmp/writer.out)"
        if [ "$who" = both ]; then
            must kill -9 "$(pgrep -f 'nbdloop.cli.main daemon')"
            must kill -9 "$pid"
            sleep 0.5
            nbdloop list > /dev/null || fail "list exited $? with no daemon running"
        else
            must kill -9 "$pid"
        fi
        k=$((k + 1))
        wait_recovered "$dev" "$k"
        echo "NBDLOOP-RECOVERY: $mode $conns $who $(field "$dev" seconds)"
    done
    step "$mode-$conns-restart"
    sleep 1
    before=$(field "$dev" server_pid)
    nbdloop restart "$dev" > /tmp/restart.out 2>&1 || fail "restart exited $?: $(cat /tmp/restart.out)"
    echo "restart: $(cat /tmp/restart.out)"
    after=$(field "$dev" server_pid)
    [ "$after" != "$before" ] || fail "restart kept server pid $before"
    grep -q "server pid $before -> $after" /tmp/restart.out || fail "restart did not say the new pid"
    echo "NBDLOOP-RESTART: $mode $conns $(field "$dev" seconds)"
    sleep 2
    step "$mode-$conns-check"
    touch /tmp/stop
    wait "$wpid" || fail "the writer failed: $(cat /tmp/writer.out)"
    cat /tmp/writer.out
    grep -q "^$dev /mnt/a ext4 rw," /proc/mounts || fail "$dev is no longer mounted read-write"
    kernel_log_clean "$dev"
    must umount /mnt/a
    must e2fsck -fn "$dev"
    must mount "$dev" /mnt/a
    verify /mnt/a /tmp/sums || fail "fsynced files differ"
    echo "verified $(wc -l < /tmp/sums) files"
    must umount /mnt/a
    must nbdloop detach "$dev"
}

gone_for_good() {
    img=$NBDLOOP_DATA/gone.img
    step gone-attach
    must nbdloop create "$img" 64M
    dev=$(nbdloop attach "$img" --timeout "$TIMEOUT" --recover-timeout 8) || fail "attach exited $?"
    must mkfs.ext4 -q -F "$dev"
    must mount "$dev" /mnt/a
    rm -f /tmp/stop /tmp/sums
    writer /mnt/a /tmp/sums /tmp/stop > /tmp/writer.out 2>&1 &
    wpid=$!
    # A failed step must not leave the writer writing into the next scenario.
    trap 'kill "$wpid" 2> /dev/null; wait "$wpid" 2> /dev/null' EXIT
    sleep 2
    step gone-kill
    must mv "$img" "$img.away"
    must kill -9 "$(field "$dev" server_pid)"
    n=0
    while kill -0 "$wpid" 2> /dev/null; do
        n=$((n + 1))
        [ "$n" -lt 120 ] || fail "the writer still runs 60 s after the server went"
        sleep 0.5
    done
    wait "$wpid" && fail "the writer saw no error"
    echo "writer: $(cat /tmp/writer.out)"
    # ext4 passes the device's EIO to the writer, unless its journal hit the
    # error first: then it goes read-only and the writer's fsync says EROFS.
    # Either way the device must have failed the writes with EIO, and must
    # fail the next request with EIO at once.
    grep -q -e "Input/output error" -e "Read-only file system" /tmp/writer.out ||
        fail "the writer's error is neither EIO nor EROFS: $(cat /tmp/writer.out)"
    dmesg | grep -q "I/O error, dev ${dev#/dev/}," || fail "the kernel logged no I/O error on $dev"
    if timeout 20 dd if="$dev" of=/dev/null bs=4096 count=1 iflag=direct 2> /tmp/read.err; then
        fail "a read of $dev succeeded with the server gone"
    fi
    grep -q "Input/output error" /tmp/read.err || fail "a read of $dev failed with: $(cat /tmp/read.err)"
    nbdloop list
    nbdloop list --json > /tmp/list.json
    grep -q '"state": "stale"' /tmp/list.json || fail "list does not show $dev as stale"
    grep -q '"reason": ".*no server within 8 s' /tmp/list.json ||
        fail "list does not say why: $(grep reason /tmp/list.json)"
    step gone-detach
    umount /mnt/a
    nbdloop detach "$dev" || fail "detach of the stale device exited $?"
    [ -e "/sys/block/${dev#/dev/}/pid" ] && fail "$dev is still connected"
    return 0
}

wrong_device() {
    step wrong-attach
    must nbdloop create "$NBDLOOP_DATA/w1.img" 16M
    must nbdloop create "$NBDLOOP_DATA/w2.img" 16M
    one=$(nbdloop attach "$NBDLOOP_DATA/w1.img") || fail "attach w1 exited $?"
    two=$(nbdloop attach "$NBDLOOP_DATA/w2.img") || fail "attach w2 exited $?"
    step wrong-reconfigure
    python3 "$here/reconfigure.py" "$STATE/${two#/dev/}.json" "${one#/dev/nbd}" ||
        fail "a connection for $two was handed to $one"
    step wrong-still-works
    must dd if="$one" of=/dev/null bs=4096 count=16 iflag=direct status=none
    must dd if="$two" of=/dev/null bs=4096 count=16 iflag=direct status=none
    must nbdloop detach "$one"
    must nbdloop detach "$two"
}

for combo in "direct 1" "direct 2" "buffered 1" "buffered 2"; do
    # shellcheck disable=SC2086 # two words
    set -- $combo
    scenario "survive-$1-$2" survive "$1" "$2"
done
scenario wrong-device wrong_device
scenario gone-for-good gone_for_good
[ "$FAILED" -eq 0 ] || fail "$FAILED scenario(s) failed"
