#!/bin/sh
# Helpers for the scripts that run the whole product in the one-kernel VM
# (nbdloop.vm.product): steps, failures, scenarios that fail on their own.
# Sourced; $NBDLOOP_REASON and $NBDLOOP_DATA come from the guest's init.
STEP=start
step() { STEP=$1; read -r at _ < /proc/uptime; echo "NBDLOOP-STEP: $1 at $at"; }
fail() {
    echo "NBDLOOP-STEP-FAILED: $STEP: $*"
    echo "step $STEP: $*" > "$NBDLOOP_REASON"
    exit 1
}
must() { "$@" || fail "$* (exit $?)"; }

# wait_until SECONDS WHAT CMD...: run CMD every 0.1 s until it succeeds;
# fail saying that WHAT did not happen in SECONDS.
wait_until() {
    limit=$(($1 * 10)) what=$2 tries=0
    shift 2
    until "$@"; do
        tries=$((tries + 1))
        [ "$tries" -gt "$limit" ] && fail "$what did not happen in $limit tenths of a second"
        sleep 0.1
    done
}

# refused PHRASE CMD...: CMD must fail with exit status 2 and say, in one
# line on stderr, something containing PHRASE.
refused() {
    phrase=$1
    shift
    "$@" > /tmp/refused.out 2> /tmp/refused.err
    rc=$?
    [ "$rc" -eq 2 ] || fail "$* exited $rc, not 2: $(cat /tmp/refused.err)"
    [ "$(wc -l < /tmp/refused.err)" -eq 1 ] || fail "$* said more than one line: $(cat /tmp/refused.err)"
    grep -q -- "$phrase" /tmp/refused.err || fail "$* did not say '$phrase': $(cat /tmp/refused.err)"
    grep -q Traceback /tmp/refused.err && fail "$* printed a traceback"
    echo "refused as it should: $(cat /tmp/refused.err)"
}

# scenario NAME FUNCTION [ARGS...]: run FUNCTION in a subshell, report
# NBDLOOP-SCENARIO: NAME PASS|FAIL <reason>, clean up after it, and go on.
FAILED=0
scenario() {
    name=$1
    shift
    echo "NBDLOOP-SCENARIO-START: $name"
    : > "$NBDLOOP_REASON"
    read -r began _ < /proc/uptime
    if ( "$@" ); then
        echo "NBDLOOP-SCENARIO: $name PASS"
    else
        echo "NBDLOOP-SCENARIO: $name FAIL $(head -n 1 "$NBDLOOP_REASON")"
        FAILED=$((FAILED + 1))
    fi
    cleanup
    read -r ended _ < /proc/uptime
    echo "NBDLOOP-SCENARIO-TIME: $name $(echo "$began $ended" | awk '{ printf "%.1f", $2 - $1 }') s"
}

# Whatever a failed scenario left: mounts, attachments, servers.
cleanup() {
    for m in /mnt/a /mnt/b; do
        mountpoint -q "$m" && umount "$m"
    done
    for record in /run/nbdloop/attached/nbd*.json; do
        [ -e "$record" ] || continue
        # Not $name: scenario() still needs its own.
        left=${record##*/}
        nbdloop detach "/dev/${left%.json}" > /dev/null 2>&1
    done
    return 0
}

# put_files DIR: files of assorted sizes, fsynced; their checksums go to
# /tmp/sums.<basename of DIR's device image> via sums_of.
put_files() {
    i=0
    for size in 0 1 511 4096 65659 1048583 6291456; do
        head -c "$size" /dev/urandom > "$1/f$i" || return 1
        i=$((i + 1))
    done
    mkdir -p "$1/dir" && head -c 12345 /dev/urandom > "$1/dir/g" || return 1
    sync "$1"/f* "$1/dir/g" && sync
}

# sums DIR > FILE; verify DIR FILE
sums() { (cd "$1" && find . -type f ! -name lost+found | sort | xargs sha256sum); }
verify() { (cd "$1" && sha256sum -c --quiet "$2"); }

mkdir -p /mnt/a /mnt/b

random_ms() {
    # random_ms MIN MAX: a random number of milliseconds, as seconds for sleep
    r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
    echo "$1 $2 $r" | awk '{ printf "%.2f", ($1 + ($2 - $1) * $3 / 65535) / 1000 }'
}

# writer DIR SUMS STOP: write, fsync and record files until STOP exists.
# Its scratch files are named after SUMS, so that writers can run side by side.
writer() {
    i=0
    while [ ! -e "$3" ]; do
        n=$(( $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') * 4 + 1 ))
        head -c "$n" /dev/urandom > "$2.data"
        if ! dd if="$2.data" of="$1/w$i" bs=64k conv=fsync status=none 2> "$2.err"; then
            echo "writer: w$i: $(cat "$2.err")"
            return 1
        fi
        echo "$(sha256sum < "$2.data" | cut -d' ' -f1)  w$i" >> "$2"
        i=$((i + 1))
    done
    echo "writer: $i files"
}

kernel_log_clean() {
    # kernel_log_clean DEV: no I/O error, no ext4 error, no remount on DEV
    name=${1#/dev/}
    if dmesg | grep -E "(I/O error|EXT4-fs error|Remounting|Buffer I/O).*$name|$name.*(I/O error|error)" > /tmp/klog; then
        fail "the kernel logged errors on $1: $(head -n 3 /tmp/klog | tr '\n' ' ')"
    fi
}

# report_port: the device of run_product's report port (its name is
# GUEST_REPORT_PORT in nbdloop/vm/product.py), which reaches the host as
# it is written and so outlives a power cut.  A virtio port has one opener
# at a time: open it once (exec 9> "$(report_port)") and write to the fd.
report_port() {
    for port in /sys/class/virtio-ports/*; do
        [ "$(cat "$port/name" 2> /dev/null)" = nbdloop.report ] && { echo "/dev/${port##*/}"; return 0; }
    done
    return 1
}

# start_udev: Debian's udevd, with nbdloop's rule where make install puts
# it for the system (/etc/udev/rules.d) and the group nbdloop, and every
# block device's add event replayed and handled.  The guest has no udevd
# otherwise: its /dev is the kernel's devtmpfs alone.  Not make install
# itself: its man pages take 6 s in the guest, udevd 0.5 s.  The checkout is
# $here/../../.., $here being the sourcing script's directory.
# stop_udev: udevd gone.
start_udev() {
    [ -x /lib/systemd/systemd-udevd ] || fail "no /lib/systemd/systemd-udevd (run: make setup)"
    checkout=${here:?the sourcing script sets here}/../../..
    must mkdir -p /etc/udev/rules.d
    must cp "$checkout/systemd/60-nbdloop.rules" /etc/udev/rules.d/
    getent group nbdloop > /dev/null || must groupadd --system nbdloop
    /lib/systemd/systemd-udevd --daemon || fail "systemd-udevd did not start"
    must udevadm trigger --action=add --subsystem-match=block
    must udevadm settle --timeout=60
}

stop_udev() {
    udevadm control --exit || fail "udevd did not exit"
}
