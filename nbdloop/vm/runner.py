"""Run the real Linux kernel NBD client in a throwaway VM.

The host kernel has no NBD client, so tests that need one boot Debian's stock
kernel under qemu (TCG) with a small busybox initramfs. The guest's only way
out is one TCP address, 10.0.2.100:10809, which qemu forwards to a unix socket
on the host (one ``socat`` per guest connection, so ``nbd-client -C N`` works).

Three pieces:

* :func:`ensure_assets` builds, once, a kernel and a base initramfs (busybox,
  the needed modules, ``nbd-client``, ``mkfs.ext4``, ``e2fsck``, ``mkfs.xfs``,
  ``xfs_repair`` and their shared libraries) and caches them, keyed on the
  package versions they came from.
* :func:`run_guest` boots that kernel, runs one shell script in the guest and
  returns the script's verdict and the whole serial console.
* :func:`kernel_check_script` writes the standard script: connect, mkfs,
  mount, write files, verify, fsck, remount, verify again, disconnect.

This module is pure standard library. It never imports nbdkit or nbdloop's
compiled extension, so it also runs where those are not built yet.
"""
from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

#: The address at which the guest reaches the host's NBD server.
GUEST_SERVER_HOST = "10.0.2.100"
GUEST_SERVER_PORT = 10809
#: The NBD device the kernel check uses in the guest.
GUEST_NBD_DEVICE = "/dev/nbd0"
#: Where :func:`run_guest` puts its ``payload`` files inside the guest.
GUEST_PAYLOAD_DIR = "/nbdloop/payload"

VERDICT_MARKER = "NBDLOOP-VERDICT:"
STEP_MARKER = "NBDLOOP-STEP:"

#: Bump when the layout of the cached assets changes without a package change.
_ASSET_FORMAT = 1

#: The Debian metapackage that names the current kernel image package.
_KERNEL_METAPACKAGE = "linux-image-amd64"

#: Modules the guest loads, besides their dependencies. Dependencies come from
#: each module's own ``depends=`` field. ``crc32c_generic`` is named here
#: because ext4, jbd2 and libcrc32c want it only as a soft dependency
#: (``softdep pre: crypto-crc32c``), which names an alias, not a module.
_MODULE_ROOTS = ("virtio_pci", "virtio_net", "nbd", "crc32c_generic", "ext4", "xfs")

#: Tools the guest needs from the host, and the Debian package of each.
_GUEST_TOOLS = {
    "nbd-client": "nbd-client",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "xfs_repair": "xfsprogs",
}
#: Host packages whose files go into the initramfs; their versions key the cache.
_HOST_PACKAGES = ("busybox-static", "nbd-client", "e2fsprogs", "xfsprogs")
_BUSYBOX = "/bin/busybox"
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Extra files copied from the host when present (mke2fs reads its defaults here).
_HOST_CONFIG_FILES = ("/etc/mke2fs.conf",)

_APT_LISTS = Path("/var/lib/apt/lists")

_KERNEL_CMDLINE = "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"

# The guest's /init. It runs the per-run script, prints the verdict and then
# powers the VM off (``reboot -f`` with qemu's -no-reboot). If anything kills
# /init, the kernel panics, reboots after panic=-1 and qemu exits with no
# verdict, which the host also reports as a failure.
_INIT = r"""#!/bin/sh
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
"""


class VmError(RuntimeError):
    """The VM cannot be built or started: a tool or package is missing."""


@dataclasses.dataclass(frozen=True)
class VmAssets:
    """A kernel image and a base initramfs that fit together."""

    kernel: Path
    initrd: Path
    #: The kernel's release, e.g. ``6.1.0-56-amd64``.
    kernel_release: str = ""
    #: The Debian version of the kernel package, e.g. ``6.1.192-2``.
    kernel_version: str = ""
    #: The modules /init loads, in load order.
    modules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What happened in one guest run."""

    #: True only when the guest printed ``NBDLOOP-VERDICT: PASS``.
    ok: bool
    #: ``PASS``, or ``FAIL <reason>``; the host writes the reason itself when
    #: the guest timed out or stopped without a verdict.
    verdict: str
    #: The whole serial console (kernel log, guest output) and qemu's stderr.
    console: str
    #: Wall-clock seconds from starting qemu until it exited or was killed.
    elapsed: float
    timed_out: bool = False
    #: What the per-connection socat processes logged (errors only).
    socat_log: str = ""

    def tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the console."""
        return "\n".join(self.console.splitlines()[-lines:])

    @property
    def message(self) -> str:
        """The verdict, then (on failure) the last 30 console lines."""
        if self.ok:
            return self.verdict
        text = f"{self.verdict}\n--- last 30 console lines ---\n{self.tail(30)}"
        if self.socat_log:
            text += f"\n--- socat log ---\n{self.socat_log.rstrip()}"
        return text

    @property
    def steps(self) -> list[str]:
        """The ``NBDLOOP-STEP:`` markers the guest script printed, in order."""
        return re.findall(rf"{STEP_MARKER} (\S+)", self.console)


@dataclasses.dataclass(frozen=True)
class KernelCheck:
    """A kernel-check guest script and what it needs and promises."""

    #: The busybox sh script to pass to :func:`run_guest`.
    script: str
    #: Files to pass as ``run_guest(payload=...)``.
    payload: dict[str, bytes]
    #: Path inside the filesystem (no leading slash) -> sha256 hex of its content.
    expected_sha256: dict[str, str]


# ---------------------------------------------------------------------------
# Assets


def default_cache_dir() -> Path:
    """Return ``$NBDLOOP_CACHE``, or ``~/.cache/nbdloop/vm``."""
    env = os.environ.get("NBDLOOP_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "nbdloop" / "vm"


def ensure_assets(cache_dir: Path | None = None) -> VmAssets:
    """Return the cached kernel and base initramfs, building them if needed.

    A build downloads the kernel package with ``apt-get download`` and unpacks
    it with ``dpkg-deb -x``; busybox and the guest tools come from the host's
    installed packages. With a current cache this runs one ``dpkg-query`` and
    reads two small files.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    host_versions = _host_package_versions()
    kernel_package, kernel_version = _kernel_package(cache_dir)
    release = kernel_package.removeprefix("linux-image-")
    recipe = {
        "format": _ASSET_FORMAT,
        "kernel": [kernel_package, kernel_version],
        "host": host_versions,
        "modules": _MODULE_ROOTS,
        "tools": _GUEST_TOOLS,
        "init": _INIT,
        "cmdline": _KERNEL_CMDLINE,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    entry = cache_dir / f"{release}_{kernel_version}_{key}"
    assets = _load_entry(entry)
    if assets is not None:
        return assets
    with _locked(cache_dir / ".lock"):
        assets = _load_entry(entry)
        if assets is not None:
            return assets
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            _build_entry(build, kernel_package, kernel_version, recipe)
            build.chmod(0o755)
            os.rename(build, entry)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    assets = _load_entry(entry)
    if assets is None:
        raise VmError(f"building VM assets in {entry} left no usable manifest")
    return assets


def _load_entry(entry: Path) -> VmAssets | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    kernel = entry / "vmlinuz"
    initrd = entry / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return VmAssets(
        kernel=kernel,
        initrd=initrd,
        kernel_release=manifest["kernel_release"],
        kernel_version=manifest["kernel_version"],
        modules=tuple(manifest["modules"]),
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _require_tool(name: str, package: str) -> str:
    found = shutil.which(name, path=_SBIN_PATH)
    if found is None:
        raise VmError(f"{name} not found: install the Debian package {package}")
    return found


def _host_package_versions() -> dict[str, str]:
    dpkg_query = _require_tool("dpkg-query", "dpkg")
    proc = subprocess.run(
        [dpkg_query, "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n", *_HOST_PACKAGES],
        capture_output=True,
        text=True,
    )
    versions = {}
    for line in proc.stdout.splitlines():
        name, version, status = line.split("\t")
        if status.startswith("ii"):
            versions[name] = version
    missing = [p for p in _HOST_PACKAGES if p not in versions]
    if missing:
        raise VmError(
            "the VM initramfs is built from host packages that are not installed: "
            f"apt-get install {' '.join(missing)}"
        )
    return versions


def _apt_lists_stamp() -> list[list]:
    """Sizes and mtimes of apt's package lists; apt-get update changes them."""
    stamp = []
    paths = [*_APT_LISTS.glob("*"), Path("/etc/apt/preferences"), Path("/etc/apt/preferences.d")]
    for path in sorted(paths):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        stamp.append([str(path), st.st_size, st.st_mtime_ns])
    return stamp


def _kernel_package(cache_dir: Path) -> tuple[str, str]:
    """Resolve linux-image-amd64 to (``linux-image-<release>``, version).

    apt-cache takes about half a second, so the answer is remembered until
    apt's package lists change.
    """
    memo = cache_dir / "kernel-package.json"
    stamp = _apt_lists_stamp()
    try:
        known = json.loads(memo.read_text())
        if known["stamp"] == stamp:
            return known["package"], known["version"]
    except (FileNotFoundError, ValueError, KeyError):
        pass
    apt_cache = _require_tool("apt-cache", "apt")
    proc = subprocess.run(
        [apt_cache, "show", "--no-all-versions", _KERNEL_METAPACKAGE],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise VmError(
            f"apt-cache show {_KERNEL_METAPACKAGE} failed (run apt-get update?): "
            f"{proc.stderr.strip()}"
        )
    fields = dict(re.findall(r"^(Version|Depends): (.*)$", proc.stdout, re.MULTILINE))
    depends = re.search(r"\b(linux-image-\d[^\s,(]*)", fields.get("Depends", ""))
    if depends is None or "Version" not in fields:
        raise VmError(f"apt-cache show {_KERNEL_METAPACKAGE} names no linux-image package")
    package, version = depends.group(1), fields["Version"]
    fd, tmp = tempfile.mkstemp(prefix=".kernel-package-", dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        json.dump({"stamp": stamp, "package": package, "version": version}, f)
    os.replace(tmp, memo)
    return package, version


def _build_entry(out: Path, kernel_package: str, kernel_version: str, recipe: dict) -> None:
    """Download and unpack the kernel, then write vmlinuz and initrd.img into ``out``."""
    apt_get = _require_tool("apt-get", "apt")
    dpkg_deb = _require_tool("dpkg-deb", "dpkg")
    _require_tool("ldd", "libc-bin")
    work = out / "work"
    work.mkdir()
    cmd = [apt_get, "download", "-q"]
    if os.geteuid() == 0:
        # As root apt drops to the _apt user, which cannot write here.
        cmd += ["-o", "APT::Sandbox::User=root"]
    cmd.append(f"{kernel_package}={kernel_version}")
    _run(cmd, cwd=work)
    debs = list(work.glob("*.deb"))
    if len(debs) != 1:
        raise VmError(f"apt-get download {kernel_package} left {len(debs)} .deb files in {work}")
    root = work / "root"
    _run([dpkg_deb, "-x", str(debs[0]), str(root)])
    release = kernel_package.removeprefix("linux-image-")
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    moddir = root / "lib" / "modules" / release
    if not vmlinuz.is_file() or not moddir.is_dir():
        raise VmError(f"{debs[0].name} has no boot/vmlinuz-{release} or lib/modules/{release}")

    modules = _module_load_order(moddir, _MODULE_ROOTS)
    archive = _CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "dev", "proc",
              "sys", "tmp", "mnt", "run", "root", "nbdloop"):
        archive.add_dir(d)
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    archive.add_file("init", _INIT.encode(), 0o755)
    archive.add_file("etc/nbdloop/modules", "".join(f"{m}\n" for m, _ in modules).encode())
    for name, path in modules:
        archive.add_file(f"lib/modules/{name}.ko", path.read_bytes())
    for config in _HOST_CONFIG_FILES:
        if os.path.isfile(config):
            archive.add_file(config.lstrip("/"), Path(config).read_bytes())

    executables = [_BUSYBOX]
    shipped = set()
    for tool, package in _GUEST_TOOLS.items():
        found = _require_tool(tool, package)
        real = os.path.realpath(found)
        archive.add_file(f"usr/sbin/{os.path.basename(real)}", Path(real).read_bytes(), 0o755)
        if os.path.basename(real) != tool:
            archive.add_symlink(f"usr/sbin/{tool}", os.path.basename(real))
        shipped.update((tool, os.path.basename(real)))
        executables.append(real)
    archive.add_file("bin/busybox", Path(_BUSYBOX).read_bytes(), 0o755)
    applets = _run([_BUSYBOX, "--list-full"]).split()
    for applet in applets:
        if os.path.basename(applet) not in shipped and applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")
    for lib in sorted({lib for exe in executables for lib in _shared_libraries(exe)}):
        archive.add_file(lib.lstrip("/"), Path(lib).read_bytes(), 0o755)

    initrd = gzip.compress(archive.finish(), compresslevel=6, mtime=0)
    # Pad so that an uncompressed cpio appended by run_guest starts 4-aligned.
    initrd += b"\0" * (-len(initrd) % 4)
    (out / "initrd.img").write_bytes(initrd)
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    shutil.rmtree(work)
    manifest = {
        "kernel_package": kernel_package,
        "kernel_version": kernel_version,
        "kernel_release": release,
        "modules": [m for m, _ in modules],
        "recipe": recipe,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VmError(
            f"{shlex.join(cmd)} failed with status {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout


def _shared_libraries(executable: str) -> list[str]:
    """Return the absolute paths of the libraries (and loader) ``executable`` needs."""
    proc = subprocess.run(["ldd", executable], capture_output=True, text=True)
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise VmError(f"ldd {executable} failed: {proc.stderr.strip()}")
    libs = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise VmError(f"ldd {executable}: a library is missing: {line}")
        m = re.match(r"\S+ => (/\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _modinfo(path: Path) -> dict[str, list[str]]:
    """Read the ``key=value`` strings of a kernel module's .modinfo ELF section."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise VmError(f"{path} is not a little-endian ELF64 module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize
        )
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        name, offset, size = section(index)
        end = data.index(b"\0", names_offset + name)
        if data[names_offset + name:end] != b".modinfo":
            continue
        for item in data[offset:offset + size].split(b"\0"):
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info
    raise VmError(f"{path} has no .modinfo section")


def _module_load_order(moddir: Path, roots: Sequence[str]) -> list[tuple[str, Path]]:
    """Return (name, path) for ``roots`` and their dependencies, dependencies first."""
    available = {}
    for path in (moddir / "kernel").rglob("*.ko"):
        available[path.name[:-3].replace("-", "_")] = path
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        for line in builtin_file.read_text().splitlines():
            builtin.add(Path(line).name.removesuffix(".ko").replace("-", "_"))
    order: list[tuple[str, Path]] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, wanted_by: str) -> None:
        name = name.replace("-", "_")
        if name in placed or name in builtin and name not in available:
            return
        if name in visiting:
            raise VmError(f"kernel modules depend on each other in a cycle through {name}")
        path = available.get(name)
        if path is None:
            raise VmError(f"kernel module {name} (needed by {wanted_by}) is not in {moddir}")
        visiting.add(name)
        for field in _modinfo(path).get("depends", []):
            for dep in filter(None, field.split(",")):
                visit(dep, name)
        visiting.discard(name)
        placed.add(name)
        order.append((name, path))

    for root in roots:
        visit(root, "the VM")
    return order


class _CpioWriter:
    """Write a newc ("070701") cpio archive in memory, owned by root."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._inode = 1
        self._dirs: set[str] = set()
        self._names: set[str] = set()

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self._entry(name.strip("/"), stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, mode: int) -> None:
        self._parents(name)
        self._entry(name.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, inode=0, nlink=1)
        return b"".join(self._chunks)

    def _parents(self, name: str) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.add_dir(parent)

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0), inode: int | None = None) -> None:
        if name in self._names:
            raise ValueError(f"cpio: {name} added twice")
        self._names.add(name)
        if inode is None:
            inode, self._inode = self._inode, self._inode + 1
        encoded = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._chunks.append(data + b"\0" * (-len(data) % 4))


# ---------------------------------------------------------------------------
# Running a guest

_PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")


def run_guest(
    socket_path: str,
    script: str,
    *,
    timeout: float = 240,
    memory_mb: int = 512,
    assets: VmAssets | None = None,
    payload: Mapping[str, bytes] | None = None,
    cpus: int = 1,
) -> GuestResult:
    """Boot the VM, run ``script`` (busybox sh) in it and return its verdict.

    The guest reaches the NBD server listening on the unix socket
    ``socket_path`` at ``GUEST_SERVER_HOST:GUEST_SERVER_PORT`` and nothing
    else. ``payload`` files appear under ``GUEST_PAYLOAD_DIR``. The script's
    exit status decides the verdict; it may write a one-line reason to
    ``$NBDLOOP_REASON``. A guest still running after ``timeout`` seconds is
    killed and reported as a failure.
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("qemu-system-x86_64 not found: install the Debian package qemu-system-x86")
    socat = shutil.which("socat")
    if socat is None:
        raise VmError("socat not found: install the Debian package socat")
    if not os.path.exists(socket_path):
        raise FileNotFoundError(f"NBD server socket {socket_path} does not exist")
    if assets is None:
        assets = ensure_assets()

    extra = _CpioWriter()
    extra.add_file("nbdloop/script.sh", script.encode(), 0o755)
    for name, data in (payload or {}).items():
        if not _PAYLOAD_NAME.fullmatch(name) or ".." in name.split("/"):
            raise ValueError(f"payload name {name!r} is not a plain relative path")
        extra.add_file(f"{GUEST_PAYLOAD_DIR.strip('/')}/{name}", bytes(data))

    with tempfile.TemporaryDirectory(prefix="nbdloop-vm-") as tmp:
        # socat and qemu's option parser both give ',' and ':' meanings, and
        # sun_path is short; a symlink with a plain short name avoids all that.
        link = os.path.join(tmp, "nbd.sock")
        os.symlink(os.path.abspath(socket_path), link)
        # qemu hands each socat the guest's TCP connection as stdin, stdout
        # *and stderr*: socat's messages must go to a file, or they end up
        # in the NBD stream (the guest then sees "Wrong magic").
        socat_log = os.path.join(tmp, "socat.log")
        initrd = os.path.join(tmp, "initrd.img")
        with open(initrd, "wb") as f:
            f.write(assets.initrd.read_bytes())
            f.write(extra.finish())
        netdev = (
            "user,id=net0,restrict=on,ipv6=off,"
            f"guestfwd=tcp:{GUEST_SERVER_HOST}:{GUEST_SERVER_PORT}"
            f"-cmd:{socat} -lf {socat_log} STDIO UNIX-CONNECT:{link}"
        )
        cmd = [
            qemu,
            "-accel", "tcg",
            "-machine", "pc",
            "-cpu", "max",
            "-smp", str(cpus),
            "-m", str(memory_mb),
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display", "none",
            "-monitor", "none",
            "-chardev", "stdio,id=console,signal=off",
            "-serial", "chardev:console",
            "-netdev", netdev,
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-kernel", str(assets.kernel),
            "-initrd", initrd,
            "-append", _KERNEL_CMDLINE,
        ]
        result = _run_qemu(cmd, timeout)
        try:
            log = Path(socat_log).read_text(errors="replace")
        except FileNotFoundError:
            log = ""
        return dataclasses.replace(result, socat_log=log)


def _run_qemu(cmd: list[str], timeout: float) -> GuestResult:
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: qemu and its socats
    )
    chunks: list[bytes] = []

    def read_console() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            chunks.append(chunk)

    reader = threading.Thread(target=read_console, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    elapsed = time.monotonic() - start
    console = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
    verdicts = re.findall(rf"{VERDICT_MARKER} (.*)", console)
    if timed_out:
        verdict = f"FAIL timed out after {timeout:g} s"
    elif verdicts:
        verdict = verdicts[-1].strip()
    else:
        verdict = f"FAIL qemu exited with status {proc.returncode} and no verdict"
    return GuestResult(
        ok=verdict == "PASS",
        verdict=verdict,
        console=console,
        elapsed=elapsed,
        timed_out=timed_out,
    )


# ---------------------------------------------------------------------------
# The standard kernel check

_FILESYSTEMS = {
    "ext4": (["mkfs.ext4", "-F", "-q"], ["e2fsck", "-fn"]),
    "xfs": (["mkfs.xfs", "-f", "-q"], ["xfs_repair", "-n"]),
}

#: File sizes of :func:`make_files`: empty, tiny, unaligned, a few blocks, big.
DEFAULT_FILE_SIZES = (0, 1, 511, 4096, 4097, 65536 + 123, (1 << 20) + 7, 6 << 20)


def make_files(seed: int, sizes: Sequence[int] = DEFAULT_FILE_SIZES) -> dict[str, bytes]:
    """Return files (relative path -> content) made deterministically from ``seed``.

    Every 4 KiB block of every file differs from every other, so a block read
    from the wrong place shows up as a checksum mismatch.
    """
    files = {}
    for i, size in enumerate(sizes):
        name = f"f{i:02d}-{size}.bin" if i % 2 == 0 else f"dir{i}/f{i:02d}-{size}.bin"
        files[name] = hashlib.shake_256(f"nbdloop:{seed}:{name}".encode()).digest(size)
    return files


def kernel_check_script(
    nbd_args: Sequence[str],
    fstype: str,
    files: Mapping[str, bytes],
    *,
    device: str = GUEST_NBD_DEVICE,
    mountpoint: str = "/mnt",
    expect_connections: int | None = None,
) -> KernelCheck:
    """Return the guest script that exercises a filesystem over the kernel NBD client.

    Steps, each announced by an ``NBDLOOP-STEP:`` line: connect (``nbd_args``,
    the argv from :func:`nbdloop.nbdclient.nbd_client_args`), mkfs, mount,
    write ``files`` and sync, verify sha256, umount, fsck, remount, verify
    again from disk, umount, disconnect. A failing step ends the script and
    names itself in the verdict. With ``expect_connections``, the connect step
    also fails unless exactly that many TCP connections reach the server.
    """
    if fstype not in _FILESYSTEMS:
        raise ValueError(f"fstype {fstype!r} is not one of {', '.join(_FILESYSTEMS)}")
    mkfs, fsck = _FILESYSTEMS[fstype]
    payload = {}
    expected = {}
    for name, data in files.items():
        if not _PAYLOAD_NAME.fullmatch(name) or ".." in name.split("/"):
            raise ValueError(f"file name {name!r} is not a plain relative path")
        payload[name] = bytes(data)
        expected[name] = hashlib.sha256(data).hexdigest()
    q = shlex.quote
    dev, mnt = q(device), q(mountpoint)
    sysblock = f"/sys/block/{os.path.basename(device)}"
    sums = "".join(f"{digest}  {mountpoint}/{name}\n" for name, digest in expected.items())
    copies = []
    for name in payload:
        parent = os.path.dirname(name)
        if parent:
            copies.append(f"must mkdir -p {q(f'{mountpoint}/{parent}')}")
        copies.append(f"must cp {q(f'{GUEST_PAYLOAD_DIR}/{name}')} {q(f'{mountpoint}/{name}')}")
    copy_lines = "\n".join(copies)
    count_check = ""
    if expect_connections is not None:
        server = f"{GUEST_SERVER_HOST}:{GUEST_SERVER_PORT}"
        want = int(expect_connections)
        count_check = f"""conns=$(netstat -tn | grep -c '{server} *ESTABLISHED')
echo "$conns connection(s) to the server"
[ "$conns" -eq {want} ] || fail "$conns connections to the server, expected {want}"
"""
    script = f"""#!/bin/sh
# nbdloop kernel check: {fstype} on {device} over the kernel NBD client.
STEP=start
step() {{
    STEP=$1
    echo "{STEP_MARKER} $1"
}}
must() {{
    "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "NBDLOOP-STEP-FAILED: $STEP: $* (exit $rc)"
        echo "step $STEP: $* exited with status $rc" > "$NBDLOOP_REASON"
        exit 1
    fi
}}
fail() {{
    echo "NBDLOOP-STEP-FAILED: $STEP: $*"
    echo "step $STEP: $*" > "$NBDLOOP_REASON"
    exit 1
}}
drop_caches() {{
    sync
    blockdev --flushbufs {dev}
    echo 3 > /proc/sys/vm/drop_caches
}}
cat > /tmp/expected.sha256 <<'NBDLOOP_EOF'
{sums}NBDLOOP_EOF

step connect
must {shlex.join(nbd_args)}
size=$(cat {sysblock}/size)
[ "$size" -gt 0 ] || fail "{device} has size $size after nbd-client"
echo "{device}: $size sectors, logical block $(cat {sysblock}/queue/logical_block_size)," \\
     "physical block $(cat {sysblock}/queue/physical_block_size)," \\
     "timeout $(cat {sysblock}/queue/io_timeout) ms"
{count_check}
step mkfs
must {shlex.join(mkfs)} {dev}

step mount
must mount -t {fstype} {dev} {mnt}

step write
{copy_lines}
must sync

step verify-written
must sha256sum -c /tmp/expected.sha256

step umount
must umount {mnt}

step fsck
drop_caches
must {shlex.join(fsck)} {dev}

step remount
drop_caches
must mount -t {fstype} {dev} {mnt}

step verify-remounted
must sha256sum -c /tmp/expected.sha256

step umount-again
must umount {mnt}

step disconnect
must nbd-client -d {dev}
tries=0
while [ "$(cat {sysblock}/size)" -ne 0 ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 50 ] && fail "{device} still has size $(cat {sysblock}/size) after nbd-client -d"
    sleep 0.1
done
step done
"""
    return KernelCheck(script=script, payload=payload, expected_sha256=expected)
