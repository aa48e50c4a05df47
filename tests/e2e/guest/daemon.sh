#!/bin/sh
# tests/e2e/test_daemon_vm.py: one daemon for every device.  In the
# one-kernel VM, with the nbd module loaded with nbds_max=8:
# - many: DEVICES images attached at once (the devices past the eighth made
#   on demand), 1 MiB written to each, 10 s idle; what every nbdloop process
#   costs (NBDLOOP-COST lines); verified and detached: no device made on
#   demand, process or record left;
# - kills: ext4 on two devices (direct, buffered) with a writer each, the
#   daemon SIGKILLed at random moments, once also every server while no
#   daemon ran; no I/O error, every fsynced file intact, fsck clean;
# - steps: the daemon killed at each step of an attach and of a detach; the
#   next daemon leaves a working device or nothing;
# - bad-input: garbage on the control socket; the daemon and the device live on.
# Arguments: DEVICES KILLS.  Images go in $NBDLOOP_DATA.
here=$(dirname "$0")
# shellcheck source=/dev/null
. "$here/product-lib.sh"
DEVICES=${1:-64}
KILLS=${2:-5}
STATE=/run/nbdloop/attached

now() { date +%s.%N; }
since() { echo "$1 $(now)" | awk '{ printf "%.2f", $2 - $1 }'; }
daemon_pid() { pgrep -f "nbdloop.cli.main daemon" | head -n 1; }
nbdloop_pids() { { daemon_pid; pgrep -x nbdkit; } | sort -u; }

# pss PIDS...: their proportional set size together, in KiB
pss() {
    for p in "$@"; do
        awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2> /dev/null
    done | awk '{ s += $1 } END { print s + 0 }'
}
threads() {
    for p in "$@"; do awk '/^Threads:/ { print $2 }' "/proc/$p/status"; done |
        awk '{ s += $1 } END { print s + 0 }'
}

nothing_left() {
    # nothing_left: no record, no server, no device connected or made
    [ -z "$(nbdloop list)" ] || fail "list is not empty: $(nbdloop list)"
    ls "$STATE"/nbd*.json > /dev/null 2>&1 && fail "records left: $(ls "$STATE")"
    pgrep -x nbdkit > /dev/null && fail "a server is left: $(pgrep -a nbdkit)"
    for d in /sys/block/nbd*; do
        [ -e "$d/pid" ] && fail "${d##*/} is still connected"
        n=${d##*/nbd}
        [ "$n" -ge 8 ] && fail "${d##*/}, made on demand, is still there"
    done
    return 0
}

many() {
    step many-create
    i=0
    while [ "$i" -lt "$DEVICES" ]; do
        # What nbdloop create makes, without its 2 s of start-up each under TCG.
        must truncate -s 64M "$NBDLOOP_DATA/m$i.img"
        i=$((i + 1))
    done
    step many-attach
    began=$(now)
    i=0
    while [ "$i" -lt "$DEVICES" ]; do
        [ "$i" -eq $((DEVICES - 1)) ] && last=$(now)
        dev=$(nbdloop attach "$NBDLOOP_DATA/m$i.img" 2> /tmp/attach.err) ||
            fail "attach m$i.img exited $?: $(cat /tmp/attach.err)"
        echo "$dev" > "/tmp/m$i.dev"
        i=$((i + 1))
    done
    echo "NBDLOOP-COST: attach_last_seconds $(since "$last")"
    echo "NBDLOOP-COST: attach_all_seconds $(since "$began")"
    t=$(now)
    nbdloop --version > /dev/null
    echo "NBDLOOP-COST: bare_start_seconds $(since "$t")"
    made=$(find /sys/block -maxdepth 1 -name 'nbd*' | wc -l)
    echo "NBDLOOP-COST: nbd_devices $made"
    [ "$made" -ge "$DEVICES" ] || fail "only $made NBD devices for $DEVICES attachments"
    step many-write
    i=0
    while [ "$i" -lt "$DEVICES" ]; do
        head -c 1048576 /dev/urandom > "/tmp/m$i.data"
        must dd if="/tmp/m$i.data" of="$(cat "/tmp/m$i.dev")" bs=1M count=1 oflag=direct \
            status=none
        i=$((i + 1))
    done
    sleep 10
    step many-cost
    # shellcheck disable=SC2046 # a list of pids
    set -- $(nbdloop_pids)
    echo "NBDLOOP-COST: processes $#"
    echo "NBDLOOP-COST: pss_kib $(pss "$@")"
    echo "NBDLOOP-COST: threads $(threads "$@")"
    echo "NBDLOOP-COST: daemon_pss_kib $(pss "$(daemon_pid)")"
    echo "NBDLOOP-COST: daemon_threads $(threads "$(daemon_pid)")"
    for p in $(pgrep -x nbdkit); do
        echo "NBDLOOP-COST: server $p pss_kib $(pss "$p") threads $(threads "$p")"
    done
    grep -E "^(MemTotal|MemAvailable):" /proc/meminfo
    t=$(now)
    nbdloop list > /tmp/list.txt || fail "list exited $?"
    echo "NBDLOOP-COST: list_seconds $(since "$t")"
    [ "$(wc -l < /tmp/list.txt)" -eq $((DEVICES + 1)) ] ||
        fail "list shows $(($(wc -l < /tmp/list.txt) - 1)) devices, not $DEVICES"
    step many-verify
    i=0
    while [ "$i" -lt "$DEVICES" ]; do
        dd if="$(cat "/tmp/m$i.dev")" of=/tmp/back bs=1M count=1 iflag=direct status=none
        cmp -s /tmp/back "/tmp/m$i.data" ||
            fail "m$i.img reads back otherwise: $(tail -n 3 $STATE/servers/shared.log | tr '\n' ' ')"
        i=$((i + 1))
    done
    step many-detach
    i=0
    while [ "$i" -lt "$DEVICES" ]; do
        [ "$i" -eq $((DEVICES - 1)) ] && last=$(now)
        must nbdloop detach "$(cat "/tmp/m$i.dev")"
        i=$((i + 1))
    done
    echo "NBDLOOP-COST: detach_last_seconds $(since "$last")"
    nothing_left
    step many-images
    i=0
    while [ "$i" -lt "$DEVICES" ]; do
        dd if="$NBDLOOP_DATA/m$i.img" of=/tmp/back bs=1M count=1 status=none
        cmp -s /tmp/back "/tmp/m$i.data" || fail "m$i.img does not hold what was written"
        rm -f "$NBDLOOP_DATA/m$i.img" "/tmp/m$i.data"
        i=$((i + 1))
    done
}

kills() {
    step kills-attach
    dmesg -C
    must nbdloop create "$NBDLOOP_DATA/ka.img" 128M
    must nbdloop create "$NBDLOOP_DATA/kb.img" 128M
    a=$(nbdloop attach "$NBDLOOP_DATA/ka.img" --timeout 4) || fail "attach ka exited $?"
    b=$(nbdloop attach "$NBDLOOP_DATA/kb.img" --mode buffered --timeout 4) ||
        fail "attach kb exited $?"
    for d in "$a:/mnt/a" "$b:/mnt/b"; do
        must mkfs.ext4 -q -F "${d%%:*}"
        must mount "${d%%:*}" "${d#*:}"
    done
    rm -f /tmp/stop /tmp/sums.a /tmp/sums.b
    writer /mnt/a /tmp/sums.a /tmp/stop > /tmp/writer.a 2>&1 &
    wa=$!
    writer /mnt/b /tmp/sums.b /tmp/stop > /tmp/writer.b 2>&1 &
    wb=$!
    trap 'touch /tmp/stop; wait "$wa" "$wb" 2> /dev/null' EXIT
    k=0
    while [ "$k" -lt "$KILLS" ]; do
        sleep "$(random_ms 300 2500)"
        step "kills-$k"
        old=$(daemon_pid)
        [ -n "$old" ] || fail "no daemon runs"
        must kill -9 "$old"
        if [ "$k" -eq 2 ]; then
            # Every server too, while no daemon runs: the devices hold
            # their requests until the next daemon serves them again.
            sleep 1
            pkill -9 -x nbdkit
        fi
        sleep "$(random_ms 100 1500)"
        nbdloop list > /tmp/list.txt || fail "list exited $? after the kill"
        new=$(daemon_pid)
        if [ -z "$new" ] || [ "$new" = "$old" ]; then fail "no new daemon after $old"; fi
        n=0
        until [ "$(grep -c ' attached$' /tmp/list.txt)" -eq 2 ]; do
            n=$((n + 1))
            [ "$n" -lt 300 ] || fail "not both attached again: $(cat /tmp/list.txt)"
            sleep 0.2
            nbdloop list > /tmp/list.txt
        done
        kill -0 "$wa" 2> /dev/null || fail "writer a stopped: $(cat /tmp/writer.a)"
        kill -0 "$wb" 2> /dev/null || fail "writer b stopped: $(cat /tmp/writer.b)"
        k=$((k + 1))
    done
    step kills-check
    sleep 1
    touch /tmp/stop
    wait "$wa" || fail "writer a failed: $(cat /tmp/writer.a)"
    wait "$wb" || fail "writer b failed: $(cat /tmp/writer.b)"
    trap - EXIT
    cat /tmp/writer.a /tmp/writer.b
    for d in "$a:/mnt/a:a" "$b:/mnt/b:b"; do
        dev=${d%%:*} rest=${d#*:}
        mnt=${rest%%:*} tag=${rest#*:}
        grep -q "^$dev $mnt ext4 rw," /proc/mounts || fail "$dev is no longer mounted read-write"
        kernel_log_clean "$dev"
        must umount "$mnt"
        must e2fsck -fn "$dev"
        must mount "$dev" "$mnt"
        verify "$mnt" "/tmp/sums.$tag" || fail "fsynced files differ on $dev"
        echo "$dev: verified $(wc -l < "/tmp/sums.$tag") files"
        must umount "$mnt"
    done
    grep "recovered in" /run/nbdloop/daemon.log | tail -n 6
    must nbdloop detach "$a"
    must nbdloop detach "$b"
    nothing_left
}

# crash_at STEP CMD...: CMD with the daemon SIGKILLed at STEP; then the next
# command's daemon takes over.
crash_at() {
    s=$1
    shift
    kill -9 "$(daemon_pid)" 2> /dev/null
    NBDLOOP_DAEMON_CRASH_AT=$s nbdloop daemon >> /tmp/crash-daemon.log 2>&1 &
    n=0
    until nbdloop list > /dev/null 2>&1 && [ -S /run/nbdloop/control.sock ]; do
        n=$((n + 1))
        [ "$n" -lt 300 ] || fail "the daemon for $s did not start"
        sleep 0.2
    done
    "$@" > /tmp/crash.out 2>&1 && fail "$* went through, with the daemon killed at $s"
    echo "$s: $*: $(cat /tmp/crash.out)"
    [ -z "$(daemon_pid)" ] || fail "the daemon still runs after $s"
    nbdloop list > /tmp/list.txt || fail "list exited $? after $s"
    cat /tmp/list.txt
}

steps() {
    img=$NBDLOOP_DATA/steps.img
    must nbdloop create "$img" 64M
    for s in attach-recorded attach-served; do
        step "$s"
        crash_at "$s" nbdloop attach "$img"
        nothing_left
    done
    step attach-connected
    crash_at attach-connected nbdloop attach "$img"
    dev=$(awk 'NR == 2 { print $1 }' /tmp/list.txt)
    grep -q " attached$" /tmp/list.txt || fail "no working device after attach-connected"
    must dd if=/dev/urandom of=/tmp/one bs=1M count=1 status=none
    must dd if=/tmp/one of="$dev" bs=1M count=1 oflag=direct status=none
    must dd if="$dev" of=/tmp/back bs=1M count=1 iflag=direct status=none
    cmp -s /tmp/one /tmp/back || fail "$dev reads back otherwise"
    for s in detach-marked detach-disconnected; do
        step "$s"
        if [ -z "$(nbdloop list)" ]; then
            dev=$(nbdloop attach "$img") || fail "attach exited $?"
        fi
        crash_at "$s" nbdloop detach "$dev"
        nothing_left
        dev=
    done
}

bad_input() {
    img=$NBDLOOP_DATA/bad.img
    step bad-attach
    must nbdloop create "$img" 64M
    dev=$(nbdloop attach "$img") || fail "attach exited $?"
    pid=$(daemon_pid)
    step bad-send
    python3 "$here/badclient.py" /run/nbdloop/control.sock || fail "badclient: $?"
    step bad-alive
    [ "$(daemon_pid)" = "$pid" ] || fail "the daemon changed: $pid -> $(daemon_pid)"
    nbdloop list --json > /tmp/list.json || fail "list exited $?"
    grep -q '"state": "attached"' /tmp/list.json || fail "the device is not attached"
    must dd if="$dev" of=/dev/null bs=1M count=4 iflag=direct status=none
    must nbdloop detach "$dev"
}

scenario many many
scenario kills kills
scenario steps steps
scenario bad-input bad_input
[ "$FAILED" -eq 0 ] || fail "$FAILED scenario(s) failed"
