#!/bin/sh
# tests/e2e/test_crash_vm.py: write and fsync files on ext4 over the kernel
# NBD client while the host kills the server KILLS times; after each kill,
# reconnect, replay the journal, fsck, and check every file synced so far.
#
# Payload ($NBDLOOP_PAYLOAD):
#   params           NAME=value lines (values shell-quoted), sourced below:
#                    FS_BLOCKS (the filesystem's size in 4 KiB blocks),
#                    MARK_BLOCK (the 4 KiB block of the progress marker,
#                    after the filesystem) and KILLS
#   nbd-client.argv  the connect command, one argument a line
STEP=start
step() { STEP=$1; echo "NBDLOOP-STEP: $1"; }
fail() {
    echo "NBDLOOP-STEP-FAILED: $STEP: $*"
    echo "step $STEP: $*" > "$NBDLOOP_REASON"
    exit 1
}
must() { "$@" || fail "$* (exit $?)"; }
[ -f "$NBDLOOP_PAYLOAD/params" ] || fail "no $NBDLOOP_PAYLOAD/params in the payload"
# Made per run by the test, so there is nothing here to follow.
# shellcheck source=/dev/null
. "$NBDLOOP_PAYLOAD/params"
phase=0
n=0
mark() {
    printf 'NBDLOOP-CRASH phase %d files %d\n' $phase $n |
        dd of=/dev/nbd0 bs=4096 seek="$MARK_BLOCK" conv=sync,fsync 2>/dev/null
}
nbd_client() {
    set --
    while IFS= read -r arg; do
        set -- "$@" "$arg"
    done < "$NBDLOOP_PAYLOAD/nbd-client.argv"
    "$@"
}
connect() {
    tries=0
    until nbd_client >/tmp/nbd-client.log 2>&1; do
        tries=$((tries + 1))
        [ $tries -gt 120 ] && fail "nbd-client: $(tail -n 1 /tmp/nbd-client.log)"
        sleep 0.5
    done
    echo "connected after $tries retries"
}
check_synced() {
    [ -s /tmp/synced.sha256 ] || return 0
    sha256sum -c -s /tmp/synced.sha256 || {
        sha256sum -c /tmp/synced.sha256 | grep -v ': OK$' | head -n 5
        fail "synced files lost or damaged after kill $phase"
    }
}
: > /tmp/synced.sha256

step connect
connect
step mkfs
must mkfs.ext4 -F -q -b 4096 /dev/nbd0 "$FS_BLOCKS"
must mount -t ext4 /dev/nbd0 /mnt
must mark

while [ $phase -lt "$KILLS" ]; do
    step write-$phase
    # Write and fsync files until the server goes away.
    while :; do
        n=$((n + 1))
        f=/mnt/p$phase-f$n
        # busybox sh has $RANDOM; POSIX sh does not promise it.
        # shellcheck disable=SC3028
        dd if=/dev/urandom of=$f bs=4096 count=$((RANDOM % 48 + 1)) conv=fsync \
            2>/dev/null || break
        echo "$(sha256sum $f | cut -d' ' -f1)  $f" >> /tmp/synced.sha256
        mark || break
    done
    phase=$((phase + 1))
    echo "kill $phase: $(wc -l < /tmp/synced.sha256) files synced so far; stopped at file $n"

    step recover-$phase
    umount /mnt 2>/dev/null || umount -l /mnt || fail "umount"
    must nbd-client -d /dev/nbd0
    connect
    must mount -t ext4 /dev/nbd0 /mnt
    must umount /mnt
    step fsck-$phase
    must e2fsck -fn /dev/nbd0
    step verify-$phase
    must mount -t ext4 /dev/nbd0 /mnt
    check_synced
    n=0
    must mark
done

step final
must umount /mnt
must e2fsck -fn /dev/nbd0
sed 's/^/SYNCED /' /tmp/synced.sha256
must nbd-client -d /dev/nbd0
step "done"
