#!/bin/sh
# tests/e2e/test_attach_vm.py: the user's own path, on one kernel.  In the
# one-kernel VM (server, kernel NBD client and filesystem on one kernel):
# nbdloop attach -> mkfs -> mount -> write -> list -> umount -> detach ->
# fsck -> attach again -> verify, in both modes and with ext4 and xfs; the
# options; and the failure paths on a real device.  Each scenario reports
# NBDLOOP-SCENARIO: NAME PASS|FAIL and the next one runs anyway.
# Arguments: none.  Images go in $NBDLOOP_DATA.
here=$(dirname "$0")
# shellcheck source=/dev/null
. "$here/product-lib.sh"
LISTCHECK=$here/listcheck.py

free_again() {
    # free_again DEV PID SERVER_PID: the device, the server, the record gone
    # (the device was its server's only one).
    name=${1#/dev/}
    [ -e "/sys/block/$name/pid" ] && fail "$1 still connected after detach"
    kill -0 "$2" 2> /dev/null && fail "the server $2 still runs"
    kill -0 "$3" 2> /dev/null && fail "nbdkit $3 still runs"
    [ -z "$(nbdloop list)" ] || fail "nbdloop list is not empty: $(nbdloop list)"
    return 0
}

roundtrip() {
    # roundtrip MODE FSTYPE SIZE [attach options...]
    mode=$1 fstype=$2 size=$3
    shift 3
    # The options in the names too: two scenarios may share mode and type.
    tag=$mode-$fstype$(echo "$*" | tr -dc 'a-z0-9')
    img=$NBDLOOP_DATA/rt-$tag.img
    step "$mode-$fstype-create"
    must nbdloop create "$img" "$size"
    step "$mode-$fstype-attach"
    dev=$(nbdloop attach "$img" --mode "$mode" "$@" 2> /tmp/attach.err) ||
        fail "attach exited $?: $(cat /tmp/attach.err)"
    echo "attached $img as $dev"
    cat /tmp/attach.err
    # A sparse image: in direct mode attach says that a write into a hole
    # is durable only after a flush; in buffered mode every write is.
    if [ "$mode" = direct ]; then
        grep -q "holes or unwritten extents" /tmp/attach.err || fail "attach did not warn of holes"
    elif grep -q "holes" /tmp/attach.err; then
        fail "attach warned of holes in buffered mode"
    fi
    case $dev in /dev/nbd[0-9]*) ;; *) fail "attach printed '$dev', not /dev/nbdN" ;; esac
    step "$mode-$fstype-mkfs"
    case $fstype in
        ext4) must mkfs.ext4 -q -F "$dev" ;;
        xfs) must mkfs.xfs -q -f "$dev" ;;
    esac
    must mount -t "$fstype" "$dev" /mnt/a
    step "$mode-$fstype-write"
    must put_files /mnt/a
    sums /mnt/a > "/tmp/sums-$tag" || fail "sha256sum failed"
    step "$mode-$fstype-list"
    nbdloop list || fail "list exited $?"
    nbdloop list --json > /tmp/list.json || fail "list --json exited $?"
    echo "NBDLOOP-LIST-JSON: $(tr -d '\n' < /tmp/list.json)"
    conns=1 procs=1 bs=
    [ "${1:-}" = --connections ] && conns=$2
    [ "${1:-}" = --block-size ] && bs=$2
    [ "${3:-}" = --processes ] && procs=$4
    if [ -n "$bs" ]; then
        lbs=$(cat "/sys/block/${dev#/dev/}/queue/logical_block_size")
        echo "$dev: logical block size $lbs"
        [ "$lbs" -eq "$bs" ] || fail "logical block size $lbs, not $bs"
    fi
    pids=$(python3 "$LISTCHECK" /tmp/list.json "$dev" "$img" "$mode" "$conns" attached) ||
        fail "list --json: $pids"
    # shellcheck disable=SC2086 # two numbers
    set -- $pids "$@"
    pid=$1 spid=$2
    shift 2
    if [ "$conns" -gt 1 ]; then
        sock=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["attachments"][0]["socket"])' /tmp/list.json)
        n=$(ss -xHn state connected | grep -c -- "$sock")
        echo "$n connections to $sock"
        [ "$n" -eq "$conns" ] || fail "$n kernel connections to the server, not $conns"
    fi
    if [ "$procs" -gt 1 ]; then
        # Connection k goes to process k's own socket, in turn.
        k=0
        while [ "$k" -lt "$procs" ]; do
            n=$(ss -xHn state connected | grep -c -- "$sock\.$k ")
            echo "$n connections to $sock.$k"
            [ "$n" -eq $((conns / procs)) ] || fail "$n connections to process $k, not $((conns / procs))"
            k=$((k + 1))
        done
        n=$(python3 -c 'import json, os, sys
a = json.load(open(sys.argv[1]))["attachments"][0]
print(sum(os.path.exists(f"/proc/{p}") for p in a["server_pids"]))' /tmp/list.json)
        [ "$n" -eq "$procs" ] || fail "$n nbdkit processes, not $procs"
    fi
    step "$mode-$fstype-detach"
    must umount /mnt/a
    must nbdloop detach "$dev"
    free_again "$dev" "$pid" "$spid"
    step "$mode-$fstype-fsck"
    case $fstype in
        ext4) must e2fsck -fn "$img" ;;
        xfs) must xfs_repair -n -f "$img" ;;
    esac
    step "$mode-$fstype-verify"
    dev=$(nbdloop attach "$img" --mode "$mode" "$@") || fail "attach again exited $?"
    must mount -t "$fstype" "$dev" /mnt/a
    verify /mnt/a "/tmp/sums-$tag" || fail "checksums differ after a fresh attach"
    must umount /mnt/a
    nbdloop list --json > /tmp/list.json
    pids=$(python3 "$LISTCHECK" /tmp/list.json "$dev" "$img" "$mode" "$conns" attached) ||
        fail "list --json: $pids"
    # shellcheck disable=SC2086 # two numbers
    set -- $pids
    must nbdloop detach "$img"     # the image's name, this time
    free_again "$dev" "$1" "$2"
    step "$mode-$fstype-done"
}

readonly_attach() {
    img=$NBDLOOP_DATA/rt-direct-ext4.img
    step ro-attach
    before=$(sha256sum < "$img")
    dev=$(nbdloop attach "$img" --readonly) || fail "attach --readonly exited $?"
    must mount -o ro "$dev" /mnt/a
    verify /mnt/a /tmp/sums-direct-ext4 || fail "checksums differ read-only"
    step ro-write
    touch /mnt/a/new 2> /tmp/err && fail "a file was created on a read-only mount"
    echo "touch: $(cat /tmp/err)"
    dd if=/dev/zero of="$dev" bs=4096 count=1 oflag=direct 2> /tmp/err &&
        fail "a write to the read-only device succeeded"
    grep -q -e "Operation not permitted" -e "Read-only file system" /tmp/err ||
        fail "the write failed otherwise: $(cat /tmp/err)"
    echo "dd: $(tail -n 1 /tmp/err)"
    must umount /mnt/a
    must nbdloop detach "$dev"
    [ "$(sha256sum < "$img")" = "$before" ] || fail "the image changed under --readonly"
}

two_images() {
    step two-attach
    must nbdloop create "$NBDLOOP_DATA/one.img" 64M
    must nbdloop create "$NBDLOOP_DATA/two.img" 64M
    first=$(nbdloop attach "$NBDLOOP_DATA/one.img") || fail "attach one.img exited $?"
    second=$(nbdloop attach "$NBDLOOP_DATA/two.img") || fail "attach two.img exited $?"
    echo "one.img on $first, two.img on $second"
    [ "${first#/dev/nbd}" -lt "${second#/dev/nbd}" ] || fail "$second is not after $first"
    step two-again
    refused "already attached to $first" nbdloop attach "$NBDLOOP_DATA/one.img"
    must nbdloop detach "$first"
    must nbdloop detach "$second"
}

killed_server() {
    # With recovery off (--recover-timeout 0), the device dies with its server.
    img=$NBDLOOP_DATA/one.img
    step kill-attach
    dev=$(nbdloop attach "$img" --recover-timeout 0) || fail "attach exited $?"
    nbdloop list --json > /tmp/list.json
    # shellcheck disable=SC2046 # two numbers
    set -- $(python3 "$LISTCHECK" /tmp/list.json "$dev" "$img" direct 1 attached)
    step kill-9
    must kill -9 "$2"
    sleep 2
    nbdloop list
    nbdloop list --json > /tmp/list.json
    python3 "$LISTCHECK" /tmp/list.json "$dev" "$img" direct 1 stale > /dev/null ||
        fail "list does not show $dev as stale"
    grep -q '"reason": "nbdkit (pid '"$2"') ended.*recovery is off' /tmp/list.json ||
        fail "list does not say why $dev is stale: $(grep reason /tmp/list.json)"
    step kill-detach
    nbdloop detach "$dev" 2> /tmp/err || fail "detach of a stale device exited $?: $(cat /tmp/err)"
    echo "detach: $(cat /tmp/err)"
    free_again "$dev" "$1" "$2"
}

mounted_device() {
    img=$NBDLOOP_DATA/two.img
    step mounted-attach
    dev=$(nbdloop attach "$img") || fail "attach exited $?"
    must mkfs.ext4 -q -F "$dev"
    must mount "$dev" /mnt/b
    step mounted-detach
    refused "mounted on /mnt/b" nbdloop detach "$dev"
    grep -q "^$dev /mnt/b " /proc/mounts || fail "$dev is no longer mounted"
    head -c 1048576 /dev/urandom > /tmp/still
    must cp /tmp/still /mnt/b/still
    must sync
    echo 3 > /proc/sys/vm/drop_caches
    cmp /tmp/still /mnt/b/still || fail "the device stopped working after the refusal"
    must umount /mnt/b
    must nbdloop detach "$dev"
}

busy_device() {
    img=$NBDLOOP_DATA/one.img
    step busy-hold
    # An open of an unconfigured NBD device gives it a configuration, so the
    # kernel refuses to connect it (EBUSY) while it is held open.
    sleep 600 3< /dev/nbd5 &
    holder=$!
    sleep 1
    step busy-attach
    # The user's to fix, so exit status 2 (a failure at run time is 1).
    refused "/dev/nbd5 is busy" nbdloop attach "$img" --device /dev/nbd5
    kill "$holder"
    step busy-clean
    pgrep -x nbdkit && fail "a server is left: $(pgrep -a nbdkit)"
    [ -z "$(nbdloop list)" ] || fail "a record was left: $(nbdloop list)"
    [ -e /run/nbdloop/attached/nbd5.json ] && fail "nbd5.json was left behind"
    return 0
}

slice_attach() {
    # A 64M filesystem in the middle of a 96M image whose other bytes hold
    # a pattern: attach --offset --sizelimit, mkfs, mount, write; list
    # shows the slice; detach; the pattern is intact and the filesystem is
    # found where it should be in the image.
    img=$NBDLOOP_DATA/slice.img
    step slice-create
    must nbdloop create "$img" 96M
    must dd if=/dev/urandom of=/tmp/pattern bs=1M count=96 status=none
    must dd if=/tmp/pattern of="$img" bs=1M conv=notrunc status=none
    step slice-attach
    dev=$(nbdloop attach "$img" --offset 16M --sizelimit 64M 2> /tmp/attach.err) ||
        fail "attach exited $?: $(cat /tmp/attach.err)"
    grep -q "holes" /tmp/attach.err && fail "attach warned of holes in a written image"
    [ "$(blockdev --getsize64 "$dev")" -eq $((64 << 20)) ] ||
        fail "$dev has $(blockdev --getsize64 "$dev") bytes, not 64M"
    must mkfs.ext4 -q -F "$dev"
    must mount "$dev" /mnt/a
    must put_files /mnt/a
    sums /mnt/a > /tmp/sums-slice || fail "sha256sum failed"
    nbdloop list -O NAME,OFFSET,SIZELIMIT,BACK-FILE -n > /tmp/list.txt || fail "list exited $?"
    cat /tmp/list.txt
    # shellcheck disable=SC2046 # four words
    set -- $(cat /tmp/list.txt)
    [ "$2 $3" = "$((16 << 20)) $((64 << 20))" ] || fail "list shows offset $2, sizelimit $3"
    must umount /mnt/a
    must nbdloop detach "$dev"
    step slice-check
    for range in "0 16" "80 16"; do
        # shellcheck disable=SC2086 # two numbers
        set -- $range
        a=$(dd if="$img" bs=1M skip="$1" count="$2" status=none | sha256sum)
        b=$(dd if=/tmp/pattern bs=1M skip="$1" count="$2" status=none | sha256sum)
        [ "$a" = "$b" ] || fail "the image changed outside the slice, in MiB $1-$(($1 + $2))"
    done
    must dd if="$img" of=/tmp/inside.img bs=1M skip=16 count=64 status=none
    must e2fsck -fn /tmp/inside.img
    rm -f /tmp/inside.img /tmp/pattern
    refused "not a multiple of the image's direct-I/O alignment" \
        nbdloop attach "$img" --offset 1000
}

partitions() {
    # Two partitions made with sfdisk on the device, ext4 on each (xfs
    # wants 300M); detach, attach -P: both are there at once, list shows
    # them, both mount and verify.
    img=$NBDLOOP_DATA/parts.img
    step parts-create
    must nbdloop create "$img" 128M
    dev=$(nbdloop attach "$img") || fail "attach exited $?"
    printf 'label: gpt\n,48M\n,\n' | sfdisk -q "$dev" || fail "sfdisk exited $?"
    [ -b "${dev}p2" ] || fail "sfdisk left no ${dev}p2"
    must mkfs.ext4 -q -F "${dev}p1"
    must mkfs.ext4 -q -F "${dev}p2"
    must mount "${dev}p1" /mnt/a
    must mount "${dev}p2" /mnt/b
    must put_files /mnt/a
    must put_files /mnt/b
    sums /mnt/a > /tmp/sums-p1 || fail "sha256sum failed"
    sums /mnt/b > /tmp/sums-p2 || fail "sha256sum failed"
    refused "mounted on /mnt/" nbdloop detach "$dev"
    must umount /mnt/a
    must umount /mnt/b
    must nbdloop detach "$dev"
    step parts-attach
    dev=$(nbdloop attach "$img" -P) || fail "attach -P exited $?"
    for p in 1 2; do
        [ -b "${dev}p$p" ] || fail "attach -P: no ${dev}p$p"
    done
    nbdloop list -O NAME,PARTS -n > /tmp/list.txt || fail "list exited $?"
    cat /tmp/list.txt
    [ "$(cat /tmp/list.txt)" = "$dev ${dev#/dev/}p1,${dev#/dev/}p2" ] ||
        fail "list shows partitions '$(cat /tmp/list.txt)'"
    nbdloop list --json | grep -q "\"${dev}p2\"" || fail "list --json has no ${dev}p2"
    step parts-verify
    must mount "${dev}p1" /mnt/a
    must mount "${dev}p2" /mnt/b
    verify /mnt/a /tmp/sums-p1 || fail "partition 1 differs"
    verify /mnt/b /tmp/sums-p2 || fail "partition 2 differs"
    must umount /mnt/a
    must umount /mnt/b
    must nbdloop detach "$dev"
}

wait_for() {
    # wait_for FILE TEXT WHAT: until FILE holds TEXT, for 60 s
    n=0
    until grep -q "$2" "$1" 2> /dev/null; do
        n=$((n + 1))
        [ "$n" -lt 300 ] || fail "no $3 within 60 s"
        sleep 0.2
    done
}

table_attachments() {
    # The table (/etc/nbdloop/attachments, on the guest's overlay): attach
    # --persist writes a line, attach --all attaches what is not attached,
    # detach --all and detach --forget.
    tab=/etc/nbdloop/attachments
    t1=$NBDLOOP_DATA/t1.img t2=$NBDLOOP_DATA/t2.img
    rm -f "$tab"
    step table-persist
    must nbdloop create "$t1" 64M
    must nbdloop create "$t2" 32M
    d1=$(nbdloop attach "$t1" --persist --mode buffered --connections 2) || fail "attach exited $?"
    cat "$tab"
    grep -qx "$t1 mode=buffered,connections=2" "$tab" || fail "attach --persist wrote: $(cat "$tab")"
    must nbdloop detach "$d1"
    printf '%s partscan,recover-timeout=30\n' "$t2" >> "$tab"
    step table-all
    nbdloop attach --all > /tmp/all.out || fail "attach --all exited $?"
    cat /tmp/all.out
    [ "$(wc -l < /tmp/all.out)" -eq 2 ] || fail "attach --all attached: $(cat /tmp/all.out)"
    nbdloop list --json > /tmp/list.json
    python3 "$LISTCHECK" /tmp/list.json "$(sed -n "s|^$t1 ||p" /tmp/all.out)" "$t1" buffered 2 \
        attached > /dev/null || fail "t1 is not attached as its line says"
    grep -q '"recover_timeout": 30' /tmp/list.json || fail "t2 lost its line's options"
    nbdloop attach --all > /tmp/all.out || fail "a second attach --all exited $?"
    [ ! -s /tmp/all.out ] || fail "a second attach --all attached again: $(cat /tmp/all.out)"
    step table-detach-all
    must nbdloop detach --all
    [ -z "$(nbdloop list)" ] || fail "detach --all left: $(nbdloop list)"
    step table-forget
    d2=$(nbdloop attach "$t2") || fail "attach exited $?"
    must nbdloop detach --forget "$d2"
    grep -q "$t2" "$tab" && fail "detach --forget left the line: $(cat "$tab")"
    grep -q "$t1" "$tab" || fail "detach --forget removed another line"
    return 0
}

unit_commands() {
    # What the systemd units run, without booting systemd: nbdloop.service's
    # ExecStart (the daemon, --attach-table) under a notification socket,
    # after the daemon before it was killed under a mounted filesystem;
    # nbdloop@.service's ExecStart (attach --from-table, which finds the
    # image attached already) and ExecStop (detach); and attach
    # --foreground, which tells systemd once attached and ends at detach.
    t1=$NBDLOOP_DATA/t1.img t2=$NBDLOOP_DATA/t2.img
    tab=/etc/nbdloop/attachments
    printf '%s mode=buffered,connections=2\n%s\n' "$t1" "$t2" > "$tab"
    export NOTIFY_SOCKET=/tmp/notify.sock
    rm -f /tmp/notify.sock /tmp/notify.out
    socat -u UNIX-RECV:/tmp/notify.sock OPEN:/tmp/notify.out,creat,append &
    listener=$!
    trap 'kill "$listener" 2> /dev/null' EXIT
    sleep 0.5
    step unit-from-table
    dev=$(nbdloop attach --from-table "$t1") || fail "attach --from-table exited $?"
    must mkfs.ext4 -q -F "$dev"
    must mount "$dev" /mnt/a
    must put_files /mnt/a
    sums /mnt/a > /tmp/sums-unit || fail "sha256sum failed"
    again=$(nbdloop attach --from-table "$t1") || fail "a second attach --from-table exited $?"
    [ "$again" = "$dev" ] || fail "a second attach --from-table said $again, not $dev"
    step unit-daemon-killed
    old=$(pgrep -f "nbdloop.cli.main daemon")
    must kill -9 "$old"
    must dd if="$dev" of=/dev/null bs=4096 count=16 iflag=direct status=none
    nbdloop daemon --attach-table 2> /tmp/daemon.err &
    daemon=$!
    wait_for /tmp/notify.out READY=1 "READY=1 from the daemon"
    cat /tmp/notify.out; echo
    cat /tmp/daemon.err
    nbdloop list --json > /tmp/list.json
    python3 "$LISTCHECK" /tmp/list.json "$dev" "$t1" buffered 2 attached > /dev/null ||
        fail "after the takeover: $(cat /tmp/list.json)"
    d2=$(python3 -c 'import json, os, sys
print([a["device"] for a in json.load(open(sys.argv[1]))["attachments"]
       if a["image"] == os.path.realpath(sys.argv[2])][0])' /tmp/list.json "$t2") ||
        fail "the daemon did not attach $t2 from the table before READY=1"
    must dd if=/dev/urandom of=/mnt/a/after bs=1M count=1 conv=fsync status=none
    verify /mnt/a /tmp/sums-unit || fail "files differ after the takeover"
    step unit-stop
    refused "mounted on /mnt/a" nbdloop detach "$t1"
    must umount /mnt/a
    must nbdloop detach "$t1"
    must nbdloop detach "$d2"
    step unit-foreground
    : > /tmp/notify.out
    nbdloop attach --foreground "$t2" 2> /tmp/fg.err &
    fg=$!
    wait_for /tmp/notify.out READY=1 "READY=1 from attach --foreground"
    dev=$(sed -n 's/^nbdloop: .* attached to \(.*\)$/\1/p' /tmp/fg.err)
    [ -n "$dev" ] || fail "attach --foreground did not say its device: $(cat /tmp/fg.err)"
    must nbdloop detach "$dev"
    wait "$fg" || fail "attach --foreground exited $? after detach"
    [ -z "$(nbdloop list)" ] || fail "a record was left: $(nbdloop list)"
    kill "$daemon" 2> /dev/null
    kernel_clean=$(dmesg | grep -c "I/O error.*${dev#/dev/}")
    [ "$kernel_clean" -eq 0 ] || fail "the kernel logged I/O errors on $dev"
}

scenario direct-ext4 roundtrip direct ext4 64M
scenario buffered-ext4-2conns roundtrip buffered ext4 64M --connections 2
scenario direct-xfs-4096 roundtrip direct xfs 512M --block-size 4096
scenario direct-ext4-2procs roundtrip direct ext4 64M --connections 4 --processes 2
scenario readonly readonly_attach
scenario two-images two_images
scenario killed-server killed_server
scenario mounted-detach mounted_device
scenario busy-device busy_device
scenario slice slice_attach
scenario partitions partitions
scenario table table_attachments
scenario unit-commands unit_commands
[ "$FAILED" -eq 0 ] || fail "$FAILED scenario(s) failed"
