"""What goes into the guest's base initramfs, and how it is packed.

* :func:`build_initramfs` packs the guest's /init, the kernel modules it
  loads (:func:`module_load_order`, from each module's ELF ``.modinfo``:
  :func:`modinfo`), busybox, the guest tools and their shared libraries
  into a gzipped newc cpio archive (:class:`CpioWriter`).
* :func:`build_product_initramfs` packs the much smaller initramfs of the
  product VM (:mod:`nbdloop.vm.product`): its /init, its modules and busybox.
* :class:`CpioWriter` also writes the small uncompressed archive that
  :func:`nbdloop.vm.runner.run_guest` appends per run.

Standard library only; nbdloop.vm.assets decides when to build and caches
the result.
"""
from __future__ import annotations

import gzip
import os
import re
import stat
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

from nbdloop.vm.tools import VmError, require_tool, run

#: Modules the guest loads, besides their dependencies. Dependencies come from
#: each module's own ``depends=`` field. ``crc32c_generic`` is named here
#: because ext4, jbd2 and libcrc32c want it only as a soft dependency
#: (``softdep pre: crypto-crc32c``), which names an alias, not a module.
MODULE_ROOTS = ("virtio_pci", "virtio_net", "nbd", "crc32c_generic", "ext4", "xfs")

#: Modules the product VM (:mod:`nbdloop.vm.product`) loads, besides their
#: dependencies: its disks (virtio_blk, and nvme for the emulated NVMe disk
#: that ``run_product(nvme_size=...)`` adds), the host's root over 9p
#: (9pnet_virtio, the transport, is no dependency of 9p and so is named),
#: overlayfs on top, nbd, and ext4 and xfs for the data disk and the NBD
#: devices.  crct10dif_generic and crc64_rocksoft_generic, before nvme's
#: crc_t10dif and crc64_rocksoft, for the reason crc32c_generic is named:
#: without them each of those two spends 0.7 s under TCG asking modprobe for
#: its crypto algorithm, where all nine NVMe modules load in 0.3 s.  md
#: (raid1) and device-mapper (dm_mod), so that a test can show what udev's
#: rules from mdadm and lvm2 do, or do not do, with an NBD device.
PRODUCT_MODULE_ROOTS = ("virtio_pci", "virtio_blk", "virtio_console", "nbd", "9pnet_virtio",
                        "9p", "overlay", "crc32c_generic", "ext4", "xfs",
                        "crct10dif_generic", "crc64_rocksoft_generic", "nvme", "raid1", "dm_mod")
#: Module parameters of the product VM, given to insmod after the module's path.
PRODUCT_MODULE_PARAMS = {"nbd": ("nbds_max=8", "max_part=8")}
#: Host packages whose files go into the product initramfs.
PRODUCT_HOST_PACKAGES = ("busybox-static",)

#: Tools the guest needs from the host, and the Debian package of each.
GUEST_TOOLS = {
    "nbd-client": "nbd-client",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "xfs_repair": "xfsprogs",
}
#: Host packages whose files go into the initramfs; their versions key the cache.
HOST_PACKAGES = ("busybox-static", "nbd-client", "e2fsprogs", "xfsprogs")
_BUSYBOX = "/bin/busybox"
#: Extra files copied from the host when present (mke2fs reads its defaults here).
_HOST_CONFIG_FILES = ("/etc/mke2fs.conf",)


def build_initramfs(moddir: Path, init: bytes) -> tuple[bytes, list[str]]:
    """Return the gzipped base initramfs and the modules its /init loads, in order.

    ``moddir`` is an unpacked kernel's ``lib/modules/<release>``; ``init``
    the content of the guest's /init (nbdloop/vm/guest/init.sh).
    """
    require_tool("ldd", "libc-bin")
    modules = module_load_order(moddir, MODULE_ROOTS)
    archive = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "dev", "proc",
              "sys", "tmp", "mnt", "run", "root", "nbdloop"):
        archive.add_dir(d)
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    archive.add_file("init", init, 0o755)
    archive.add_file("etc/nbdloop/modules", "".join(f"{m}\n" for m, _ in modules).encode())
    for name, path in modules:
        archive.add_file(f"lib/modules/{name}.ko", path.read_bytes())
    for config in _HOST_CONFIG_FILES:
        if os.path.isfile(config):
            archive.add_file(config.lstrip("/"), Path(config).read_bytes())

    executables = [_BUSYBOX]
    shipped = set()
    for tool, package in GUEST_TOOLS.items():
        found = require_tool(tool, package)
        real = os.path.realpath(found)
        archive.add_file(f"usr/sbin/{os.path.basename(real)}", Path(real).read_bytes(), 0o755)
        if os.path.basename(real) != tool:
            archive.add_symlink(f"usr/sbin/{tool}", os.path.basename(real))
        shipped.update((tool, os.path.basename(real)))
        executables.append(real)
    add_busybox(archive, shipped)
    for lib in sorted({lib for exe in executables for lib in shared_libraries(exe)}):
        archive.add_file(lib.lstrip("/"), Path(lib).read_bytes(), 0o755)

    initrd = gzip.compress(archive.finish(), compresslevel=6, mtime=0)
    # Pad so that an uncompressed cpio appended by run_guest starts 4-aligned.
    initrd += b"\0" * (-len(initrd) % 4)
    return initrd, [m for m, _ in modules]


def build_product_initramfs(moddir: Path, init: bytes) -> tuple[bytes, list[str]]:
    """Return the gzipped initramfs of the product VM and the modules it loads, in order.

    Only busybox (static), the modules of :data:`PRODUCT_MODULE_ROOTS` and
    their dependencies (``/etc/nbdloop/modules``, one name a line, in load
    order), the parameters of :data:`PRODUCT_MODULE_PARAMS`
    (``/etc/nbdloop/modparams/<module>``, one a line) and ``init``, the
    content of ``nbdloop/vm/guest/product-init.sh``; everything else the
    guest runs comes from the host's root filesystem over 9p.
    """
    modules = module_load_order(moddir, PRODUCT_MODULE_ROOTS)
    names = [m for m, _ in modules]
    unknown = set(PRODUCT_MODULE_PARAMS) - set(names)
    if unknown:
        raise VmError(f"parameters for modules the product VM does not load: {sorted(unknown)}")
    archive = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "ro", "rw",
              "newroot", "nbdloop"):
        archive.add_dir(d)
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    archive.add_file("init", init, 0o755)
    archive.add_file("etc/nbdloop/modules", "".join(f"{m}\n" for m in names).encode())
    for name, params in PRODUCT_MODULE_PARAMS.items():
        archive.add_file(f"etc/nbdloop/modparams/{name}",
                         "".join(f"{p}\n" for p in params).encode())
    for name, path in modules:
        archive.add_file(f"lib/modules/{name}.ko", path.read_bytes())
    add_busybox(archive)
    initrd = gzip.compress(archive.finish(), compresslevel=6, mtime=0)
    initrd += b"\0" * (-len(initrd) % 4)
    return initrd, names


def add_busybox(archive: CpioWriter, shipped: set[str] | frozenset[str] = frozenset()) -> None:
    """Add /bin/busybox and a symlink to it for each of its applets, except
    the applets named in ``shipped`` (real tools of the same name)."""
    archive.add_file("bin/busybox", Path(_BUSYBOX).read_bytes(), 0o755)
    applets = run([_BUSYBOX, "--list-full"]).split()
    for applet in applets:
        if os.path.basename(applet) not in shipped and applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")


def shared_libraries(executable: str) -> list[str]:
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


def modinfo(path: Path) -> dict[str, list[str]]:
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


def module_load_order(moddir: Path, roots: Sequence[str]) -> list[tuple[str, Path]]:
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
        for field in modinfo(path).get("depends", []):
            for dep in filter(None, field.split(",")):
                visit(dep, name)
        visiting.discard(name)
        placed.add(name)
        order.append((name, path))

    for root in roots:
        visit(root, "the VM")
    return order


class CpioWriter:
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
