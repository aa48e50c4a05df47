"""The kernel check for machines without an NBD driver: serve an image with
nbdloop, boot a small VM whose kernel NBD client attaches it (nbd-client,
with the block size and connections ``nbdloop attach`` would use), make a
filesystem, write, fsck, remount and verify in the guest, then check the
image again on the host with tools that never went through the guest.

Shared by ``nbdloop vm-check`` and ``tests/e2e/test_kernel.py``.  It lives
here, not in nbdloop.vm, because it validates the image with the engine
(nbdloop.engine.backing), which nbdloop.vm must not import.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from nbdloop import vm
from nbdloop.engine import backing
from nbdloop.kernel.attach import AttachError, default_block_size
from nbdloop.kernel.nbdclient import BLOCK_SIZES, nbd_client_args
from nbdloop.paths import SBIN_PATH
from nbdloop.serve import children as srv

FSTYPES = ("ext4", "xfs")
#: The smallest image each filesystem check fits in: mkfs.xfs refuses less
#: than 300 MB; ext4 needs room for its journal and the ~7 MiB of files.
MIN_SIZE = {"ext4": 32 << 20, "xfs": 300 << 20}
DEFAULT_TIMEOUT = 300


class VmCheckError(Exception):
    """Bad input: nothing was run.  One line."""

    exit_status = 2


class VmCheckFailed(VmCheckError):
    """A missing tool, a VM that cannot be built, a server that will not
    start: nothing was checked."""

    exit_status = 1


@dataclasses.dataclass
class Check:
    """One host-side check.  ``ok`` is None when it could not run here."""
    name: str
    ok: bool | None
    detail: str = ""


@dataclasses.dataclass
class VmCheckReport:
    image: str
    mode: str
    fstype: str
    block_size: int
    connections: int
    seed: int
    nbd_args: list[str]
    guest: vm.GuestResult | None = None
    host: list[Check] = dataclasses.field(default_factory=list)
    server_status: int | None = None
    server_log: str = ""

    @property
    def ok(self) -> bool:
        return (self.guest is not None and self.guest.ok and self.server_status == 0
                and bool(self.host) and all(c.ok is not False for c in self.host))

    def guest_lines(self) -> list[str]:
        """The guest's steps as they happened: each one passed, except a
        failing last one."""
        if self.guest is None:
            return []
        steps = self.guest.steps
        lines = []
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            if step == "done":
                continue
            failed = last and not self.guest.ok
            lines.append(f"guest: {step:<20} {'FAILED' if failed else 'ok'}")
            if step == "connect" and not failed:
                lines += [f"guest:   {ln}" for ln in self.device_info()]
        verdict = "PASS" if self.guest.ok else self.guest.verdict
        lines.append(f"guest: verdict {verdict} ({self.guest.elapsed:.1f} s)")
        return lines

    def device_info(self) -> list[str]:
        """What the guest reported about the device right after connecting:
        its size and block sizes, and the number of connections."""
        if self.guest is None:
            return []
        device = re.escape(vm.GUEST_NBD_DEVICE)
        return re.findall(rf"^({device}: \d+ sectors, .*|\d+ connection\(s\) to the server)$",
                          self.guest.console, re.MULTILINE)

    def lines(self) -> list[str]:
        """The whole report, for people."""
        out = self.guest_lines()
        if self.server_status not in (None, 0):
            out.append(f"server: exited with status {self.server_status}")
        for c in self.host:
            state = {True: "ok", False: "FAILED", None: "skipped"}[c.ok]
            out.append(f"host:  {c.name:<20} {state}" + (f": {c.detail}" if c.detail else ""))
        out.append(f"vm-check: {'PASS' if self.ok else 'FAIL'}")
        if self.guest is not None and not self.guest.ok:
            out.append(self.guest.message)
        if not self.ok and self.server_log:
            out.append("--- server log ---")
            out.append(self.server_log)
        return out


def holds_data(path: str) -> bool:
    """True unless ``path`` is a regular file with no data at all (all holes,
    as ``nbdloop create`` makes it)."""
    if not os.path.isfile(path):
        return True
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
        except OSError:
            return False   # ENXIO: no data after offset 0
        return True
    finally:
        os.close(fd)


def prepare(image: str, *, mode: str, fstype: str, connections: int,
            block_size: int | None, force: bool) -> tuple[backing.Geometry, int]:
    """Validate the inputs; returns the image geometry and the block size."""
    if fstype not in FSTYPES:
        raise VmCheckError(f"unknown filesystem {fstype!r}: use ext4 or xfs")
    if connections < 1:
        raise VmCheckError(f"connections must be at least 1, not {connections}")
    try:
        fd, geometry = backing.open_image(image, mode=mode, readonly=False, lock=False)
    except backing.ImageError as e:
        raise VmCheckError(str(e)) from None
    os.close(fd)
    if block_size is None:
        try:
            block_size = default_block_size(geometry.align)
        except AttachError as e:
            raise VmCheckError(str(e)) from None
    elif block_size not in BLOCK_SIZES:
        raise VmCheckError(f"block size {block_size} is not one of "
                           f"{', '.join(map(str, BLOCK_SIZES))}")
    if geometry.size < MIN_SIZE[fstype]:
        raise VmCheckError(f"{image}: {geometry.size >> 20} MiB is too small for {fstype} "
                           f"(at least {MIN_SIZE[fstype] >> 20} MiB)")
    if not force and holds_data(image):
        raise VmCheckError(f"{image}: holds data, and vm-check makes a new filesystem on it "
                           "(use --force to overwrite it)")
    return geometry, block_size


def run_vm_check(image: str, *, mode: str = "direct", fstype: str = "ext4",
                 connections: int = 1, block_size: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, seed: int | None = None,
                 force: bool = False, assets: vm.VmAssets | None = None,
                 progress: Callable[[str], None] = lambda line: None) -> VmCheckReport:
    """Serve ``image``, run the kernel check in the VM, check the image on
    the host; returns the report (``report.ok`` says whether all passed).

    Raises VmCheckError, before anything runs, for bad input or a missing
    tool.  The image gets a new filesystem: unless ``force``, it must hold no
    data yet.
    """
    geometry, block_size = prepare(image, mode=mode, fstype=fstype, connections=connections,
                                   block_size=block_size, force=force)
    for tool, package in [("qemu-system-x86_64", "qemu-system-x86"), ("socat", "socat"),
                          ("nbdkit", "nbdkit"),
                          ("e2fsck" if fstype == "ext4" else "xfs_repair",
                           "e2fsprogs" if fstype == "ext4" else "xfsprogs")]:
        if shutil.which(tool, path=SBIN_PATH) is None:
            raise VmCheckFailed(f"{tool} is not installed (apt-get install {package})")
    try:
        assets = assets or vm.ensure_assets()
    except vm.VmError as e:
        raise VmCheckFailed(f"cannot build the VM: {e}") from None
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    files = vm.make_files(seed)
    argv = nbd_client_args(vm.GUEST_NBD_DEVICE, host=vm.GUEST_SERVER_HOST,
                           port=vm.GUEST_SERVER_PORT, block_size=block_size,
                           connections=connections)
    check = vm.kernel_check_script(argv, fstype, files, expect_connections=connections)
    report = VmCheckReport(image=image, mode=mode, fstype=fstype, block_size=block_size,
                           connections=connections, seed=seed, nbd_args=argv)
    with tempfile.TemporaryDirectory(prefix="nbdloop-vm-check-") as work:
        server = srv.nbdloop_server(os.path.abspath(image), work, mode=mode)
        try:
            server.start()
        except srv.ServerError:
            raise VmCheckFailed("the server did not start: "
                               f"{srv.server_error(server.log)}") from None
        try:
            progress(f"serving {image} ({geometry.size >> 20} MiB, {mode}, alignment "
                     f"{geometry.align}) on a private socket")
            progress(f"booting {assets.kernel_release} under qemu (TCG); in the guest: "
                     f"{' '.join(argv)}")
            progress(f"then mkfs.{fstype}, mount, write {len(files)} files (seed {seed}), "
                     "umount, fsck, remount, verify, disconnect")
            report.guest = vm.run_guest(server.socket_path, check.script,
                                        payload=check.payload, assets=assets, timeout=timeout)
        finally:
            report.server_status = server.stop()
            report.server_log = server.log_tail()
    if report.guest.ok:
        report.host = host_checks(image, fstype, check.expected_sha256)
    else:
        report.host = [Check("fsck", None, "the guest failed"),
                       Check("checksums", None, "the guest failed")]
    return report


# ---- host-side checks ---------------------------------------------------------------

def host_checks(image: str, fstype: str, expected: Mapping[str, str]) -> list[Check]:
    """fsck the image and read the files back, without the guest."""
    if fstype == "ext4":
        return [fsck(["e2fsck", "-fn", image], "e2fsck -fn"), ext4_checksums(image, expected)]
    if os.geteuid() != 0:
        return [fsck(["xfs_repair", "-n", "-f", image], "xfs_repair -n -f"),
                Check("loop-mount checksums", None, "a loop mount needs root")]
    # xfs_repair reads a file with O_DIRECT in the filesystem's sector size,
    # which fails (EINVAL) where the image sits on 4 KiB sectors; a read-only
    # loop device in front of it has 512-byte sectors and buffered I/O.
    p = subprocess.run(["losetup", "--read-only", "--find", "--show", image],
                       capture_output=True, text=True, env={**os.environ, "PATH": SBIN_PATH})
    if p.returncode != 0:
        return [Check("losetup --read-only", False, p.stderr.strip())]
    loop = p.stdout.strip()
    try:
        return [fsck(["xfs_repair", "-n", loop], "xfs_repair -n"),
                xfs_checksums(loop, expected)]
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def fsck(argv: list[str], name: str) -> Check:
    p = subprocess.run(argv, capture_output=True, text=True,
                       env={**os.environ, "PATH": SBIN_PATH})
    if p.returncode == 0:
        return Check(name, True, "clean")
    out = (p.stdout + p.stderr).strip().splitlines()
    return Check(name, False, f"exit {p.returncode}: {out[-1] if out else 'no output'}")


def ext4_checksums(image: str, expected: Mapping[str, str]) -> Check:
    """Read every file out of the image with debugfs (no mount, no kernel)."""
    debugfs = shutil.which("debugfs", path=SBIN_PATH)
    if debugfs is None:
        return Check("debugfs checksums", None, "debugfs is not installed")
    bad = []
    for name, digest in expected.items():
        p = subprocess.run([debugfs, "-R", f"cat /{name}", image], capture_output=True)
        if p.returncode != 0 or hashlib.sha256(p.stdout).hexdigest() != digest:
            bad.append(name)
    return _checksum_result("debugfs checksums", expected, bad)


def xfs_checksums(device: str, expected: Mapping[str, str]) -> Check:
    """Read every file back through a read-only mount of ``device``."""
    name = "loop-mount checksums"
    with tempfile.TemporaryDirectory(prefix="nbdloop-vm-check-mnt-") as mnt:
        p = subprocess.run(["mount", "-t", "xfs", "-o", "ro", device, mnt],
                           capture_output=True, text=True)
        if p.returncode != 0:
            return Check(name, False, f"mount -o ro {device} failed: {p.stderr.strip()}")
        try:
            bad = []
            for rel, digest in expected.items():
                try:
                    data = Path(mnt, rel).read_bytes()
                except OSError:
                    bad.append(rel)
                    continue
                if hashlib.sha256(data).hexdigest() != digest:
                    bad.append(rel)
        finally:
            subprocess.run(["umount", mnt], capture_output=True)
    return _checksum_result(name, expected, bad)


def _checksum_result(name: str, expected: Mapping[str, str], bad: list[str]) -> Check:
    if bad:
        return Check(name, False, f"{len(bad)} of {len(expected)} files differ or are "
                                  f"missing: {', '.join(bad)}")
    return Check(name, True, f"all {len(expected)} files match")
