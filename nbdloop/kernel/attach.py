"""Attach images to kernel NBD devices, like ``losetup``.

An attachment is a per-device agent (:mod:`nbdloop.kernel.agent`) running
``nbdloop serve`` in the background on a unix socket, with the kernel's NBD
client connected to it as ``/dev/nbdN``.  Each attachment is one JSON file
in a state directory (the CLI uses ``<runtime dir>/attached``), next to the
server's socket, pidfile and log, all named after the device: ``nbd0.json``,
``nbd0.sock``, ...  The agent writes its record; attach and detach hold the
directory's lock while they choose or free a device.

This module holds the logic and no click: the CLI turns :class:`AttachError`
into a one-line error.

Timeouts: the request timeout (``timeout``, nbd-client's ``-timeout``) is how
long the kernel waits for an answer before it declares the connection dead.
With recovery on (``recover_timeout`` > 0, the kernel's dead-connection
timeout) that starts a recovery, not an error: the agent replaces the server
and the kernel resends the request.  So the request timeout also bounds how
long a request that a dying server had read stays unanswered.  With recovery
off, a dead connection fails the I/O, which shuts the filesystem down, as
nbd-client's devices do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from nbdloop.engine.backing import open_image
from nbdloop.engine.config import Export, Server
from nbdloop.kernel.nbdclient import BLOCK_SIZES, DEFAULT_TIMEOUT
from nbdloop.process import cmdline, process_started
from nbdloop.process import terminate as _terminate
from nbdloop.serve.cmdline import Slice, ready_files, require_permissions, require_slice

SYS_BLOCK = Path("/sys/block")
DEV = Path("/dev")
#: Seconds a server (the supervisor) gets for an orderly stop before it is
#: killed: its grace second plus the drain time for in-flight requests.
SERVER_STOP_TIMEOUT = 65.0
#: Seconds an agent gets to stop: its server's, and a moment for itself.
AGENT_STOP_TIMEOUT = SERVER_STOP_TIMEOUT + 5.0
#: The kernel's dead-connection timeout unless the user says otherwise: how
#: long requests wait for a new server before they fail.
DEFAULT_RECOVER_TIMEOUT = 120

_DEVICE = re.compile(r"/dev/(nbd\d+)")


class AttachError(Exception):
    """Attach, detach or restart refused its input (a name, or a device or
    image in the wrong state); the message is one line."""

    exit_status = 2


class DeviceNameError(AttachError):
    """A device that is not named /dev/nbdN."""


class AttachFailed(AttachError):
    """What should have worked did not: the server did not start, the
    kernel refused, the agent died, time ran out."""

    exit_status = 1


def default_block_size(align: int) -> int:
    """The block size unless the user gives one (``--block-size`` of attach
    and vm-check): the image's direct-I/O alignment, so that the kernel
    never sends the server a request it would have to serve by
    read-modify-write."""
    if align > BLOCK_SIZES[-1]:
        raise AttachError(f"the image's direct-I/O alignment {align} is larger than the "
                          f"largest NBD block size {BLOCK_SIZES[-1]}; give --block-size")
    return max(align, BLOCK_SIZES[0])


@dataclasses.dataclass(frozen=True)
class Options:
    """How to attach an image: attach's options, typed, as the command line
    or a line of the table of attachments gives them."""

    mode: str = "direct"
    device: str | None = None      # /dev/nbdN; None: the first free one
    connections: int = 1
    block_size: int | None = None  # None: the image's direct-I/O alignment
    readonly: bool = False
    partscan: bool = False
    offset: int = 0                # the slice of the image (losetup -o, --sizelimit);
    sizelimit: int = 0             # 0: to its end
    mlock: bool = False
    processes: int = 1
    stats_file: str | None = None
    timeout: int = DEFAULT_TIMEOUT
    recover_timeout: int = DEFAULT_RECOVER_TIMEOUT


def check_options(image: str, options: Options) -> tuple[Options, Slice, bool]:
    """Refuse what attach cannot do with ``image`` before anything starts,
    the way serve will; returns the options with the block size chosen,
    the slice served, and whether the image is a regular file."""
    require_permissions(image, options.readonly)
    fd, geometry = open_image(image, mode=options.mode, readonly=options.readonly, lock=False)
    os.close(fd)
    part = require_slice(geometry.size, geometry.align, options.mode, options.offset,
                         options.sizelimit)
    block_size = options.block_size
    if block_size is None:
        try:
            block_size = default_block_size(geometry.align)
        except AttachError as e:
            raise AttachError(f"{image}: {e}") from None
    if options.processes > 1 and options.mode == "direct" and not options.readonly and \
            block_size < geometry.align:
        # Several processes refuse what would need a read-modify-write, and
        # the kernel would send it: every sub-block write an I/O error.
        raise AttachError(f"{image}: --block-size {block_size} is below the image's "
                          f"direct-I/O alignment, {geometry.align}, which --processes "
                          "needs for writes")
    if part.length % block_size:
        raise AttachError(f"{image}: the device's size, {part.length}, is not a multiple of "
                          f"its block size, {block_size} (give another --block-size)")
    if options.device is not None:
        check_device_name(options.device)
    problem = nbd_support_problem()
    if problem:
        raise AttachFailed(problem)
    stats = os.path.abspath(options.stats_file) if options.stats_file else None
    options = dataclasses.replace(options, block_size=block_size, stats_file=stats,
                                  offset=part.offset,
                                  sizelimit=part.length if options.sizelimit else 0)
    return options, part, not geometry.block_device


@dataclasses.dataclass
class Attachment:
    """One attached image, as stored in ``<state dir>/<nbdN>.json``."""

    device: str          # /dev/nbdN
    image: str           # the image's real path
    mode: str            # direct | buffered
    readonly: bool
    socket: str
    pid: int             # the supervisor (``nbdloop serve``), the agent's child
    server_pid: int      # nbdkit, under the supervisor
    connections: int
    block_size: int
    log: str
    started: str         # ISO 8601, local time
    agent_pid: int = 0   # the device's agent, which outlives the servers it starts
    agent_started: int = 0   # with the pid, the agent's identity (see process_started)
    state: str = "starting"        # starting | attached | recovering | stale
    since: float = 0.0             # when it entered that state (time.time())
    reason: str = ""               # why it is recovering or stale
    timeout: int = DEFAULT_TIMEOUT
    recover_timeout: int = DEFAULT_RECOVER_TIMEOUT
    identifier: str = ""           # the kernel's backend identifier for the device
    recoveries: int = 0
    last_recovery: dict | None = None   # cause, seconds, at
    mlock: bool = False            # serve --mlock
    stats_file: str = ""           # serve --stats-file
    offset: int = 0        # the slice of the image served (losetup's columns); 0: from
    sizelimit: int = 0     # its start, 0: to its end
    partscan: bool = False         # attach -P: the partition table was read at attach
    processes: int = 1             # serve --processes: connection k goes to process k % n
    server_pids: list[int] = dataclasses.field(default_factory=list)   # every nbdkit

    @property
    def server_processes(self) -> list[int]:
        """The supervisor and every nbdkit under it (records from before
        --processes name only the first)."""
        return [self.pid] + (self.server_pids or [self.server_pid])

    @property
    def name(self) -> str:
        return os.path.basename(self.device)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def pidfile(self) -> Path:
        """Where the server's supervisor writes its pid: beside its socket."""
        return Path(self.socket).with_suffix(".pid")

    def server(self) -> Server:
        """The server this device is served by, as ``nbdloop serve`` runs it."""
        return Server(exports=(Export(image=self.image, mode=self.mode, readonly=self.readonly,
                                      offset=self.offset, length=self.sizelimit),),
                      mlock=self.mlock, stats_file=self.stats_file or None,
                      socket=self.socket, pidfile=str(self.pidfile))

    @classmethod
    def from_dict(cls, data: dict) -> Attachment:
        if "serve_options" in data:
            data = {**data, **_typed_serve_options(data["serve_options"])}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {n for n, f in fields.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = required - data.keys()
        if missing:
            raise ValueError(f"missing {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in fields if k in data})


def _typed_serve_options(options: list[str]) -> dict:
    """What a record of an nbdloop before the typed options held as serve's
    options, as the fields that hold them now.  The slice it repeated is in
    the record's ``offset`` and ``sizelimit``."""
    typed: dict = {}
    args = iter(options)
    for option in args:
        if option == "--mlock":
            typed["mlock"] = True
        elif option == "--stats-file":
            typed["stats_file"] = next(args, "")
        elif option in ("--offset", "--sizelimit"):
            next(args, None)
        else:
            raise ValueError(f"serve option {option} is not known to this nbdloop")
    return typed


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- what the machine offers ------------------------------------------------------

def nbd_devices(sys_block: Path = SYS_BLOCK) -> list[str]:
    """The kernel's NBD devices, as /dev paths, in device-number order."""
    try:
        names = [p.name for p in sys_block.iterdir() if _DEVICE.fullmatch(f"/dev/{p.name}")]
    except OSError:
        return []
    return [f"/dev/{n}" for n in sorted(names, key=lambda n: int(n[3:]))]


def nbd_support_problem(sys_block: Path = SYS_BLOCK, dev: Path = DEV) -> str | None:
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
    if not missing:
        return None
    return "attach needs the kernel NBD client: " + "; ".join(missing)


def _kernel_lacks_nbd_module(release: str) -> bool:
    """True when modprobe finds no nbd driver for the kernel, neither built
    in nor among its modules (a dry run: nothing is loaded).  Without
    modprobe we cannot tell (False), so the advice is then to try it."""
    try:
        p = subprocess.run(["modprobe", "--dry-run", "--quiet", "--set-version", release, "nbd"],
                           capture_output=True)
    except FileNotFoundError:
        return False
    return p.returncode != 0


BLKRRPART = 0x125F


def read_partitions(device: str) -> None:
    """Make the kernel read ``device``'s partition table now (attach -P):
    the partitions are there when this returns.  The driver would read it
    only at the next open of the device, which udev does but a machine
    without it may never."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise AttachFailed(f"{device}: cannot open it to read its partitions: "
                           f"{e.strerror}") from None
    try:
        fcntl.ioctl(fd, BLKRRPART)
    except OSError as e:
        hint = ""
        if _nbd_max_part() == 0:
            hint = " (the nbd driver was loaded with max_part=0: reload it with max_part=16)"
        raise AttachFailed(f"{device}: the kernel did not read its partition table: "
                           f"{e.strerror}{hint}") from None
    finally:
        os.close(fd)


def _nbd_max_part() -> int | None:
    try:
        return int(Path("/sys/module/nbd/parameters/max_part").read_text())
    except (OSError, ValueError):
        return None


def partitions(device: str, sys_block: Path = SYS_BLOCK) -> list[str]:
    """The partitions the kernel has of ``device``, as /dev paths, in order."""
    name = os.path.basename(device)
    try:
        found = [p.name for p in (sys_block / name).iterdir()
                 if re.fullmatch(re.escape(name) + r"p\d+", p.name)]
    except OSError:
        return []
    return [f"/dev/{p}" for p in sorted(found, key=lambda p: int(p[len(name) + 1:]))]


def device_connected(device: str, sys_block: Path = SYS_BLOCK) -> bool:
    """The kernel shows a connected NBD device by a ``pid`` file in sysfs."""
    return (sys_block / os.path.basename(device) / "pid").exists()


def check_device_name(device: str) -> str:
    """``/dev/nbdN`` -> ``nbdN``; anything else is refused."""
    m = _DEVICE.fullmatch(device)
    if m is None:
        raise DeviceNameError(f"{device}: not an NBD device name (expected /dev/nbdN)")
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
    raise AttachFailed("no free NBD device (load more with `modprobe nbd nbds_max=N`)")


def users(device: str) -> tuple[list[str], list[str]]:
    """What uses ``device``, as lsblk sees it: where it or a partition of it
    is mounted (or [SWAP]), and the devices stacked on them (device mapper,
    md).  lsblk unescapes mount points and follows holders of partitions."""
    p = subprocess.run(["lsblk", "--json", "--paths", "--output", "NAME,TYPE,MOUNTPOINTS",
                        device], capture_output=True, text=True)
    if p.returncode != 0:
        raise AttachFailed(f"cannot tell whether {device} is in use: "
                           f"{p.stderr.strip() or f'lsblk exited {p.returncode}'}")
    mounts: list[str] = []
    stacked: list[str] = []
    todo = [(node, True) for node in json.loads(p.stdout)["blockdevices"]]
    while todo:
        node, top = todo.pop()
        mounts += [m for m in node.get("mountpoints") or [] if m]
        if not top and node.get("type") != "part":
            stacked.append(os.path.basename(node["name"]))
        todo += [(child, False) for child in node.get("children", [])]
    return mounts, stacked


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


def read_record(path: Path) -> Attachment:
    return Attachment.from_dict(json.loads(path.read_text()))


def agent_alive(att: Attachment) -> bool:
    """True while the recorded agent runs."""
    return (att.agent_pid > 0 and att.agent_started > 0
            and process_started(att.agent_pid) == att.agent_started)


def state_of(att: Attachment, sys_block: Path = SYS_BLOCK) -> str:
    """``attached``: served and the kernel connected; ``recovering``: the
    agent is replacing a server that died, while the kernel holds the
    device's requests; ``starting``; ``disconnected``: served, but someone
    disconnected the device (nbd-client -d); ``stale``: the agent has died
    or given up, so the device fails its I/O."""
    if not agent_alive(att) or att.state == "stale":
        return "stale"
    if att.state in ("recovering", "starting"):
        return att.state
    return "attached" if device_connected(att.device, sys_block) else "disconnected"


def stale_reason(att: Attachment) -> str:
    if att.state == "stale" and att.reason:
        return att.reason
    if agent_alive(att):
        return ""
    alive = device_connected(att.device) and _serves(att.server_pid, att)
    return (f"its agent (pid {att.agent_pid}) has died"
            + (": the device works while its server runs, but will not recover" if alive
               else ""))


def describe(att: Attachment, sys_block: Path = SYS_BLOCK, now: float | None = None) -> dict:
    """What ``list --json`` shows for one attachment."""
    data = att.as_dict()
    for private in ("agent_started", "mlock", "stats_file", "since"):
        del data[private]
    state = state_of(att, sys_block)
    data["state"] = state
    data["reason"] = stale_reason(att) if state == "stale" else att.reason
    data["state_seconds"] = round((now or time.time()) - att.since, 1) if att.since else None
    data["partitions"] = partitions(att.device, sys_block)
    return data


def remove_files(state_dir: Path, att: Attachment) -> None:
    """The record and what its server left: the socket, the log, the pidfile
    and serve's ready files, which a killed server could not remove."""
    ready = ready_files(att.image, att.pid, att.processes) if att.pid else []
    for path in (Path(att.socket), Path(att.log), att.pidfile,
                 state_file(state_dir, att.device), *ready):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# ---- the server -------------------------------------------------------------------

def server_error(log: Path) -> str:
    """The reason a server failed, in one line, from its log: serve's own
    ``nbdloop: ...`` refusal, else the last error nbdkit or Python printed,
    else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    noise = ("nbdloop: serving ", "nbdloop: server exited", "nbdloop: warning",
             "nbdloop agent: ")
    for line in reversed(lines):
        if line.startswith("nbdloop: ") and not line.startswith(noise):
            return line.removeprefix("nbdloop: ")
    for line in reversed(lines):
        if re.search(r"\b\w*Error\b|\berror\b", line) and not line.startswith(noise):
            return line
    return lines[-1] if lines else "no output"


def stop_agent(att: Attachment, timeout: float = AGENT_STOP_TIMEOUT) -> None:
    """SIGTERM the agent and wait for it (it stops its server cleanly);
    SIGKILL if it does not go.  A server left by an agent that was killed
    is stopped here too."""
    _terminate(att.agent_pid, lambda: agent_alive(att), timeout)
    for pid in att.server_processes:
        _terminate(pid, lambda pid=pid: _serves(pid, att), 5.0)


def _serves(pid: int, att: Attachment) -> bool:
    """True while ``pid`` is a server of ``att``: its command line names the
    socket (the supervisor, nbdkit) or, for nbdkit handed its sockets by
    ``serve --processes``, the image."""
    if pid <= 0:
        return False
    args = cmdline(pid) or []
    return att.socket.encode() in args or f"file={att.image}".encode() in args


# ---- attach and detach --------------------------------------------------------------

def new_identifier(image: str) -> str:
    """The kernel's backend identifier for a new attachment: unique (so a
    connection for another device, even of the same image, is refused) and
    readable in /sys/block/nbdN/backend."""
    return f"nbdloop:{os.urandom(6).hex()}:{image}"


def attach(state_dir: Path, image: str, options: Options = Options(), *,
           sys_block: Path = SYS_BLOCK) -> Attachment:
    """Serve ``image`` and connect a kernel NBD device to it, through a new
    agent.  On any failure nothing is left behind: the agent stops the
    server and removes the record before it reports."""
    from nbdloop.kernel import agent

    with locked(state_dir):
        att, _ = _claim(state_dir, image, options, sys_block=sys_block)
        problem = agent.spawn(state_dir, att)
        if problem is not None:
            Path(att.log).unlink(missing_ok=True)
            raise problem
        found = find(state_dir, att.device)
    if found is None:
        raise AttachFailed(f"{att.device}: the agent reported success but left no record")
    if options.partscan:
        try:
            read_partitions(found.device)
        except AttachFailed:
            detach(state_dir, found.device, sys_block=sys_block)
            raise
    return found


def attach_foreground(state_dir: Path, image: str, options: Options, *,
                      on_ready: Callable[[Attachment], None],
                      sys_block: Path = SYS_BLOCK) -> int:
    """attach, with this process as the device's agent until detach (attach
    --foreground: a systemd service's main process); ``on_ready(record)``
    once the device is connected.  An image whose agent has died while its
    device stays connected (the service's last main process, killed) is
    taken over: its server is killed and replaced, as in a recovery, under
    the mounted filesystem, with the options of its record.  Returns the
    agent's exit status."""
    from nbdloop.kernel import agent

    with contextlib.ExitStack() as lock:
        lock.enter_context(locked(state_dir))
        att, adopted = _claim(state_dir, image, options, sys_block=sys_block, adopt=True)
        if adopted:
            for pid in att.server_processes:
                _terminate(pid, lambda pid=pid: _serves(pid, att), 10.0, signal.SIGKILL)

        def ready() -> None:
            lock.close()        # the agent's watch lasts until detach
            if att.partscan and not adopted:
                try:
                    read_partitions(att.device)
                except AttachFailed as e:
                    print(f"nbdloop: warning: {e}", file=sys.stderr, flush=True)
            on_ready(att)

        return agent.run_here(state_dir, att, ready, resume=adopted)


def _claim(state_dir: Path, image: str, options: Options, *, sys_block: Path = SYS_BLOCK,
           adopt: bool = False) -> tuple[Attachment, bool]:
    """Under the state lock: a new record for ``image`` on a free device, or
    (``adopt``) the record of its connected device whose agent has died.
    Returns it and whether it was adopted."""
    block_size = options.block_size or 4096
    if block_size not in BLOCK_SIZES:
        raise AttachError(f"block size {block_size} is not one of "
                          f"{', '.join(map(str, BLOCK_SIZES))}")
    real = os.path.realpath(image)
    for other in load(state_dir):
        if other.image == real:
            if adopt and not agent_alive(other) and device_connected(other.device, sys_block):
                other.reason = f"its agent (pid {other.agent_pid}) had died"
                return other, True
            hint = (f" (its server has died: `nbdloop detach {other.device}` cleans up)"
                    if state_of(other, sys_block) == "stale" else "")
            raise AttachError(f"{image}: already attached to {other.device}{hint}")
    device = choose_device(state_dir, options.device, sys_block)
    name = check_device_name(device)
    sock, pidfile, log = (str(state_dir / f"{name}.{s}") for s in ("sock", "pid", "log"))
    for leftover in (sock, pidfile, log):
        Path(leftover).unlink(missing_ok=True)
    return Attachment(device=device, image=real, mode=options.mode, readonly=options.readonly,
                      socket=sock, pid=0, server_pid=0, connections=options.connections,
                      block_size=block_size, log=log, started=now_iso(),
                      timeout=options.timeout, recover_timeout=options.recover_timeout,
                      identifier=new_identifier(real), mlock=options.mlock,
                      stats_file=options.stats_file or "", offset=options.offset,
                      sizelimit=options.sizelimit, partscan=options.partscan,
                      processes=options.processes), False


def detach(state_dir: Path, target: str, *, sys_block: Path = SYS_BLOCK
           ) -> tuple[Attachment, str]:
    """Disconnect the kernel client of ``target`` (device or image), stop its
    agent and server and forget it.  Returns the attachment and the state it
    was in.

    A connected device that is mounted or held is refused, whatever its
    state: the kernel would disconnect it under the filesystem, and a stale
    one may still be served (its agent died, not its server) and be taken
    over (attach --foreground).  For a stale one the disconnect is best
    effort."""
    with locked(state_dir):
        att = find(state_dir, target)
        if att is None:
            raise AttachError(f"{target}: not attached (see nbdloop list)")
        state = state_of(att, sys_block)
        if device_connected(att.device, sys_block):
            where, held = users(att.device)
            if where or held:
                why = f"mounted on {where[0]}" if where else f"held by {', '.join(held)}"
                raise AttachError(f"{att.device} is {why}: unmount it first")
        if state != "stale":
            # The agent disconnects the device and stops (it has netlink open).
            _terminate(att.agent_pid, lambda: agent_alive(att), AGENT_STOP_TIMEOUT,
                       signal.SIGUSR1)
        if device_connected(att.device, sys_block):
            from nbdloop.kernel import netlink
            try:
                with netlink.Nbd() as nl:
                    nl.disconnect(netlink.device_index(att.device))
            except netlink.KernelError as e:
                if state != "stale":
                    raise AttachFailed(f"{att.device}: {e}") from None
        stop_agent(att)
        remove_files(state_dir, att)
    return att, state


def restart(state_dir: Path, target: str, timeout: float) -> tuple[Attachment, Attachment]:
    """Ask the agent of ``target`` to replace its server (and itself, with
    the nbdloop now installed) and wait until it has.  Returns the record
    before and after."""
    att = find(state_dir, target)
    if att is None:
        raise AttachError(f"{target}: not attached (see nbdloop list)")
    if state_of(att) == "stale":
        raise AttachError(f"{att.device} is stale ({stale_reason(att)}): "
                          "detach it and attach again")
    before = att
    os.kill(att.agent_pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = find(state_dir, att.device)
        if now is None:
            raise AttachFailed(f"{att.device} was detached during the restart")
        if now.state == "stale" or not agent_alive(now):
            raise AttachFailed(f"{att.device}: the restart failed: {stale_reason(now)}")
        if now.state == "attached" and now.server_pid != before.server_pid:
            return before, now
    raise AttachFailed(f"{att.device}: no new server within {timeout:g} s "
                      f"(state {state_of(find(state_dir, att.device) or att)})")
