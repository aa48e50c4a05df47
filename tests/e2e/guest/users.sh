#!/bin/sh
# tests/e2e/test_users_vm.py: a user's own image, grown online, found by name.
# In the one-kernel VM, with Debian's udev running and make install's group,
# rule and units in place, and real users made here (alice and bob in the
# group nbdloop, carol not):
# - own: alice attaches her image (the device and its partitions are hers,
#   0600, kept from the host's automatic machinery, back to root:disk at
#   detach); every refusal in one line with status 2 and nothing left; her
#   device lives through the death of its server, of the daemon and then the
#   server, and a restart; the per-user limit;
# - refs: /dev/nbdloop/by-ref/NAME for root's and a user's device, list's REF
#   column, detach/restart/resize by name, names refused;
# - resize: ext4 and xfs mounted with a writer each, grown by half in both
#   modes (one device root's, one alice's), grown online by resize2fs and
#   xfs_growfs; no writer error, every fsynced file intact, fsck clean; a
#   slice keeps its offset; a shrink refused unless asked and while mounted;
#   a resize during a recovery waits for it.
# Images go in $NBDLOOP_DATA.  Arguments: the scenarios to run (own, refs,
# resize, slice) [default: all].
here=$(dirname "$0")
# shellcheck source=/dev/null
. "$here/product-lib.sh"
MAX_PER_USER=3
export NBDLOOP_MAX_PER_USER=$MAX_PER_USER
STATE=/run/nbdloop/attached

as() {
    # as USER CMD...: CMD as USER, with this PATH (nbdloop is in the venv)
    who=$1
    shift
    runuser -u "$who" -- env PATH="$PATH" HOME="/home/$who" "$@"
}
owner_mode() { stat -c '%U:%G %a' "$1"; }
prop() { udevadm info --query=property --name="$1" | sed -n "s/^$2=//p"; }
field() { sed -n "s/^  \"$2\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$STATE/${1#/dev/}.json"; }
bytes() { echo $(($(cat "/sys/block/${1#/dev/}/size") * 512)); }
server_of() { field "$1" pid; }
recovered() { [ "$(field "$1" recoveries)" = "$2" ] && [ "$(field "$1" state)" = attached ]; }

# lvm_activates DEV VG: a volume group VG with one volume on DEV, left
# inactive, then an add event of DEV: true if udev's rules activated it
lvm_activates() {
    must pvcreate -qq -ff -y "$1"
    must vgcreate -qq "$2" "$1"
    must lvcreate -qq -y -L 8M -n lv "$2"
    must vgchange -qq -an "$2"
    rm -f /run/lvm/pvs_online/* /run/lvm/vgs_online/*
    echo add > "/sys/block/${1#/dev/}/uevent"
    udevadm settle
    dmsetup info "$2-lv" > /dev/null 2>&1
    active=$?
    must vgremove -qq -ff -y "$2"
    must pvremove -qq -ff -y "$1"
    return $active
}

setup() {
    step setup
    start_udev
    must useradd -m -G nbdloop alice
    must useradd -m -G nbdloop bob
    must useradd -m carol
    for u in alice bob carol; do
        mkdir -p "$NBDLOOP_DATA/$u" && chown "$u:" "$NBDLOOP_DATA/$u" && chmod 700 "$NBDLOOP_DATA/$u"
    done
    chmod 755 "$NBDLOOP_DATA"
    # As nbdloop.socket would: a user's command never starts root's daemon.
    setsid nbdloop daemon > /run/nbdloop-daemon.log 2>&1 < /dev/null &
    wait_until 120 "the daemon's start" nbdloop list
}

own() {
    step own-attach
    A=$NBDLOOP_DATA/alice
    must as alice nbdloop create "$A/a.img" 64M > /dev/null
    dev=$(as alice nbdloop attach --ref alice-a "$A/a.img") || fail "alice's attach failed"
    [ "$(owner_mode "$dev")" = "alice:root 600" ] || fail "$dev is $(owner_mode "$dev")"
    udevadm settle
    [ "$(owner_mode "$dev")" = "alice:root 600" ] || fail "after udev: $dev is $(owner_mode "$dev")"
    [ "$(prop "$dev" SYSTEMD_READY)" = 0 ] || fail "$dev has SYSTEMD_READY=$(prop "$dev" SYSTEMD_READY)"
    [ "$(prop "$dev" UDISKS_IGNORE)" = 1 ] || fail "$dev has no UDISKS_IGNORE=1"
    [ "$(readlink -f /dev/nbdloop/by-ref/alice-a)" = "$dev" ] || fail "no by-ref link to $dev"
    [ "$(field "$dev" image)" = "$A/a.img" ] || fail "the record's image is $(field "$dev" image)"

    step own-use
    must as alice qemu-img create -q -f qcow2 "$A/q.qcow2" 8M
    must as alice qemu-io -f qcow2 -c "write -q -P 0x5a 0 1M" "$A/q.qcow2"
    must as alice qemu-img convert -n -O raw "$A/q.qcow2" "$dev"
    as alice qemu-io -f raw -c "read -q -P 0x5a 0 1M" "$dev" > /tmp/qemu-io.out 2>&1 \
        || fail "qemu-io read back: $(cat /tmp/qemu-io.out)"
    grep -q "Pattern verification failed" /tmp/qemu-io.out && fail "qemu-io: $(cat /tmp/qemu-io.out)"
    must as alice mkfs.ext4 -q -L alicefs -U 0a1b2c3d-0000-4000-8000-000000000001 "$dev"
    must as alice dd if=/dev/urandom of="$dev" bs=4k count=1 seek=100 oflag=direct status=none
    must as alice fsck.ext4 -n "$dev" > /dev/null
    echo change > "/sys/block/${dev#/dev/}/uevent"
    udevadm settle
    [ -e /dev/disk/by-label/alicefs ] && fail "alice's filesystem label is a by-label link"
    [ -e /dev/disk/by-uuid/0a1b2c3d-0000-4000-8000-000000000001 ] && fail "alice's UUID is a by-uuid link"
    [ -n "$(prop "$dev" ID_FS_UUID)" ] && fail "udev read alice's filesystem (ID_FS_UUID)"
    [ "$(owner_mode "$dev")" = "alice:root 600" ] || fail "after a change: $dev is $(owner_mode "$dev")"

    step own-machinery
    # LVM and md on alice's device, as root could be tricked into: neither
    # is activated by udev (refs has root's device, where LVM is).
    lvm_activates "$dev" alicevg && fail "alice's LVM volume was activated by udev"
    must wipefs -qa "$dev"
    mdadm --create -q --run /dev/md/alicemd --level=1 --raid-devices=1 --force \
        --metadata=1.2 "$dev" > /dev/null 2>&1 || fail "mdadm --create on $dev"
    must mdadm -q --stop /dev/md/alicemd
    echo add > "/sys/block/${dev#/dev/}/uevent"
    udevadm settle
    grep -q "${dev#/dev/}" /proc/mdstat && fail "alice's md member was assembled: $(cat /proc/mdstat)"
    must mdadm -q --zero-superblock "$dev"
    [ "$(owner_mode "$dev")" = "alice:root 600" ] || fail "after md: $dev is $(owner_mode "$dev")"

    step own-list
    as bob nbdloop list > /tmp/list.bob || fail "bob's list failed"
    grep -q "^$dev .*$A/a.img .* alice-a *alice " /tmp/list.bob || fail "bob's list: $(cat /tmp/list.bob)"

    step own-refusals
    refused "alice's" as bob nbdloop detach "$dev"
    refused "alice's" as bob nbdloop restart alice-a
    refused "alice's" as bob nbdloop resize "$dev"
    must as carol truncate -s 64M "$NBDLOOP_DATA/carol/c.img"
    refused "group nbdloop" as carol nbdloop attach "$NBDLOOP_DATA/carol/c.img"
    refused "group nbdloop" as carol nbdloop list
    install -m 600 /dev/null "$NBDLOOP_DATA/root.img" && truncate -s 64M "$NBDLOOP_DATA/root.img"
    refused "Permission denied" as alice nbdloop attach "$NBDLOOP_DATA/root.img"
    refused "Permission denied" as alice nbdloop attach -r "$NBDLOOP_DATA/root.img"
    as alice ln -s "$NBDLOOP_DATA/root.img" "$A/link.img"
    refused "Permission denied" as alice nbdloop attach "$A/link.img"
    as alice mkdir "$A/dir"
    refused "a directory" as alice nbdloop attach -r "$A/dir"
    as alice mkfifo "$A/fifo"
    refused "regular file" timeout 30 runuser -u alice -- env PATH="$PATH" nbdloop attach -r "$A/fifo"
    refused "Permission denied" as alice nbdloop attach -r /dev/vda
    must as alice nbdloop create "$A/ro.img" 64M > /dev/null
    chmod 444 "$A/ro.img"
    refused "--readonly" as alice nbdloop attach "$A/ro.img"
    must as alice nbdloop create "$A/b.img" 64M > /dev/null
    refused "already attached" as alice nbdloop attach --device "$dev" "$A/b.img"
    refused "root's" as alice nbdloop attach --stats-file "$A/s.json" "$A/b.img"
    refused "root's" as alice nbdloop attach --persist "$A/b.img"
    [ "$(nbdloop list -n -O NAME | wc -l)" -eq 1 ] || fail "a refusal left a device: $(nbdloop list)"
    [ -e /etc/nbdloop/attachments ] && fail "a user's attach wrote the table"

    step own-limit
    must as alice truncate -s 64M "$A/c.img" "$A/d.img"
    b=$(as alice nbdloop attach -r "$A/ro.img") || fail "alice's read-only attach failed"
    c=$(as alice nbdloop attach "$A/c.img") || fail "alice's third attach failed"
    refused "as many as a user may" as alice nbdloop attach "$A/d.img"
    must as bob truncate -s 64M "$NBDLOOP_DATA/bob/x.img"
    bobdev=$(as bob nbdloop attach "$NBDLOOP_DATA/bob/x.img") || fail "bob's attach (alice is at her limit) failed"
    as alice dd if=/dev/zero of="$b" bs=4k count=1 oflag=direct status=none 2> /dev/null \
        && fail "alice's read-only device took a write"
    must as alice nbdloop detach "$b"
    must as alice nbdloop detach "$c"
    must nbdloop detach "$bobdev"     # root may

    step own-survives
    as alice dd if="$dev" bs=4k skip=100 count=1 iflag=direct status=none | sha256sum > /tmp/block
    kill -9 "$(server_of "$dev")"
    wait_until 60 "a recovery of $dev" recovered "$dev" 1
    as alice dd if="$dev" bs=4k skip=100 count=1 iflag=direct status=none | sha256sum | cmp -s - /tmp/block \
        || fail "the block read back after the server's death differs"
    kill -9 "$(pgrep -f 'nbdloop.cli.main daemon')"
    nbdloop list > /dev/null || fail "a new daemon did not answer"
    kill -9 "$(server_of "$dev")"
    wait_until 60 "a recovery of $dev without the first daemon" recovered "$dev" 2
    must nbdloop restart alice-a > /dev/null
    as alice dd if="$dev" bs=4k skip=100 count=1 iflag=direct status=none | sha256sum | cmp -s - /tmp/block \
        || fail "the block read back after the restart differs"
    [ "$(owner_mode "$dev")" = "alice:root 600" ] || fail "after the recoveries: $dev is $(owner_mode "$dev")"
    # Its server's open file is its own: not the one alice sent.
    pid=$(server_of "$dev")
    for fd in /proc/"$pid"/fd/*; do readlink "$fd"; done | grep -qx "$A/a.img" \
        || fail "alice's server has no file of her image"
    # What a user's device costs: a server of its own (printed, not judged).
    echo "NBDLOOP-COST: user_server_pss_kib $(awk '/^Pss:/ { print $2 }' "/proc/$pid/smaps_rollup")"

    step own-partitions
    must as alice nbdloop detach alice-a
    [ "$(owner_mode "$dev")" = "root:disk 660" ] || fail "after detach: $dev is $(owner_mode "$dev")"
    udevadm settle
    [ -e /dev/nbdloop/by-ref/alice-a ] && fail "the by-ref link outlived the detach"
    echo 'label: gpt
,32M
,' | as alice sfdisk -q "$A/a.img" || fail "sfdisk on alice's image failed"
    dev=$(as alice nbdloop attach -P "$A/a.img") || fail "alice's attach -P failed"
    udevadm settle
    for p in "${dev}p1" "${dev}p2"; do
        [ "$(owner_mode "$p")" = "alice:root 600" ] || fail "$p is $(owner_mode "$p")"
        [ "$(prop "$p" SYSTEMD_READY)" = 0 ] || fail "$p is not kept from systemd"
    done
    # A rescan of the partition table makes them anew; udev gives them to her.
    must blockdev --rereadpt "$dev"
    udevadm settle
    for p in "${dev}p1" "${dev}p2"; do
        [ "$(owner_mode "$p")" = "alice:root 600" ] || fail "after a rescan $p is $(owner_mode "$p")"
    done
    must as alice nbdloop detach "$dev"
    [ -e "/run/nbdloop/devices/${dev#/dev/}" ] && fail "the udev properties of $dev outlived it"
    [ -e "${dev}p1" ] && [ "$(owner_mode "${dev}p1")" != "root:disk 660" ] && fail "${dev}p1 is still alice's"
    return 0
}

refs() {
    step refs
    must truncate -s 64M "$NBDLOOP_DATA/r.img"
    r=$(nbdloop attach --ref data-r "$NBDLOOP_DATA/r.img") || fail "root's attach --ref failed"
    udevadm settle
    [ "$(readlink -f /dev/nbdloop/by-ref/data-r)" = "$r" ] || fail "no by-ref link for root's $r"
    [ "$(owner_mode "$r")" = "root:disk 660" ] || fail "root's $r is $(owner_mode "$r")"
    [ "$(nbdloop list -n -O REF)" = data-r ] || fail "list's REF: $(nbdloop list -n -O REF)"
    must as alice nbdloop create "$NBDLOOP_DATA/alice/e.img" 64M > /dev/null
    refused "taken by $r" as alice nbdloop attach --ref data-r "$NBDLOOP_DATA/alice/e.img"
    # The controls: on root's device, udev does make the links, and LVM activates.
    must mkfs.ext4 -q -L rootfs "$r"
    echo change > "/sys/block/${r#/dev/}/uevent"
    udevadm settle
    [ -e /dev/disk/by-label/rootfs ] || fail "root's filesystem got no by-label link"
    lvm_activates "$r" rootvg || fail "root's LVM volume was not activated: the check shows nothing"
    # The table takes ref=, and a user cannot take a name it gives.
    must truncate -s 64M "$NBDLOOP_DATA/t.img"
    mkdir -p /etc/nbdloop
    echo "$NBDLOOP_DATA/t.img ref=boot-disk" > /etc/nbdloop/attachments
    refused "root's" as alice nbdloop attach --ref boot-disk "$NBDLOOP_DATA/alice/e.img"
    must nbdloop attach --all > /dev/null
    udevadm settle
    t=$(readlink -f /dev/nbdloop/by-ref/boot-disk)
    [ "$(nbdloop list -n -O NAME,REF | awk '$2 == "boot-disk" { print $1 }')" = "$t" ] \
        || fail "the table's line with ref= did not give its device the name"
    must nbdloop detach --all
    for bad in ../x a/b . .. "$(printf 'x%.0s' $(seq 65))"; do
        refused "reference name" nbdloop attach --ref "$bad" "$NBDLOOP_DATA/alice/e.img"
    done
    must nbdloop detach data-r
    udevadm settle
    [ -e /dev/nbdloop/by-ref/data-r ] && fail "the by-ref link outlived the detach"
    rm -f /etc/nbdloop/attachments
    [ "$(nbdloop list | wc -l)" -eq 0 ] || fail "something is left: $(nbdloop list)"
}

# grow DEV MNT SUMS: the device and the filesystem on it grown by half,
# with the writer on it running
grow() {
    before=$(bytes "$1")
    after=$((before * 3 / 2))
    read -r t0 _ < /proc/uptime
    nbdloop resize "$1" "$after" > /tmp/resize.out 2>&1 || fail "resize $1 $after: $(cat /tmp/resize.out)"
    read -r t1 _ < /proc/uptime
    echo "NBDLOOP-COST: resize_seconds $(echo "$t0 $t1" | awk '{ printf "%.2f", $2 - $1 }')"
    [ "$(bytes "$1")" -eq "$after" ] || fail "$1 is $(bytes "$1") bytes after the resize to $after"
    [ "$(lsblk -bno SIZE "$1")" -eq "$after" ] || fail "lsblk says $(lsblk -bno SIZE "$1")"
    [ "$(nbdloop list -n -O NAME,SIZE | awk -v d="$1" '$1 == d { print $2 }')" -eq "$after" ] \
        || fail "list says $(nbdloop list -n -O NAME,SIZE)"
    case $(findmnt -no FSTYPE "$2") in
        ext4) resize2fs "$1" > /tmp/grow.out 2>&1 || fail "resize2fs: $(cat /tmp/grow.out)" ;;
        xfs) xfs_growfs "$2" > /tmp/grow.out 2>&1 || fail "xfs_growfs: $(cat /tmp/grow.out)" ;;
    esac
    have=$(df -B1 --output=size "$2" | tail -n 1)
    [ "$have" -gt "$before" ] || fail "$2 has $have bytes after growing $1 to $after"
}

resize() {
    # resize MODE_EXT4 MODE_XFS: ext4 on root's device, xfs on alice's
    step "resize-$1-$2"
    img_a=$NBDLOOP_DATA/g-ext4.img img_b=$NBDLOOP_DATA/alice/g-xfs.img
    rm -f "$img_a" "$img_b"
    must truncate -s 320M "$img_a"
    must as alice truncate -s 320M "$img_b"
    # A short request timeout: what the killed server had read is resent soon.
    a=$(nbdloop attach --mode "$1" --timeout 5 "$img_a") || fail "attach $img_a"
    b=$(as alice nbdloop attach --mode "$2" --ref alice-xfs "$img_b") || fail "alice's attach $img_b"
    must mkfs.ext4 -q "$a"
    must mkfs.xfs -q "$b"
    must mount "$a" /mnt/a
    must mount "$b" /mnt/b
    rm -f /tmp/stop /tmp/sums.a /tmp/sums.b
    writer /mnt/a /tmp/sums.a /tmp/stop > /tmp/writer.a 2>&1 &
    wa=$!
    writer /mnt/b /tmp/sums.b /tmp/stop > /tmp/writer.b 2>&1 &
    wb=$!
    sleep 2
    refused "--shrink" nbdloop resize "$a" 64M
    refused "mounted" nbdloop resize --shrink "$a" 64M
    step "resize-$1-$2-root"
    grow "$a" /mnt/a
    step "resize-$1-$2-alice"
    # alice's: grown through her own file, by her.
    before=$(bytes "$b")
    as alice nbdloop resize alice-xfs $((before * 3 / 2)) > /tmp/resize.out 2>&1 \
        || fail "alice's resize: $(cat /tmp/resize.out)"
    [ "$(stat -c %U "$img_b")" = alice ] || fail "alice's image changed hands"
    [ "$(bytes "$b")" -eq $((before * 3 / 2)) ] || fail "alice's $b is $(bytes "$b") bytes"
    xfs_growfs /mnt/b > /tmp/grow.out 2>&1 || fail "xfs_growfs: $(cat /tmp/grow.out)"
    step "resize-$1-$2-recovering"
    # During a recovery: the resize waits for it.
    kill -9 "$(server_of "$a")"
    grow "$a" /mnt/a
    step "resize-$1-$2-verify"
    sleep 2
    touch /tmp/stop
    wait "$wa" || fail "the ext4 writer failed: $(tail -n 3 /tmp/writer.a)"
    wait "$wb" || fail "the xfs writer failed: $(tail -n 3 /tmp/writer.b)"
    (cd /mnt/a && sha256sum -c --quiet /tmp/sums.a) || fail "an fsynced file on ext4 differs"
    (cd /mnt/b && sha256sum -c --quiet /tmp/sums.b) || fail "an fsynced file on xfs differs"
    kernel_log_clean "$a"
    kernel_log_clean "$b"
    must umount /mnt/a
    must umount /mnt/b
    fsck.ext4 -fn "$a" > /tmp/fsck.out 2>&1 || fail "fsck.ext4: $(tail -n 3 /tmp/fsck.out)"
    xfs_repair -n "$b" > /tmp/fsck.out 2>&1 || fail "xfs_repair -n: $(tail -n 3 /tmp/fsck.out)"
    must nbdloop detach "$a"
    must nbdloop detach "$b"
}

slice() {
    step slice
    must truncate -s 64M "$NBDLOOP_DATA/s.img"
    s=$(nbdloop attach --offset 1M --sizelimit 32M "$NBDLOOP_DATA/s.img") || fail "attach a slice"
    must nbdloop resize --preallocate "$s" 96M > /dev/null
    [ "$(bytes "$s")" -eq $((96 << 20)) ] || fail "the slice is $(bytes "$s") bytes"
    # The new 33 MiB written, not left as a hole.
    [ "$(du -B1M "$NBDLOOP_DATA/s.img" | cut -f1)" -ge 33 ] || fail "--preallocate wrote $(du -h "$NBDLOOP_DATA/s.img")"
    [ "$(stat -c %s "$NBDLOOP_DATA/s.img")" -eq $((97 << 20)) ] || fail "the image is $(stat -c %s "$NBDLOOP_DATA/s.img")"
    [ "$(nbdloop list -n -O OFFSET,SIZELIMIT)" = "$(printf '%s %s' $((1 << 20)) $((96 << 20)))" ] \
        || fail "list: $(nbdloop list -n -O OFFSET,SIZELIMIT)"
    must nbdloop resize --shrink "$s" 32M > /dev/null
    [ "$(bytes "$s")" -eq $((32 << 20)) ] || fail "the slice is $(bytes "$s") bytes after --shrink"
    must nbdloop detach "$s"
}

wanted() { [ -z "$ONLY" ] || case " $ONLY " in *" $1 "*) true ;; *) false ;; esac; }
ONLY=$*
setup
wanted own && scenario own own
wanted refs && scenario refs refs
wanted resize && scenario resize-direct-buffered resize direct buffered
wanted resize && scenario resize-buffered-direct resize buffered direct
wanted slice && scenario slice slice
stop_udev
pkill -f "nbdloop.cli.main daemon"
[ "$FAILED" -eq 0 ]
