#!/bin/sh
# The product VM's /init, built into its cached initramfs; its content is
# part of the cache key (nbdloop/vm/product.py). Two stages, one file:
#
# Stage 1, `/init` from the initramfs (busybox sh): load the modules listed
# in /etc/nbdloop/modules (parameters from /etc/nbdloop/modparams/NAME, one
# a line), mount the host's root (9p tag "host", read-only) on /ro, a tmpfs
# on /rw and an overlay of the two on /newroot; copy this file, busybox and
# the per-run argv and keep list (/nbdloop/run/, appended by run_product) into
# /newroot/.nbdloop, and switch_root into the overlay, where the host's
# /bin/sh runs this file again as `init stage2`.
#
# Stage 2, PID 1 in the overlay (the host's /bin/sh): mount proc, sysfs,
# devtmpfs, devpts, and fresh tmpfs on /dev/shm, /run and /tmp (the host's
# own are in the lower layer and must not show through), and bind the host
# directories listed in keep back over them at their own paths; mount the data
# disk /dev/vda on /data; run the argv (run_product makes it: env -i, the
# script's environment, /bin/sh SCRIPT ARGS...) in /data; then unmount what
# it can, stop what is left, print the verdict and power the VM off
# (busybox `reboot -f` with qemu's -no-reboot: the host's reboot is
# systemd's). If this file dies, the kernel panics, reboots after panic=-1
# and qemu exits with no verdict, which the host reports as a failure.
#
# The guest's /lib/modules is the host's (another kernel): every module is
# loaded in stage 1.
#
# Fixed paths that nbdloop/vm/product.py also names (GUEST_DATA_DIR,
# GUEST_REASON_FILE, GUEST_RUN_DIR):
#   /data                    the data disk's mount point ($NBDLOOP_DATA)
#   /run/nbdloop-vm/reason   the script's one-line failure reason ($NBDLOOP_REASON)
#   /.nbdloop                stage 2's files, in the overlay's tmpfs
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

RUN=/.nbdloop
DATA=/data
REASON=/run/nbdloop-vm/reason
BUSYBOX=/bin/busybox

verdict() {
    echo "NBDLOOP-VERDICT: $*"
    sync
    "$BUSYBOX" reboot -f
    sleep 10
    echo b > /proc/sysrq-trigger
}

load_module() {
    name=$1
    set -- "/lib/modules/$name.ko"
    if [ -f "/etc/nbdloop/modparams/$name" ]; then
        while IFS= read -r param; do
            set -- "$@" "$param"
        done < "/etc/nbdloop/modparams/$name"
    fi
    insmod "$@"
}

stage1() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev

    echo "NBDLOOP-GUEST: loading modules"
    while read -r module; do
        load_module "$module" || verdict "FAIL boot: insmod $module failed"
    done < /etc/nbdloop/modules
    ip link set lo up

    echo "NBDLOOP-GUEST: mounting the host's root"
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose host /ro \
        || verdict "FAIL boot: mount of the host's root (9p) failed"
    mount -t tmpfs -o mode=0755 tmpfs /rw || verdict "FAIL boot: mount tmpfs /rw failed"
    mkdir /rw/upper /rw/work
    mount -t overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
        || verdict "FAIL boot: mount of the overlay failed"
    [ -f /nbdloop/run/argv ] || verdict "FAIL boot: no argv in the initramfs"
    [ -x /newroot/bin/sh ] || verdict "FAIL boot: the host's root has no /bin/sh"
    mkdir -p "/newroot$RUN" || verdict "FAIL boot: mkdir $RUN in the overlay failed"
    for file in /init /bin/busybox /nbdloop/run/argv /nbdloop/run/keep; do
        cp "$file" "/newroot$RUN/${file##*/}" \
            || verdict "FAIL boot: copying $file into the overlay failed"
    done
    # The host's root once more, beside the overlay, for what stage 2 must
    # show again under the tmpfs it mounts (a checkout under /tmp).
    mkdir -p "/newroot$RUN/host" || verdict "FAIL boot: mkdir $RUN/host failed"
    mount -o bind /ro "/newroot$RUN/host" || verdict "FAIL boot: bind mount of the host's root failed"
    umount /proc /sys /dev
    echo "NBDLOOP-GUEST: switching root"
    # If this fails, sh exits, /init dies and the kernel panics: no verdict.
    exec switch_root /newroot /bin/sh "$RUN/init" stage2
}

# Mount points in the reverse order of /proc/mounts, one a line, except
# those stage 2 mounted for itself and the data disk.
mounts_to_unmount() {
    list=
    while read -r _ mnt _; do
        case $mnt in
            /|/proc|/sys|/dev|/dev/pts|/dev/shm|/run|/tmp|"$DATA") ;;
            *) list="$mnt
$list" ;;
        esac
    done < /proc/mounts
    printf '%s' "$list"
}

# True while a process other than this one (PID 1) is alive: kernel
# threads and zombies have no /proc/PID/exe to follow.
processes_left() {
    for dir in /proc/[0-9]*; do
        [ "$dir" = /proc/1 ] && continue
        [ -e "$dir/exe" ] && return 0
    done
    return 1
}

cleanup() {
    read -r uptime _ < /proc/uptime
    echo "NBDLOOP-GUEST: cleaning up (uptime $uptime s)"
    cd / || true
    sync
    mounts_to_unmount | while IFS= read -r mnt; do
        umount "$mnt" 2>/dev/null || echo "NBDLOOP-GUEST: cannot unmount $mnt"
    done
    kill -s TERM -1 2>/dev/null
    tries=0
    while processes_left; do
        tries=$((tries + 1))
        if [ "$tries" -gt 50 ]; then
            echo "NBDLOOP-GUEST: processes left after SIGTERM; sending SIGKILL"
            kill -s KILL -1 2>/dev/null
            sleep 0.2
            break
        fi
        sleep 0.1
    done
    sync
    if ! umount "$DATA"; then
        echo "NBDLOOP-GUEST: cannot unmount $DATA; remounting it read-only"
        mount -o remount,ro "$DATA"
    fi
    sync
}

stage2() {
    BUSYBOX=$RUN/busybox
    mount -t proc proc /proc || verdict "FAIL boot: mount /proc failed"
    mount -t sysfs sysfs /sys || verdict "FAIL boot: mount /sys failed"
    mount -t devtmpfs devtmpfs /dev || verdict "FAIL boot: mount /dev failed"
    mkdir -p /dev/pts /dev/shm
    mount -t devpts -o mode=620,ptmxmode=666 devpts /dev/pts \
        || verdict "FAIL boot: mount /dev/pts failed"
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm || verdict "FAIL boot: mount /dev/shm failed"
    mount -t tmpfs -o mode=0755 tmpfs /run || verdict "FAIL boot: mount /run failed"
    mount -t tmpfs -o mode=1777 tmpfs /tmp || verdict "FAIL boot: mount /tmp failed"
    # Host directories that those tmpfs hide but the script needs (the
    # checkout and its venv, when they live under /tmp): the same path again.
    while IFS= read -r keep; do
        mkdir -p "$keep" || verdict "FAIL boot: mkdir $keep failed"
        mount -o bind "$RUN/host$keep" "$keep" \
            || verdict "FAIL boot: bind mount of the host's $keep failed"
    done < "$RUN/keep"
    mkdir -p "${REASON%/*}" "$DATA" || verdict "FAIL boot: mkdir $DATA failed"
    [ -b /dev/vda ] || verdict "FAIL boot: no data disk /dev/vda"
    mount /dev/vda "$DATA" || verdict "FAIL boot: mount of the data disk /dev/vda failed"

    set --
    while IFS= read -r arg; do
        set -- "$@" "$arg"
    done < "$RUN/argv"
    [ "$#" -gt 0 ] || verdict "FAIL boot: empty argv"
    cd "$DATA" || verdict "FAIL boot: cd $DATA failed"
    read -r uptime _ < /proc/uptime
    echo "NBDLOOP-GUEST: running script (uptime $uptime s)"
    "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        result=PASS
    elif [ -s "$REASON" ]; then
        result="FAIL $(head -n 1 "$REASON")"
    else
        result="FAIL script exited with status $rc"
    fi
    cleanup
    verdict "$result"
}

if [ "${1-}" = stage2 ]; then
    stage2
else
    stage1
fi
