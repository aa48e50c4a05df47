#!/bin/sh
# Install whatever nbdloop needs on Debian 12 and build it into .venv.
# Idempotent: a second run with everything present installs nothing.
set -eu
cd "$(dirname "$0")/.."

APT_PACKAGES="nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd
  liburing-dev python3-dev python3-venv python3-pip python3-setuptools
  python3-cffi libffi-dev gcc make fio qemu-utils qemu-system-x86 nbd-client
  socat busybox-static cpio kmod e2fsprogs xfsprogs fuse3 util-linux shellcheck
  procps psmisc linux-perf fdisk man-db systemd python3-systemd
  libtcmalloc-minimal4 udev lvm2 mdadm"

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing$missing"
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing packages:$missing (run as root, or apt-get install them)" >&2
        exit 2
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The venv uses Debian's python3: nbdkit embeds that interpreter, so the
# extension is built for, and with the same cffi as, what the plugin runs.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
    rm -rf .venv
    $PY -m venv --system-site-packages .venv
fi
stamp=.venv/.nbdloop-built
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py cffi_build -newer "$stamp" 2>/dev/null)" ] \
        || ! ls nbdloop/engine/_uring*.so >/dev/null 2>&1; then
    .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation \
        --config-settings editable_mode=compat -e '.[test,bench,doc]'
    touch "$stamp"
fi
