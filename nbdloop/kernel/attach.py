"""Attach images to kernel NBD devices, like ``losetup``: what an attachment
is, and what the machine offers.

The daemon (:mod:`nbdloop.daemon`) owns every attachment: it serves the
image from one of its servers and connects a kernel NBD device to it.
Each attachment is one JSON file in a state directory (the CLI uses
``<runtime dir>/attached``), named after the device (``nbd0.json``),
written by the daemon alone.

This module holds that record, the checks made before an attach, and what
the kernel and lsblk say about devices.  No click: the CLI and the daemon
turn :class:`AttachError` into one line.

Timeouts: the request timeout (``timeout``, nbd-client's ``-timeout``) is how
long the kernel waits for an answer before it declares the connection dead.
With recovery on (``recover_timeout`` > 0, the kernel's dead-connection
timeout) that starts a recovery, not an error: the daemon replaces the
server and the kernel resends the request.  So the request timeout also
bounds how long a request that a dying server had read stays unanswered.
With recovery off, a dead connection fails the I/O, which shuts the
filesystem down, as nbd-client's devices do.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import subprocess
import time
from pathlib import Path

from nbdloop import paths
from nbdloop.extents import write_zeros
from nbdloop.engine.backing import adopt_image, open_image
from nbdloop.kernel.nbdclient import BLOCK_SIZES, DEFAULT_TIMEOUT
from nbdloop.process import process_started
from nbdloop.serve.cmdline import Slice, require_permissions, require_slice

SYS_BLOCK = Path("/sys/block")
DEV = Path("/dev")
SYS_MODULE_NBD = Path("/sys/module/nbd")
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
    kernel refused, time ran out."""

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
    ref: str | None = None         # /dev/nbdloop/by-ref/REF (losetup --loop-ref)


#: A reference names a link in /dev/nbdloop/by-ref: never a path of its own.
REF_MAX = 64
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:@-]{0,%d}" % (REF_MAX - 1))


def check_ref(ref: str) -> str:
    """``ref`` if it can name a device: 1 to 64 of ``A-Z a-z 0-9 . _ + : @
    -``, the first a letter or a digit (so never ``.`` or ``..``)."""
    if not _REF.fullmatch(ref):
        raise AttachError(f"{ref[:80]!r}: not a reference name (1 to {REF_MAX} letters, "
                          "digits and . _ + : @ -, starting with a letter or a digit)")
    return ref


def check_options(image: str, options: Options,
                  fd: int | None = None) -> tuple[Options, Slice, bool]:
    """Refuse what attach cannot do with ``image`` before anything starts,
    the way serve will; returns the options with the block size chosen,
    the slice served, and whether the image is a regular file.  ``fd``: the
    image is that open file (a user's), not opened here by its path."""
    if fd is None:
        require_permissions(image, options.readonly)
        fd, geometry = open_image(image, mode=options.mode, readonly=options.readonly,
                                  lock=False)
        os.close(fd)
    else:
        geometry = adopt_image(fd, image, mode=options.mode, readonly=options.readonly,
                               lock=False)
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
    if options.ref is not None:
        check_ref(options.ref)
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
    socket: str          # the server's socket (the first, for a group of several)
    pid: int             # the server serving the device (nbdkit; the first of several)
    server_pid: int      # the same: list's PID and the records of before both name it
    connections: int
    block_size: int
    log: str             # the server's log
    started: str         # ISO 8601, local time
    state: str = "starting"        # starting | attached | recovering | detaching | stale
    since: float = 0.0             # when it entered that state (time.time())
    reason: str = ""               # why it is recovering or stale
    timeout: int = DEFAULT_TIMEOUT
    recover_timeout: int = DEFAULT_RECOVER_TIMEOUT
    identifier: str = ""           # the kernel's backend identifier for the device
    recoveries: int = 0
    last_recovery: dict | None = None   # cause, seconds, at
    mlock: bool = False            # served by a server with locked memory
    stats_file: str = ""           # served by a server of its own that writes its counters
    offset: int = 0        # the slice of the image served (losetup's columns); 0: from
    sizelimit: int = 0     # its start, 0: to its end
    partscan: bool = False         # attach -P: the partition table was read at attach
    processes: int = 1             # server processes of its own: connection k to k % n
    server_pids: list[int] = dataclasses.field(default_factory=list)   # every nbdkit
    group: str = ""                # the daemon's server group (nbdloop.daemon.servers)
    export: str = ""               # the export name the device's connections ask for
    made: bool = False             # the device was made for it, and goes at detach
    ref: str = ""                  # its name in /dev/nbdloop/by-ref
    # Who attached it: root (0), or a user whose image the daemon opens only
    # with the user's rights (nbdloop.daemon.users), and only as the file
    # that was sent: its device and inode.
    owner: int = 0
    owner_gid: int = 0
    owner_groups: list[int] = dataclasses.field(default_factory=list)
    image_id: list[int] = dataclasses.field(default_factory=list)
    # A device attached by the per-device agent of an nbdloop before the
    # daemon: the daemon stops that agent and takes the device over.
    agent_pid: int = 0
    agent_started: int = 0

    @property
    def name(self) -> str:
        return os.path.basename(self.device)

    @property
    def index(self) -> int:
        return int(self.name[3:])

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def agent_alive(self) -> bool:
        """True while the agent of an nbdloop before the daemon runs."""
        return (self.agent_pid > 0 and self.agent_started > 0
                and process_started(self.agent_pid) == self.agent_started)

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
    if not nbd_devices(sys_block) and not list(dev.glob("nbd[0-9]*")) and \
            not (sys_block.parent / "module" / "nbd").is_dir():
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


def choose_device(taken: set[str], wanted: str | None,
                  sys_block: Path = SYS_BLOCK) -> tuple[str, bool]:
    """The device to attach, and whether the kernel will make it (it has
    no such device yet: the driver adds one when it is connected).
    ``wanted`` if it is free, else the first free device the kernel has,
    else the first number it has none of.  Free means: the kernel has not
    connected it and no attachment (``taken``, even a stale one) names it."""
    if wanted is not None:
        check_device_name(wanted)
        if wanted in taken:
            raise AttachError(f"{wanted}: already attached by nbdloop (see nbdloop list)")
        if device_connected(wanted, sys_block):
            raise AttachError(f"{wanted}: in use (connected by another NBD client)")
        return wanted, not (sys_block / os.path.basename(wanted)).is_dir()
    have = nbd_devices(sys_block)
    for device in have:
        if device not in taken and not device_connected(device, sys_block):
            return device, False
    numbers = {int(d[8:]) for d in have} | {int(d[8:]) for d in taken}
    n = 0
    while n in numbers:
        n += 1
    return f"/dev/nbd{n}", True


def in_use(device: str) -> str | None:
    """Why ``device`` may not go or shrink (``mounted on /mnt``, ``held by
    dm-0``), or None if nothing uses it."""
    where, held = users(device)
    if where:
        return f"mounted on {where[0]}"
    if held:
        return f"held by {', '.join(held)}"
    return None


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


def device_size(device: str, sys_block: Path = SYS_BLOCK) -> int:
    """The device's size in bytes, as the kernel has it now."""
    try:
        return int((sys_block / os.path.basename(device) / "size").read_text()) * 512
    except (OSError, ValueError):
        raise AttachFailed(f"{device}: the kernel does not say its size") from None


# ---- resize -------------------------------------------------------------------------

def check_resize(att: Attachment, size: int, align: int) -> None:
    """Refuse a device size the device, or in direct mode its image, could
    not have (``align``: the image's direct-I/O alignment)."""
    unit = max(att.block_size, align if att.mode == "direct" else 1)
    if size <= 0 or size % unit or (att.offset + size) % (align if att.mode == "direct" else 1):
        raise AttachError(f"{att.device}: {size} bytes is not a multiple of "
                          f"{unit} (its block size"
                          + (" and the image's direct-I/O alignment)" if unit > att.block_size
                             else ")"))


def grow_image(fd: int, image: str, end: int, preallocate: bool) -> None:
    """Make the image ``end`` bytes long, its new bytes written with zeros
    if ``preallocate`` (as ``create --preallocate``)."""
    have = os.fstat(fd).st_size
    try:
        os.ftruncate(fd, end)
        if preallocate:
            write_zeros(fd, have, end)
    except OSError as e:
        os.ftruncate(fd, have)
        raise AttachFailed(f"{image}: cannot make it {end} bytes: {e.strerror}") from None


# ---- state --------------------------------------------------------------------------

def state_file(state_dir: Path, device: str) -> Path:
    return state_dir / f"{os.path.basename(device)}.json"


def save(state_dir: Path, att: Attachment) -> None:
    paths.write_whole(state_file(state_dir, att.device),
                      json.dumps(att.as_dict(), indent=2) + "\n")


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


def find(attachments, target: str) -> Attachment | None:
    """The attachment of a device (``/dev/nbd0`` or ``nbd0``), a reference
    name or an image path, among ``attachments``."""
    device = target if target.startswith("/dev/") else f"/dev/{target}"
    image = os.path.realpath(target)
    for att in attachments:
        if att.device == device or (att.ref and att.ref == target):
            return att
    for att in attachments:
        if att.image == image:
            return att
    return None


def state_of(att: Attachment, sys_block: Path = SYS_BLOCK) -> str:
    """``attached``: served and the kernel connected; ``recovering``: the
    daemon is replacing a server that died, while the kernel holds the
    device's requests; ``starting``, ``detaching``; ``disconnected``:
    served, but someone disconnected the device (nbd-client -d); ``stale``:
    the daemon gave up on it (or could not start), so the device fails its
    I/O."""
    if att.state != "attached":
        return att.state
    return "attached" if device_connected(att.device, sys_block) else "disconnected"


def describe(att: Attachment, sys_block: Path = SYS_BLOCK, now: float | None = None) -> dict:
    """What ``list --json`` shows for one attachment."""
    data = att.as_dict()
    for private in ("agent_pid", "agent_started", "mlock", "stats_file", "since", "group",
                    "export", "made", "owner_gid", "owner_groups", "image_id"):
        del data[private]
    data["state"] = state_of(att, sys_block)
    data["state_seconds"] = round((now or time.time()) - att.since, 1) if att.since else None
    data["partitions"] = partitions(att.device, sys_block)
    try:
        data["size"] = device_size(att.device, sys_block)
    except AttachFailed:
        data["size"] = 0
    return data


def remove(state_dir: Path, att: Attachment) -> None:
    """The record and the export file of an attachment."""
    for path in (state_file(state_dir, att.device), export_file(state_dir, att)):
        path.unlink(missing_ok=True)


def export_file(state_dir: Path, att: Attachment) -> Path:
    """Where the daemon tells its servers what the device's export is."""
    return state_dir / "exports" / f"{att.export or att.name}.json"


# ---- attach -------------------------------------------------------------------------

def new_identifier(image: str) -> str:
    """The kernel's backend identifier for a new attachment: unique (so a
    connection for another device, even of the same image, is refused) and
    readable in /sys/block/nbdN/backend."""
    return f"nbdloop:{os.urandom(6).hex()}:{image}"
