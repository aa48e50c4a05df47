"""Run the whole product on one kernel: a VM whose root is the host's own.

:func:`run_product` boots the client VM's kernel (the same cached file,
:func:`nbdloop.vm.assets.ensure_assets`) with a small busybox initramfs
(:func:`ensure_product_assets`) whose /init (``nbdloop/vm/guest/product-init.sh``)
mounts this machine's root filesystem read-only over virtio-9p, puts a tmpfs
overlay on top and switch_roots into it. The guest so runs exactly the
host's nbdkit, Python, venv, nbd-client and checkout, with nothing copied or
built for it, and the kernel NBD client as well; writes land in the tmpfs
and vanish with the VM. The images live on a second virtio disk (ext4, made
on the host), mounted at :data:`GUEST_DATA_DIR`: tmpfs has no O_DIRECT.
On request the guest also gets an emulated NVMe disk (qemu's ``nvme``
device, blank), :data:`GUEST_NVME_DEVICE`: a disk whose direct-I/O memory
alignment is 4 bytes, where a virtio disk asks for 512.

The guest runs one shell script, a file on the host (so at the same path in
the guest), as ``/bin/sh SCRIPT ARGS...`` as root with every capability,
and reports the same verdict as :func:`nbdloop.vm.runner.run_guest`. It
has no network device but ``lo``. Per-run data (the script's argv and
environment, as one argv, one argument a line) travels in a small cpio
appended to the cached initramfs; nothing of it is shell code.

Paths the host hides from the guest by mounting over them there
(:data:`SHADOWED_PATHS`: /proc, /sys, /dev, /run, /tmp, and /data) are not
visible in the guest: a script or file the guest must see may not be there
(:func:`hidden_by` says; :func:`visible_tempdir` makes a directory that is
seen, under /var/tmp). pytest's ``tmp_path`` is under /tmp: hidden.

Standard library, :mod:`nbdloop.paths` and the other nbdloop.vm modules only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from nbdloop.paths import GUEST_SCRIPTS, PACKAGE_ROOT, SBIN_PATH, vm_cache_dir
from nbdloop.vm.assets import (KERNEL_CMDLINE, VmAssets, cache_lock, ensure_assets,
                                host_package_versions, unpack_kernel)
from nbdloop.vm.initramfs import (
    PRODUCT_HOST_PACKAGES,
    PRODUCT_MODULE_PARAMS,
    PRODUCT_MODULE_ROOTS,
    CpioWriter,
    build_product_initramfs,
)
from nbdloop.vm.runner import GuestResult, PowerCut, _run_qemu, argv_lines, qemu_argv
from nbdloop.vm.tools import VmError, require_tool, run

__all__ = [
    "GUEST_DATA_DIR",
    "GUEST_NVME_DEVICE",
    "GUEST_REASON_FILE",
    "GUEST_REPORT_PORT",
    "PRODUCT_INIT_SCRIPT",
    "SHADOWED_PATHS",
    "ProductAssets",
    "ensure_product_assets",
    "guest_environment",
    "hidden_by",
    "product_argv",
    "run_product",
    "visible_tempdir",
]

#: The product VM's /init, built into its initramfs.
PRODUCT_INIT_SCRIPT = GUEST_SCRIPTS / "product-init.sh"
#: Where the guest mounts the data disk; ``$NBDLOOP_DATA``, and the script's cwd.
GUEST_DATA_DIR = "/data"
#: The emulated NVMe disk's namespace in the guest, when there is one:
#: ``$NBDLOOP_NVME``.  The driver probes it in the background, so it may
#: appear a moment after the script starts.
GUEST_NVME_DEVICE = "/dev/nvme0n1"
#: The file for the script's one-line failure reason; ``$NBDLOOP_REASON``.
GUEST_REASON_FILE = "/run/nbdloop-vm/reason"
#: The name of the virtio-serial port that :func:`run_product` writes to
#: its ``report`` file: what the guest says there is on the host as it
#: says it, so it outlives a power cut.  The guest finds the port by name
#: in /sys/class/virtio-ports (tests/e2e/guest/product-lib.sh, report_port).
GUEST_REPORT_PORT = "nbdloop.report"
#: Where stage 1 puts stage 2's files in the overlay (its tmpfs).
GUEST_RUN_DIR = "/.nbdloop"
#: Host paths the guest mounts something else over: not visible in the guest.
SHADOWED_PATHS = ("/proc", "/sys", "/dev", "/run", "/tmp", GUEST_DATA_DIR, GUEST_RUN_DIR)
#: The shell that runs the script: the host's.
GUEST_SHELL = "/bin/sh"

#: The qemu device of the host's root. ``multidevs=remap`` keeps inode
#: numbers unique across the host's mounts (qemu warns of collisions without).
_VIRTFS = "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"
#: Bump when the layout of the cached product assets changes.
_ASSET_FORMAT = 1


#: The client VM's kernel with the product VM's initramfs: the same fields.
ProductAssets = VmAssets


def ensure_product_assets(cache_dir: Path | None = None) -> ProductAssets:
    """Return the kernel and the product initramfs, building the initramfs if needed.

    The kernel is the client VM's (:func:`ensure_assets`, which this calls);
    the initramfs is cached next to it under ``cache_dir`` (default
    :func:`nbdloop.paths.vm_cache_dir`) in ``product-<release>_<version>_<key>``,
    keyed on the kernel package, the module list and parameters, the content
    of ``product-init.sh``, the busybox version and the kernel command line.
    A build unpacks the kernel's kept .deb (:func:`nbdloop.vm.assets.kernel_deb`:
    no second download); with a current cache this is one dpkg-query more
    than :func:`ensure_assets`.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else vm_cache_dir()
    base = ensure_assets(cache_dir)
    init = PRODUCT_INIT_SCRIPT.read_bytes()
    package = f"linux-image-{base.kernel_release}"
    recipe = {
        "format": _ASSET_FORMAT,
        "kernel": [package, base.kernel_version],
        "host": host_package_versions(PRODUCT_HOST_PACKAGES,
                                      "the product VM needs host packages"),
        "modules": PRODUCT_MODULE_ROOTS,
        "params": {k: list(v) for k, v in PRODUCT_MODULE_PARAMS.items()},
        "init": hashlib.sha256(init).hexdigest(),
        "cmdline": KERNEL_CMDLINE,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    entry = cache_dir / f"product-{base.kernel_release}_{base.kernel_version}_{key}"
    modules = _load_entry(entry)
    if modules is None:
        with cache_lock(cache_dir):
            modules = _load_entry(entry)
            if modules is None:
                _build_entry(cache_dir, entry, package, base.kernel_version, recipe, init)
                modules = _load_entry(entry)
    if modules is None:
        raise VmError(f"building the product initramfs in {entry} left no usable manifest")
    return ProductAssets(
        kernel=base.kernel,
        initrd=entry / "initrd.img",
        kernel_release=base.kernel_release,
        kernel_version=base.kernel_version,
        modules=modules,
    )


def _load_entry(entry: Path) -> tuple[str, ...] | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not (entry / "initrd.img").is_file():
        return None
    return tuple(manifest["modules"])


def _build_entry(cache_dir: Path, entry: Path, package: str, version: str, recipe: dict,
                 init: bytes) -> None:
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        work = build / "work"
        work.mkdir()
        _, moddir = unpack_kernel(cache_dir, package, version, work)
        initrd, modules = build_product_initramfs(moddir, init)
        shutil.rmtree(work)
        (build / "initrd.img").write_bytes(initrd)
        manifest = {"kernel_package": package, "kernel_version": version,
                    "modules": modules, "recipe": recipe}
        (build / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        build.chmod(0o755)
        os.rename(build, entry)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def venv_bin_dir() -> str | None:
    """The bin directory of the running interpreter's venv, or None outside one."""
    if sys.prefix == sys.base_prefix:
        return None
    return os.path.join(sys.prefix, "bin")


def guest_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The script's whole environment in the guest: ``HOME``, ``PATH`` (the
    venv's bin, if any, then :data:`nbdloop.paths.SBIN_PATH`),
    ``NBDLOOP_DATA``, ``NBDLOOP_REASON``, then ``env`` on top."""
    venv = venv_bin_dir()
    result = {
        "HOME": "/root",
        "PATH": f"{venv}:{SBIN_PATH}" if venv else SBIN_PATH,
        "NBDLOOP_DATA": GUEST_DATA_DIR,
        "NBDLOOP_REASON": GUEST_REASON_FILE,
    }
    for name, value in (env or {}).items():
        if not name or "=" in name or "\0" in name or "\n" in name:
            raise ValueError(f"environment variable name {name!r} is not usable")
        if "\0" in value or "\n" in value:
            raise ValueError(f"the value of {name} holds a NUL or a newline")
        result[name] = value
    return result


def product_argv(script: str | Path, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> list[str]:
    """What the guest's stage 2 runs, as an argv: ``env -i`` with
    :func:`guest_environment`, then ``/bin/sh SCRIPT ARGS...``."""
    assignments = [f"{k}={v}" for k, v in guest_environment(env).items()]
    argv = ["/usr/bin/env", "-i", *assignments, GUEST_SHELL, str(script), *map(str, args)]
    for arg in argv:
        if "\0" in arg or "\n" in arg:
            raise ValueError(f"argument {arg!r} holds a NUL or a newline")
    return argv


def hidden_by(path: str | Path) -> str | None:
    """The entry of :data:`SHADOWED_PATHS` that hides host ``path`` (symlinks
    resolved) from the guest, or None if the guest sees it at the same path.
    pytest's ``tmp_path`` is under /tmp, and so hidden."""
    real = Path(os.path.realpath(path))
    for hidden in SHADOWED_PATHS:
        if real == Path(hidden) or Path(hidden) in real.parents:
            return hidden
    return None


def visible_tempdir(prefix: str = "nbdloop-product-") -> tempfile.TemporaryDirectory:
    """A temporary directory on the host that the guest sees at the same path
    (under /var/tmp, not /tmp), for files a guest script reads or the host
    checks afterwards; removed when the ``with`` block ends."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir="/var/tmp")


def kept_paths(script: Path, share: Sequence[str | Path] = ()) -> list[str]:
    """Host directories the guest must see although its fresh /tmp or /run
    hides them: this checkout and the venv (CI may clone under /tmp), the
    script's directory and ``share``.  Stage 2 binds each back at its path."""
    wanted = [PACKAGE_ROOT, Path(sys.prefix), script.parent, *map(Path, share)]
    hidden = {os.path.realpath(p) for p in wanted if hidden_by(p) in ("/tmp", "/run")}
    # A directory inside another that is kept comes with it.
    return sorted(p for p in hidden
                  if not any(q != p and Path(q) in Path(p).parents for q in hidden))


def _check_visible(script: Path, keep: Sequence[str]) -> Path:
    real = Path(os.path.realpath(script))
    if not real.is_file():
        raise FileNotFoundError(f"guest script {script} is not a file")
    hidden = hidden_by(real)
    kept = any(real == Path(k) or Path(k) in real.parents for k in keep)
    if hidden is not None and not kept:
        raise ValueError(
            f"guest script {script} is under {hidden}, which the product VM mounts "
            "over: the guest cannot see it"
        )
    return real


def prepare_disk(path: Path, size: int) -> None:
    """Make ``path`` a disk the guest can mount: create it sparse at ``size``
    bytes if it is missing or empty, and make ext4 on it if blkid finds no
    filesystem there."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        with open(path, "wb") as f:
            f.truncate(size)
    blkid = require_tool("blkid", "util-linux")
    probe = subprocess.run([blkid, "-p", "-o", "value", "-s", "TYPE", str(path)],
                           capture_output=True, text=True, check=False)
    if probe.returncode == 0 and probe.stdout.strip():
        return
    if probe.returncode not in (0, 2):
        raise VmError(f"blkid -p {path} failed: {probe.stderr.strip()}")
    run([require_tool("mkfs.ext4", "e2fsprogs"), "-F", "-q", str(path)])


def _drive(path: Path, options: str) -> list[str]:
    """qemu's -drive for the raw image ``path``, a name without ',' (which
    qemu's option parser gives a meaning), with ``options`` added:
    cache=none (qemu's own O_DIRECT, so that what the guest's disk
    completed is in the image even after a power cut) where the host's
    filesystem takes O_DIRECT, else writeback."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        cache = "writeback"
    else:
        os.close(fd)
        cache = "none"
    return ["-drive", f"file={path},format=raw,cache={cache},{options}"]


def run_product(
    script: str | Path,
    *,
    args: Sequence[str] = (),
    disk: Path | None = None,
    disk_size: int = 2 << 30,
    nvme_size: int | None = None,
    memory_mb: int = 1024,
    cpus: int = 2,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    share: Sequence[str | Path] = (),
    assets: ProductAssets | None = None,
    echo: Callable[[bytes], None] | None = None,
    report: Path | None = None,
    power_cut: PowerCut | None = None,
) -> GuestResult:
    """Boot the product VM and run ``sh script args...`` in it; return its verdict.

    ``script`` is a file on the host, outside :data:`SHADOWED_PATHS`; the
    guest sees it at the same path. It runs as root in
    :data:`GUEST_DATA_DIR`, the mount point of the data disk, with the
    environment of :func:`guest_environment` (``env`` merged in). Its stdout
    and stderr are on the console. Its exit status decides the verdict; it
    may write a one-line reason to ``$NBDLOOP_REASON``. A guest still running
    after ``timeout`` seconds is killed and reported as a failure
    (``timed_out``).

    ``disk`` is the data disk's image: made (sparse, ``disk_size`` bytes) if
    missing or empty, given ext4 if it holds no filesystem, and left for the
    caller to inspect. Without it a temporary ext4 image of ``disk_size``
    bytes is used and deleted. ``nvme_size`` adds an emulated NVMe disk of
    that many bytes, blank (a sparse temporary image, deleted afterwards):
    :data:`GUEST_NVME_DEVICE`, which the script finds in ``$NBDLOOP_NVME``.
    Neither args nor env values may hold a newline (they travel one a
    line). ``share`` names more host directories under /tmp or /run for the
    guest to see (read-only) at their own paths. ``echo`` gets the console
    as it comes.

    ``report`` is a host file that gets what the guest writes to its
    virtio-serial port :data:`GUEST_REPORT_PORT`, as it writes it (the file
    is truncated first).  ``power_cut`` kills the VM at a moment it names;
    the verdict then says so and ``cut_after`` is set.
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("qemu-system-x86_64 not found: install the Debian package qemu-system-x86")
    keep = kept_paths(Path(os.path.realpath(script)), share)
    script = _check_visible(Path(script), keep)
    if nvme_size is not None:
        if nvme_size <= 0 or nvme_size % 512:
            raise ValueError(f"NVMe disk size {nvme_size} is not a positive multiple of 512")
        env = {"NBDLOOP_NVME": GUEST_NVME_DEVICE, **(env or {})}
    argv = product_argv(script, args, env)
    if assets is None:
        assets = ensure_product_assets()

    extra = CpioWriter()
    extra.add_file("nbdloop/run/argv", argv_lines(argv))
    extra.add_file("nbdloop/run/keep", argv_lines(keep))

    with tempfile.TemporaryDirectory(prefix="nbdloop-product-") as tmp:
        if disk is None:
            disk = Path(tmp) / "data.img"
        disk = Path(disk)
        prepare_disk(disk, disk_size)
        initrd = os.path.join(tmp, "initrd.img")
        with open(initrd, "wb") as f:
            f.write(assets.initrd.read_bytes())
            f.write(extra.finish())
        # A plain name for the caller's path, which may hold a ',' (_drive).
        link = Path(tmp) / "disk"
        link.symlink_to(os.path.abspath(disk))
        cmd = [
            *qemu_argv(qemu, cpus=cpus, memory_mb=memory_mb),
            "-nic", "none",
            "-virtfs", _VIRTFS,
            *_drive(link, "if=virtio"),
            "-kernel", str(assets.kernel),
            "-initrd", initrd,
            "-append", KERNEL_CMDLINE,
        ]
        if nvme_size is not None:
            nvme = Path(tmp) / "nvme.img"
            with open(nvme, "wb") as f:
                f.truncate(nvme_size)
            cmd += [*_drive(nvme, "if=none,id=nvme0"),
                    "-device", "nvme,serial=nbdloop-nvme,drive=nvme0"]
        if report is not None:
            Path(report).write_bytes(b"")
            report_link = os.path.join(tmp, "report")
            os.symlink(os.path.abspath(report), report_link)
            cmd += ["-device", "virtio-serial-pci,id=serial0",
                    "-chardev", f"file,id=report,path={report_link}",
                    "-device", ("virtserialport,bus=serial0.0,chardev=report,"
                                f"name={GUEST_REPORT_PORT}")]
        return _run_qemu(cmd, timeout, echo, power_cut)
