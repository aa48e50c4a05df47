#!/bin/sh
# make install: nbdloop on PATH, its man pages (made now from the click
# definitions, so they cannot drift from --help), bash completion (click's
# own) and the systemd units: the daemon nbdloop.service, its socket
# nbdloop.socket and the template nbdloop@.service.  Under PREFIX
# (/usr/local).
set -eu
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
bindir=$PREFIX/bin
mandir=$PREFIX/share/man/man1
compdir=$PREFIX/share/bash-completion/completions
unitdir=$PREFIX/lib/systemd/system
mkdir -p "$bindir" "$mandir" "$compdir" "$unitdir"
ln -sf "$PWD/.venv/bin/nbdloop" "$bindir/nbdloop"
.venv/bin/python scripts/manpages.py "$mandir"
_NBDLOOP_COMPLETE=bash_source .venv/bin/nbdloop > "$compdir/nbdloop"
for unit in nbdloop.service nbdloop.socket nbdloop@.service; do
    sed "s|@BINDIR@|$bindir|g" "systemd/$unit" > "$unitdir/$unit"
done
if [ "$PREFIX" = /usr/local ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "installed: $bindir/nbdloop, $(ls "$mandir" | grep -c '^nbdloop') man pages in $mandir,"
echo "  bash completion in $compdir/nbdloop,"
echo "  nbdloop.service, nbdloop.socket and nbdloop@.service in $unitdir"
