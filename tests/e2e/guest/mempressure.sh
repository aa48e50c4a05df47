#!/bin/sh
# tests/e2e/test_attach_vm.py: memory pressure on one host.  In a guest with
# little memory and no swap, write CHUNK REPEAT times (several times the
# guest's memory) with fsync through ext4 on /dev/nbdN served by nbdloop on
# the same kernel, in each MODE, into $NBDLOOP_DATA/pressure-MODE.img.  The
# host then checks those images, at its own speed: fsck and the checksum.
# The server runs with --mlock and a stats file, and its workers are shown
# to carry PR_SET_IO_FLUSHER (the kernel's task flags and the engine's own
# PR_GET_IO_FLUSHER count).
# Arguments: CHUNK (a file on the host, seen through the 9p root), REPEAT
# (how many times it is written), then the modes.
here=$(dirname "$0")
# shellcheck source=/dev/null
. "$here/product-lib.sh"
chunk=$1 repeat=$2
shift 2
PF_MEMALLOC_NOIO=524288      # 0x00080000
PF_LOCAL_THROTTLE=1048576    # 0x00100000

flushers() {
    # flushers PID: how many of PID's threads carry both I/O-flusher flags
    n=0
    for stat in /proc/"$1"/task/*/stat; do
        flags=$(sed 's/.*) //' "$stat" | cut -d' ' -f7)
        [ $((flags & PF_MEMALLOC_NOIO)) -ne 0 ] && [ $((flags & PF_LOCAL_THROTTLE)) -ne 0 ] &&
            n=$((n + 1))
    done
    echo "$n"
}

pressure() {
    mode=$1
    img=$NBDLOOP_DATA/pressure-$mode.img
    stats=/tmp/stats-$mode.json
    step "$mode-attach"
    must nbdloop create "$img" 2G
    dev=$(nbdloop attach "$img" --mode "$mode" --mlock --stats-file "$stats") ||
        fail "attach exited $?"
    spid=$(nbdloop list --json | python3 -c 'import json, sys
print(json.load(sys.stdin)["attachments"][0]["server_pid"])') || fail "list --json failed"
    locked=$(grep VmLck "/proc/$spid/status" | tr -s ' ' | cut -d' ' -f2)
    echo "NBDLOOP-RESULT: $mode vmlck_kib $locked"
    [ "$locked" -gt 0 ] || fail "nbdkit $spid has VmLck $locked kB with --mlock"
    must mkfs.ext4 -q -F "$dev"
    must mount "$dev" /mnt/a
    step "$mode-write"
    free -m
    start=$(date +%s.%N)
    i=0
    while [ "$i" -lt "$repeat" ]; do
        cat "$chunk" || exit 1
        i=$((i + 1))
    done | dd of=/mnt/a/big bs=1M iflag=fullblock conv=fsync status=none ||
        fail "writing through $dev failed"
    end=$(date +%s.%N)
    mib=$(( $(stat -c %s /mnt/a/big) / 1048576 ))
    rate=$(echo "$mib $start $end" | awk '{ printf "%.1f", $1 / ($3 - $2) }')
    echo "NBDLOOP-RESULT: $mode write_mib $mib seconds $(echo "$start $end" | awk '{ printf "%.1f", $2 - $1 }') mib_per_s $rate"
    n=$(flushers "$spid")
    threads=$(find "/proc/$spid/task" -mindepth 1 -maxdepth 1 | wc -l)
    echo "NBDLOOP-RESULT: $mode flusher_threads $n of $threads"
    [ "$n" -eq "$threads" ] || fail "$n of nbdkit's $threads threads carry the I/O-flusher flags"
    grep -E '^(MemTotal|MemFree|Dirty|Writeback):' /proc/meminfo
    step "$mode-detach"
    must umount /mnt/a
    must nbdloop detach "$dev"
    python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))
print("NBDLOOP-RESULT: %s engine threads %d io_flushers %d" % (sys.argv[2], s["threads"], s["io_flushers"]))
sys.exit(0 if s["threads"] > 0 and s["io_flushers"] == s["threads"] else 1)' "$stats" "$mode" ||
        fail "the engine counted workers without PR_GET_IO_FLUSHER"
    sync
}

grep MemTotal /proc/meminfo
[ "$(grep -c . /proc/swaps)" -le 1 ] || fail "the guest has swap"
for mode in "$@"; do
    scenario "pressure-$mode" pressure "$mode"
done
[ "$FAILED" -eq 0 ] || fail "$FAILED scenario(s) failed"
