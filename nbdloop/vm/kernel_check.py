"""The standard kernel check: connect, mkfs, mount, write files, verify,
fsck, remount, verify again, disconnect; in the guest, over the kernel NBD
client.

The script is the fixed shell file ``nbdloop/vm/guest/kernel-check.sh``,
the same bytes on every run; :func:`kernel_check_script` passes everything
that varies as payload files under ``kernel-check/`` (see the script's
header): ``NAME=value`` lines with shell-quoted values that the script
sources, each command's argv one argument a line, the list of files to
write, and their checksums as a ``sha256sum -c`` file. No shell code is made
from the parameters.

Standard library and the other nbdloop.vm modules only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence

from nbdloop.paths import GUEST_SCRIPTS
from nbdloop.vm.runner import (
    GUEST_NBD_DEVICE,
    GUEST_SERVER_HOST,
    GUEST_SERVER_PORT,
    argv_lines,
    is_payload_name,
    shell_assignments,
)

#: The guest script of the kernel check.
KERNEL_CHECK_SCRIPT = GUEST_SCRIPTS / "kernel-check.sh"
#: The payload directory of the check's own parameters; files to write may
#: not start with it.
PARAMS_DIR = "kernel-check"

_FILESYSTEMS = {
    "ext4": (["mkfs.ext4", "-F", "-q"], ["e2fsck", "-fn"]),
    "xfs": (["mkfs.xfs", "-f", "-q"], ["xfs_repair", "-n"]),
}

#: File sizes of :func:`make_files`: empty, tiny, unaligned, a few blocks, big.
DEFAULT_FILE_SIZES = (0, 1, 511, 4096, 4097, 65536 + 123, (1 << 20) + 7, 6 << 20)


@dataclasses.dataclass(frozen=True)
class KernelCheck:
    """A kernel-check guest script and what it needs and promises."""

    #: The busybox sh script to pass to :func:`run_guest`.
    script: str
    #: Files to pass as ``run_guest(payload=...)``: the files to write, by
    #: their own names, and the check's parameters under ``kernel-check/``.
    payload: dict[str, bytes]
    #: Path inside the filesystem (no leading slash) -> sha256 hex of its content.
    expected_sha256: dict[str, str]

    @property
    def params(self) -> dict[str, bytes]:
        """The payload files that hold the check's parameters."""
        return {name: data for name, data in self.payload.items()
                if name.split("/")[0] == PARAMS_DIR}


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
    the argv from :func:`nbdloop.kernel.nbdclient.nbd_client_args`), mkfs,
    mount, write ``files`` and sync, verify sha256, umount, fsck, remount,
    verify again from disk, umount, disconnect. A failing step ends the script
    and names itself in the verdict. With ``expect_connections``, the connect
    step also fails unless exactly that many TCP connections reach the server.
    """
    if fstype not in _FILESYSTEMS:
        raise ValueError(f"fstype {fstype!r} is not one of {', '.join(_FILESYSTEMS)}")
    mkfs, fsck = _FILESYSTEMS[fstype]
    payload = {}
    expected = {}
    for name, data in files.items():
        if not is_payload_name(name):
            raise ValueError(f"file name {name!r} is not a plain relative path")
        if name.split("/")[0] == PARAMS_DIR:
            raise ValueError(f"file name {name!r} is taken by the check's parameters")
        payload[name] = bytes(data)
        expected[name] = hashlib.sha256(data).hexdigest()
    params = {
        "FSTYPE": fstype,
        "DEVICE": device,
        "SYSBLOCK": f"/sys/block/{os.path.basename(device)}",
        "MOUNTPOINT": mountpoint,
        "SERVER": f"{GUEST_SERVER_HOST}:{GUEST_SERVER_PORT}",
        "EXPECT_CONNECTIONS": "" if expect_connections is None else str(int(expect_connections)),
    }
    sums = "".join(f"{digest}  {mountpoint}/{name}\n" for name, digest in expected.items())
    payload.update({
        f"{PARAMS_DIR}/params": shell_assignments(params),
        f"{PARAMS_DIR}/nbd-client.argv": argv_lines(nbd_args),
        f"{PARAMS_DIR}/mkfs.argv": argv_lines([*mkfs, device]),
        f"{PARAMS_DIR}/fsck.argv": argv_lines([*fsck, device]),
        f"{PARAMS_DIR}/files": "".join(f"{name}\n" for name in expected).encode(),
        f"{PARAMS_DIR}/expected.sha256": sums.encode(),
    })
    return KernelCheck(script=KERNEL_CHECK_SCRIPT.read_text(), payload=payload,
                       expected_sha256=expected)

