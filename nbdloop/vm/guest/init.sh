#!/bin/sh
# The guest's /init (busybox sh), built into the cached base initramfs; its
# content is part of the cache key (nbdloop/vm/assets.py).
#
# It loads the modules listed in /etc/nbdloop/modules, configures the one
# network interface, runs the per-run script /nbdloop/script.sh (which
# run_guest appends to the initramfs, with its payload files under
# $NBDLOOP_PAYLOAD), prints the verdict and then powers the VM off
# (``reboot -f`` with qemu's -no-reboot). If anything kills /init, the kernel
# panics, reboots after panic=-1 and qemu exits with no verdict, which the
# host also reports as a failure.
#
# The script sees, in its environment:
#   NBDLOOP_REASON   a file for a one-line reason, read when it fails
#   NBDLOOP_PAYLOAD  the directory of run_guest's payload files
#                    (GUEST_PAYLOAD_DIR in nbdloop/vm/runner.py)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

verdict() {
    echo "NBDLOOP-VERDICT: $*"
    sync
    reboot -f
    sleep 10
    echo b > /proc/sysrq-trigger
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt /run /root

echo "NBDLOOP-GUEST: loading modules"
while read -r module; do
    insmod "/lib/modules/$module.ko" || verdict "FAIL boot: insmod $module failed"
done < /etc/nbdloop/modules

echo "NBDLOOP-GUEST: configuring network"
ip link set lo up
tries=0
while [ ! -e /sys/class/net/eth0 ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 50 ] && verdict "FAIL boot: no eth0 appeared"
    sleep 0.1
done
ip addr add 10.0.2.15/24 dev eth0 || verdict "FAIL boot: ip addr add failed"
ip link set eth0 up || verdict "FAIL boot: ip link set eth0 up failed"
ip route add default via 10.0.2.2 || verdict "FAIL boot: ip route add failed"

if [ ! -f /nbdloop/script.sh ]; then
    verdict "FAIL boot: no guest script in the initramfs"
fi
export NBDLOOP_REASON=/tmp/nbdloop-reason
export NBDLOOP_PAYLOAD=/nbdloop/payload
echo "NBDLOOP-GUEST: running script"
sh /nbdloop/script.sh
rc=$?
if [ "$rc" -eq 0 ]; then
    verdict PASS
elif [ -s "$NBDLOOP_REASON" ]; then
    verdict "FAIL $(head -n 1 "$NBDLOOP_REASON")"
else
    verdict "FAIL script exited with status $rc"
fi
