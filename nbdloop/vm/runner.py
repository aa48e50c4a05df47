"""Boot the VM and run one shell script in it.

The host kernel has no NBD client, so tests that need one boot Debian's stock
kernel under qemu (TCG) with a small busybox initramfs (:mod:`nbdloop.vm.assets`).
The guest's only way out is one TCP address, 10.0.2.100:10809, which qemu
forwards to a unix socket on the host (one ``socat`` per guest connection, so
``nbd-client -C N`` works).

:func:`run_guest` appends the script (as ``/nbdloop/script.sh``) and its
payload files to the base initramfs, boots it and returns the script's verdict
and the whole serial console. The guest's /init (``nbdloop/vm/guest/init.sh``)
runs the script and prints the verdict.

Standard library, :mod:`nbdloop.process` and the other nbdloop.vm modules
only: this never imports nbdkit or nbdloop's compiled extension, so it also
runs where those are not built yet.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from nbdloop import process
from nbdloop.vm.assets import KERNEL_CMDLINE, VmAssets, ensure_assets
from nbdloop.vm.initramfs import CpioWriter
from nbdloop.vm.tools import VmError

#: The address at which the guest reaches the host's NBD server.
GUEST_SERVER_HOST = "10.0.2.100"
GUEST_SERVER_PORT = 10809
#: The NBD device the kernel check uses in the guest.
GUEST_NBD_DEVICE = "/dev/nbd0"
#: Where :func:`run_guest` puts its ``payload`` files inside the guest; the
#: guest's /init exports it to the script as ``$NBDLOOP_PAYLOAD``.
GUEST_PAYLOAD_DIR = "/nbdloop/payload"

VERDICT_MARKER = "NBDLOOP-VERDICT:"
STEP_MARKER = "NBDLOOP-STEP:"

_PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_PARAM_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def is_payload_name(name: str) -> bool:
    """True if ``name`` is a plain relative path that may name a payload file."""
    return bool(_PAYLOAD_NAME.fullmatch(name)) and ".." not in name.split("/")


def shell_assignments(params: Mapping[str, str]) -> bytes:
    """``NAME=value`` lines, each value quoted by shlex.quote, for a script to
    source: assignments only, whatever the values hold."""
    lines = []
    for name, value in params.items():
        if not _PARAM_NAME.fullmatch(name):
            raise ValueError(f"parameter name {name!r} is not an upper-case shell name")
        lines.append(f"{name}={shlex.quote(str(value))}\n")
    return "".join(lines).encode()


def argv_lines(argv: Sequence[str]) -> bytes:
    """An argv as one argument a line, for a script to read with ``read -r``."""
    for arg in argv:
        if "\n" in arg:
            raise ValueError(f"argument {arg!r} holds a newline")
    return "".join(f"{arg}\n" for arg in argv).encode()


@dataclasses.dataclass(frozen=True)
class PowerCut:
    """Kill qemu with SIGKILL ``delay`` seconds after the guest prints the
    line ``marker``: for the guest, a power cut.  Its page cache and the
    writes its disk had not completed are gone; what the disk completed is
    in the image (qemu writes it with O_DIRECT, on a host that stays up)."""

    marker: str
    delay: float


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
    #: Seconds from the guest's :class:`PowerCut` marker to the kill, if it came.
    cut_after: float | None = None

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
    else. ``payload`` files appear under ``GUEST_PAYLOAD_DIR``, which the
    script also finds in ``$NBDLOOP_PAYLOAD``. The script's
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

    extra = CpioWriter()
    extra.add_file("nbdloop/script.sh", script.encode(), 0o755)
    for name, data in (payload or {}).items():
        if not is_payload_name(name):
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
            *qemu_argv(qemu, cpus=cpus, memory_mb=memory_mb),
            "-netdev", netdev,
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-kernel", str(assets.kernel),
            "-initrd", initrd,
            "-append", KERNEL_CMDLINE,
        ]
        result = _run_qemu(cmd, timeout)
        try:
            log = Path(socat_log).read_text(errors="replace")
        except FileNotFoundError:
            log = ""
        return dataclasses.replace(result, socat_log=log)


def qemu_argv(qemu: str, *, cpus: int, memory_mb: int) -> list[str]:
    """What every guest's qemu command line starts with: TCG (KVM hangs at
    boot on this project's machines) emulating the baseline x86-64 CPU
    (glibc then picks its SSE2 routines, which TCG runs faster than the
    AVX2 ones ``-cpu max`` would select), no default devices, no reboot, and
    the serial console on stdio; the caller adds its disks, network and
    kernel."""
    return [
        qemu,
        "-accel", "tcg",
        "-machine", "pc",
        "-cpu", "qemu64",
        "-smp", str(cpus),
        "-m", str(memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display", "none",
        "-monitor", "none",
        "-chardev", "stdio,id=console,signal=off",
        "-serial", "chardev:console",
    ]


def _run_qemu(cmd: list[str], timeout: float,
              echo: Callable[[bytes], None] | None = None,
              power_cut: PowerCut | None = None) -> GuestResult:
    """Run qemu until it exits or ``timeout`` passes, collecting the console
    (and handing each piece to ``echo`` as it comes, for a person watching);
    with ``power_cut``, kill it when that says."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: qemu and its socats
    )
    chunks: list[bytes] = []
    armed: list[float] = []
    cut: list[float] = []
    marker = f"{power_cut.marker}\n".encode() if power_cut else None

    def kill_now() -> None:
        if proc.poll() is None:
            cut.append(time.monotonic() - armed[0])
            process.kill(proc, group=True)   # qemu and its socats

    def read_console() -> None:
        assert proc.stdout is not None
        seen = b""
        while chunk := proc.stdout.read1(65536):
            chunks.append(chunk)
            if echo is not None:
                echo(chunk)
            if marker and not armed:
                # The marker may straddle two reads, and the console ends lines with \r\n.
                seen = (seen + chunk.replace(b"\r", b""))[-2 * len(marker):]
                if marker in seen:
                    armed.append(time.monotonic())
                    timer = threading.Timer(power_cut.delay, kill_now)
                    timer.daemon = True
                    timer.start()

    reader = threading.Thread(target=read_console, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            process.kill(proc, group=True)   # qemu and its socats
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    elapsed = time.monotonic() - start
    console = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
    verdicts = re.findall(rf"{VERDICT_MARKER} (.*)", console)
    if cut:
        verdict = f"POWER CUT {cut[0]:.2f} s after {power_cut.marker}"
    elif timed_out:
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
        timed_out=timed_out and not cut,
        cut_after=cut[0] if cut else None,
    )
