#!/bin/sh
# The user's own path, as README.md shows it, in both modes: create ->
# attach -> mkfs -> mount -> write -> list -> umount -> detach -> fsck; then
# the two modes side by side: write rate, and how much of the image the
# server's page cache holds.  Needs root and a kernel with the NBD driver;
# `make demo` runs it here or, without one, in a VM (nbdloop vm-run).
# Argument: the directory for the images [default: the current one].
set -eu
dir=${1:-$PWD}
mib=${NBDLOOP_DEMO_MIB:-256}
mnt=$(mktemp -d)
report=$(mktemp)
step() { printf '\n== %s\n' "$*"; }

for mode in direct buffered; do
    img=$dir/demo-$mode.img
    step "$mode: nbdloop create $img 1G"
    nbdloop create --force "$img" 1G
    step "$mode: nbdloop attach --mode $mode"
    dev=$(nbdloop attach "$img" --mode "$mode")
    echo "$dev"
    step "$mode: mkfs.ext4 $dev, mount, write $mib MiB with fsync"
    mkfs.ext4 -q -F "$dev"
    mount "$dev" "$mnt"
    start=$(date +%s.%N)
    dd if=/dev/zero of="$mnt/data" bs=1M count="$mib" conv=fsync status=none
    end=$(date +%s.%N)
    cached=$(fincore --bytes --noheadings --output RES "$img")
    step "$mode: nbdloop list"
    nbdloop list
    step "$mode: umount, nbdloop detach $dev, e2fsck -fn"
    umount "$mnt"
    nbdloop detach "$dev"
    e2fsck -fn "$img"
    echo "$mode $start $end $cached" >> "$report"
done

step "the two modes"
awk -v mib="$mib" '
    BEGIN { printf "%-9s %12s %26s\n", "mode", "write MiB/s", "image in the page cache" }
    { printf "%-9s %12.1f %22.1f MiB\n", $1, mib / ($3 - $2), $4 / 1048576 }' "$report"
echo "direct mode leaves the page cache alone: each acknowledged write is on the disk;"
echo "buffered mode keeps the image's data in the page cache, like the classic loop device."
rm -f "$report"
rmdir "$mnt"
