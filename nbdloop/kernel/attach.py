"""Attach images to kernel NBD devices, like ``losetup``.

An attachment is an ``nbdloop serve`` running in the background on a unix
socket, and the kernel's NBD client (``nbd-client``) connected to it as
``/dev/nbdN``.  Each attachment is one JSON file in a state directory (the
CLI uses ``<runtime dir>/attached``), next to the server's socket, pidfile
and log, all named after the device: ``nbd0.json``, ``nbd0.sock``, ...

This module holds the logic and no click: the CLI turns :class:`AttachError`
into a one-line error.  The argv of ``nbd-client`` comes only from
:func:`nbdloop.nbdclient.nbd_client_args`, the function the VM test feeds.

Persistence and timeout: nbd-client is run in its default (netlink) mode,
where ``-persist`` has no effect (nothing stays behind to reconnect), so it
is not passed.  The request timeout is ``nbd_client_args``' default, 60 s.
When it expires the kernel marks the connection dead and, with no other live
connection, fails the I/O, which shuts the filesystem down: so it must be
longer than the slowest legitimate request (a flush in buffered mode writes
back the server's dirty page cache, which can take tens of seconds on slow
storage), while still bounding how long I/O stalls behind a hung or dead
server.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from nbdloop.kernel.nbdclient import BLOCK_SIZES, nbd_client_args
from nbdloop.paths import SBIN_PATH
from nbdloop.serve import children as srv

SYS_BLOCK = Path("/sys/block")
DEV = Path("/dev")
#: Seconds the server gets to accept connections (it loads Python and the
#: extension, and opens the image).
SERVER_START_TIMEOUT = 60.0
#: Seconds nbd-client gets to connect and configure the device.  It talks to
#: a local server, so this only bounds a server that accepted but hangs.
NBD_CLIENT_TIMEOUT = 60.0
#: Seconds a server gets to stop after SIGTERM before it is killed: the
#: supervisor's grace second plus its drain time for in-flight requests.
SERVER_STOP_TIMEOUT = 65.0

_DEVICE = re.compile(r"/dev/(nbd\d+)")


class AttachError(Exception):
    """Attaching or detaching failed; the message is one line."""


def default_block_size(align: int) -> int:
    """nbd-client's ``-b`` unless the user says otherwise: the image's
    direct-I/O alignment, so that the kernel never sends the server a request
    it would have to serve by read-modify-write."""
    if align > BLOCK_SIZES[-1]:
        raise AttachError(f"the image's direct-I/O alignment {align} is larger than the "
                          f"largest NBD block size {BLOCK_SIZES[-1]}; give --block-size")
    return max(align, BLOCK_SIZES[0])


@dataclasses.dataclass
class Attachment:
    """One attached image, as stored in ``<state dir>/<nbdN>.json``."""

    device: str          # /dev/nbdN
    image: str           # the image's real path
    mode: str            # direct | buffered
    readonly: bool
    socket: str
    pid: int             # the supervisor (``nbdloop serve``)
    server_pid: int      # nbdkit, the supervisor's child
    connections: int
    block_size: int
    log: str
    started: str         # ISO 8601, local time
    argv: list[str]      # the supervisor's command line: its identity in /proc

    @property
    def name(self) -> str:
        return os.path.basename(self.device)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Attachment:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - data.keys()
        if missing:
            raise ValueError(f"missing {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in fields})


# ---- what the machine offers ------------------------------------------------------

def find_nbd_client() -> str | None:
    return shutil.which("nbd-client", path=SBIN_PATH)


def nbd_devices(sys_block: Path = SYS_BLOCK) -> list[str]:
    """The kernel's NBD devices, as /dev paths, in device-number order."""
    try:
        names = [p.name for p in sys_block.iterdir() if _DEVICE.fullmatch(f"/dev/{p.name}")]
    except OSError:
        return []
    return [f"/dev/{n}" for n in sorted(names, key=lambda n: int(n[3:]))]


def nbd_support_problem(sys_block: Path = SYS_BLOCK, dev: Path = DEV,
                        nbd_client: str | None = None) -> str | None:
    """None if attach can work here, else one line: what is missing and how
    to get it."""
    missing = []
    if not nbd_devices(sys_block) and not list(dev.glob("nbd[0-9]*")):
        release = os.uname().release
        if _kernel_lacks_nbd_module(release):
            missing.append(f"the running kernel ({release}) has no NBD driver (no nbd module; "
                           "`nbdloop vm-check IMAGE` runs the kernel NBD client in a VM "
                           "instead)")
        else:
            missing.append("no /dev/nbd* devices: load the kernel NBD driver with "
                           "`modprobe nbd`")
    if nbd_client is None:
        missing.append("nbd-client is not installed: `apt-get install nbd-client`")
    if not missing:
        return None
    return "attach needs the kernel NBD client: " + "; ".join(missing)


def _kernel_lacks_nbd_module(release: str) -> bool:
    """True when the kernel certainly has no nbd driver: neither built in
    nor among its modules.  Unknown (no module tree to look in) is False,
    so the advice is then to try modprobe."""
    moddir = Path("/lib/modules") / release
    if not moddir.is_dir():
        # No module tree: nbd could only be built in, and then its devices
        # would exist.
        return True
    for index in ("modules.dep", "modules.builtin"):
        try:
            text = (moddir / index).read_text(errors="replace")
        except OSError:
            return False
        if re.search(r"(^|/)nbd\.ko", text, re.MULTILINE):
            return False
    return True


def device_connected(device: str, sys_block: Path = SYS_BLOCK) -> bool:
    """The kernel shows a connected NBD device by a ``pid`` file in sysfs."""
    return (sys_block / os.path.basename(device) / "pid").exists()


def check_device_name(device: str) -> str:
    """``/dev/nbdN`` -> ``nbdN``; anything else is refused."""
    m = _DEVICE.fullmatch(device)
    if m is None:
        raise AttachError(f"{device}: not an NBD device name (expected /dev/nbdN)")
    return m.group(1)


def choose_device(state_dir: Path, wanted: str | None,
                  sys_block: Path = SYS_BLOCK) -> str:
    """The device to attach: ``wanted`` if it is free, else the first free one.
    Free means: the kernel has not connected it and no attachment (even a
    stale one) names it."""
    taken = {a.device for a in load(state_dir)}
    if wanted is not None:
        name = check_device_name(wanted)
        if not (sys_block / name).is_dir():
            raise AttachError(f"{wanted}: no such NBD device "
                              f"(there are {len(nbd_devices(sys_block))})")
        if wanted in taken:
            raise AttachError(f"{wanted}: already attached by nbdloop (see nbdloop list)")
        if device_connected(wanted, sys_block):
            raise AttachError(f"{wanted}: in use (connected by another NBD client)")
        return wanted
    for device in nbd_devices(sys_block):
        if device not in taken and not device_connected(device, sys_block):
            return device
    raise AttachError("no free NBD device (load more with `modprobe nbd nbds_max=N`)")


def mounted_on(device: str) -> str | None:
    """Where ``device`` or one of its partitions is mounted, if anywhere."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        source, target = line.split()[:2]
        if source == device or re.fullmatch(re.escape(device) + r"p\d+", source):
            return target.replace("\\040", " ")
    return None


def holders(device: str, sys_block: Path = SYS_BLOCK) -> list[str]:
    """Block devices (device mapper, md) stacked on ``device``."""
    try:
        return sorted(p.name for p in (sys_block / os.path.basename(device) / "holders").iterdir())
    except OSError:
        return []


# ---- state --------------------------------------------------------------------------

@contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Serialise attach and detach: choosing a device and recording it is one step."""
    with open(state_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def state_file(state_dir: Path, device: str) -> Path:
    return state_dir / f"{os.path.basename(device)}.json"


def save(state_dir: Path, att: Attachment) -> None:
    path = state_file(state_dir, att.device)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(att.as_dict(), indent=2) + "\n")
    tmp.rename(path)


def load(state_dir: Path) -> list[Attachment]:
    """Every recorded attachment, by device number.  A file that does not
    parse is skipped: it is not ours to interpret."""
    found = []
    for path in state_dir.glob("nbd*.json"):
        try:
            found.append(Attachment.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(found, key=lambda a: int(a.name[3:]) if a.name[3:].isdigit() else -1)


def find(state_dir: Path, target: str) -> Attachment | None:
    """The attachment of a device (``/dev/nbd0`` or ``nbd0``) or an image path."""
    device = target if target.startswith("/dev/") else f"/dev/{target}"
    image = os.path.realpath(target)
    for att in load(state_dir):
        if att.device == device or att.image == image:
            return att
    return None


def server_alive(att: Attachment) -> bool:
    """True while the recorded supervisor runs.  Its pid alone is not enough
    (pids are reused): its command line must be the one recorded."""
    try:
        cmdline = Path(f"/proc/{att.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0")[:-1] == [a.encode() for a in att.argv]


def state_of(att: Attachment, sys_block: Path = SYS_BLOCK) -> str:
    """``attached``: server running and the kernel connected; ``disconnected``:
    server running, device not connected (someone ran nbd-client -d);
    ``stale``: the server has died."""
    if not server_alive(att):
        return "stale"
    return "attached" if device_connected(att.device, sys_block) else "disconnected"


def describe(att: Attachment, sys_block: Path = SYS_BLOCK) -> dict:
    """What ``list --json`` shows for one attachment."""
    data = att.as_dict()
    del data["argv"]
    data["state"] = state_of(att, sys_block)
    return data


def remove_files(state_dir: Path, att: Attachment) -> None:
    stem = state_dir / att.name
    for path in (Path(att.socket), Path(att.log), stem.with_suffix(".pid"),
                 state_file(state_dir, att.device)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# ---- the server -------------------------------------------------------------------

def start_server(state_dir: Path, image: str, *, device: str, mode: str, readonly: bool,
                 connections: int, block_size: int, serve_options: Sequence[str] = (),
                 timeout: float = SERVER_START_TIMEOUT) -> Attachment:
    """Start ``nbdloop serve`` for ``image`` in the background (its own
    session, so it outlives this process and the terminal) and record it as
    the attachment of ``device``.  The record exists before the kernel
    connects, so an interrupted attach leaves a stale entry, not a hidden
    server.  ``serve_options`` are more ``nbdloop serve`` options."""
    name = check_device_name(device)
    image = os.path.realpath(image)
    sock, pidfile, log = (str(state_dir / f"{name}.{s}") for s in ("sock", "pid", "log"))
    for leftover in (sock, pidfile, log):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    argv = srv.nbdloop_serve_argv(image, sock, mode=mode, pidfile=pidfile, readonly=readonly,
                                  extra=list(serve_options))
    proc = srv.ServerProcess(argv, socket_path=sock, pidfile=pidfile, log=log)
    try:
        proc.start(timeout)
    except srv.ServerError:
        reason = server_error(Path(log))
        try:
            os.unlink(log)
        except FileNotFoundError:
            pass
        raise AttachError(f"the server for {image} did not start: {reason}") from None
    att = Attachment(device=device, image=image, mode=mode, readonly=readonly, socket=sock,
                     pid=proc.pid, server_pid=proc.server_pid, connections=connections,
                     block_size=block_size, log=log,
                     started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=argv)
    save(state_dir, att)
    return att


def server_error(log: Path) -> str:
    """The reason a server failed, in one line, from its log: serve's own
    ``nbdloop: ...`` refusal, else the last error nbdkit or Python printed,
    else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    noise = ("nbdloop: serving ", "nbdloop: server exited", "nbdloop: warning")
    for line in reversed(lines):
        if line.startswith("nbdloop: ") and not line.startswith(noise):
            return line.removeprefix("nbdloop: ")
    for line in reversed(lines):
        if re.search(r"\b\w*Error\b|\berror\b", line) and not line.startswith(noise):
            return line
    return lines[-1] if lines else "no output"


def stop_server(att: Attachment, timeout: float = SERVER_STOP_TIMEOUT) -> None:
    """SIGTERM the supervisor and wait for it (it stops nbdkit cleanly);
    SIGKILL if it does not go.  nbdkit runs with --exit-with-parent, so it
    never outlives the supervisor."""
    _terminate(att.pid, lambda: server_alive(att), timeout)
    # A supervisor that was killed leaves nbdkit to its parent-death signal
    # (SIGTERM), which nbdkit 1.32 ignores while a client holds an idle
    # connection: such an orphan is stopped here.
    _terminate(att.server_pid, lambda: nbdkit_alive(att), 5.0)


def nbdkit_alive(att: Attachment) -> bool:
    """True while the recorded nbdkit runs (its command line names our socket)."""
    try:
        cmdline = Path(f"/proc/{att.server_pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]) == b"nbdkit" \
        and att.socket.encode() in cmdline


def _terminate(pid: int, ours, timeout: float) -> None:
    """SIGTERM ``pid`` if ``ours()`` says it is still the process we mean;
    SIGKILL it after ``timeout`` seconds."""
    if not ours():
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not ours():   # the pid could have been reused before the pidfd pinned it
            return
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not _wait_exit(pidfd, timeout):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            _wait_exit(pidfd, 10)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _wait_exit(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind ``pidfd`` has exited (a pidfd becomes
    readable then, whether or not anyone has reaped it)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


# ---- the kernel client --------------------------------------------------------------

def connect(att: Attachment, nbd_client: str) -> None:
    """Run nbd-client for ``att``; raise AttachError with its message on failure."""
    argv = nbd_client_args(att.device, unix_path=att.socket, block_size=att.block_size,
                           connections=att.connections, readonly=att.readonly,
                           nbd_client=nbd_client)
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=NBD_CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AttachError(f"nbd-client did not connect {att.device} "
                          f"within {NBD_CLIENT_TIMEOUT:g} s") from None
    if p.returncode != 0:
        raise AttachError(f"nbd-client failed to connect {att.device}: "
                          f"{nbd_client_message(p.stdout + p.stderr)}")


def nbd_client_message(output: str) -> str:
    """nbd-client's error, in one line.  It prints negotiation chatter and
    ``Exiting.`` around an ``Error: ...`` line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln.removeprefix("Error: ") for ln in lines if ln.startswith("Error:")]
    if errors:
        return " ".join(errors)
    rest = [ln for ln in lines if ln != "Exiting." and not ln.startswith(("Warning:", "This method",
                                                                          "Negotiation:"))]
    return rest[-1] if rest else "no message"


def disconnect(device: str, nbd_client: str) -> str | None:
    """``nbd-client -d``; returns its error message, or None on success."""
    try:
        p = subprocess.run([nbd_client, "-d", device], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=NBD_CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"nbd-client -d {device} did not finish within {NBD_CLIENT_TIMEOUT:g} s"
    if p.returncode != 0:
        return nbd_client_message(p.stdout + p.stderr)
    return None


# ---- attach and detach --------------------------------------------------------------

def attach(state_dir: Path, image: str, *, nbd_client: str, device: str | None = None,
           mode: str = "direct", readonly: bool = False, connections: int = 1,
           block_size: int = 4096, serve_options: Sequence[str] = (),
           sys_block: Path = SYS_BLOCK) -> Attachment:
    """Serve ``image`` and connect a kernel NBD device to it.  On any failure
    nothing is left behind: the server is stopped and the record removed."""
    if block_size not in BLOCK_SIZES:
        raise AttachError(f"block size {block_size} is not one of "
                          f"{', '.join(map(str, BLOCK_SIZES))}")
    real = os.path.realpath(image)
    with locked(state_dir):
        for other in load(state_dir):
            if other.image == real:
                hint = (f" (its server has died: `nbdloop detach {other.device}` cleans up)"
                        if state_of(other, sys_block) == "stale" else "")
                raise AttachError(f"{image}: already attached to {other.device}{hint}")
        device = choose_device(state_dir, device, sys_block)
        att = start_server(state_dir, real, device=device, mode=mode, readonly=readonly,
                           connections=connections, block_size=block_size,
                           serve_options=serve_options)
        try:
            connect(att, nbd_client)
        except BaseException:
            stop_server(att)
            remove_files(state_dir, att)
            raise
    return att


def detach(state_dir: Path, target: str, *, nbd_client: str | None,
           sys_block: Path = SYS_BLOCK) -> tuple[Attachment, str]:
    """Disconnect the kernel client of ``target`` (device or image), stop its
    server and forget it.  Returns the attachment and the state it was in.

    A live attachment whose device is mounted or held is refused: the
    kernel would disconnect it under the filesystem.  For a stale one the
    disconnect is best effort (its server is gone, so the device is dead
    anyway)."""
    with locked(state_dir):
        att = find(state_dir, target)
        if att is None:
            raise AttachError(f"{target}: not attached (see nbdloop list)")
        state = state_of(att, sys_block)
        if device_connected(att.device, sys_block):
            where = mounted_on(att.device)
            held = holders(att.device, sys_block)
            if state != "stale" and (where or held):
                why = f"mounted on {where}" if where else f"held by {', '.join(held)}"
                raise AttachError(f"{att.device} is {why}: unmount it first")
            if nbd_client is None:
                if state != "stale":
                    raise AttachError(f"cannot disconnect {att.device}: nbd-client is not "
                                      "installed (`apt-get install nbd-client`)")
            else:
                error = disconnect(att.device, nbd_client)
                if error is not None and state != "stale":
                    raise AttachError(f"nbd-client -d {att.device} failed: {error}")
        stop_server(att)
        remove_files(state_dir, att)
    return att, state
