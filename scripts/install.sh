#!/bin/sh
# make install: nbdloop on PATH, its man pages (made now from the click
# definitions, so they cannot drift from --help), bash completion (click's
# own), the systemd units: the daemon nbdloop.service, its socket
# nbdloop.socket and the template nbdloop@.service, and the udev rule
# 60-nbdloop.rules.  Under PREFIX (/usr/local), except the rule: udev reads
# no /usr/local, so with the default PREFIX it goes to /etc/udev/rules.d.
# Also the system group nbdloop, whose members may use the daemon's socket,
# if it is missing.
set -eu
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
bindir=$PREFIX/bin
mandir=$PREFIX/share/man/man1
compdir=$PREFIX/share/bash-completion/completions
unitdir=$PREFIX/lib/systemd/system
if [ "$PREFIX" = /usr/local ]; then
    ruledir=/etc/udev/rules.d
else
    ruledir=$PREFIX/lib/udev/rules.d
fi
mkdir -p "$bindir" "$mandir" "$compdir" "$unitdir" "$ruledir"
ln -sf "$PWD/.venv/bin/nbdloop" "$bindir/nbdloop"
.venv/bin/python scripts/manpages.py "$mandir"
_NBDLOOP_COMPLETE=bash_source .venv/bin/nbdloop > "$compdir/nbdloop"
for unit in nbdloop.service nbdloop.socket nbdloop@.service; do
    sed "s|@BINDIR@|$bindir|g" "systemd/$unit" > "$unitdir/$unit"
done
cp systemd/60-nbdloop.rules "$ruledir/60-nbdloop.rules"
if [ "$PREFIX" = /usr/local ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
# The socket unit and the daemon name the group; only root can make it.
group=""
if ! getent group nbdloop > /dev/null; then
    if [ "$(id -u)" = 0 ]; then
        groupadd --system nbdloop
        group=", and the group nbdloop"
    else
        group=" (no group nbdloop yet: root's make install makes it)"
    fi
fi
# Only a udevd that answers: its control socket outlives it.
if [ "$PREFIX" = /usr/local ] && command -v udevadm > /dev/null \
        && udevadm control --ping > /dev/null 2>&1; then
    udevadm control --reload
fi
echo "installed: $bindir/nbdloop, $(ls "$mandir" | grep -c '^nbdloop') man pages in $mandir,"
echo "  bash completion in $compdir/nbdloop,"
echo "  nbdloop.service, nbdloop.socket and nbdloop@.service in $unitdir,"
echo "  60-nbdloop.rules in $ruledir$group"
