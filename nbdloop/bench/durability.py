"""How long an acknowledged write stays off the disk: the write-back window
of each mode, measured.

The image lives on ext4 on a loop device with direct I/O, in a scratch set
up here and removed afterwards.  After each acknowledgement, and at later
moments, the write's bytes are read back from the loop device itself, with
O_DIRECT, at the image's FIEMAP offsets.  What makes that a fair probe:

- the block device is read, never the image: an O_DIRECT read of the image
  writes its dirty pages back first, and a buffered read of the device
  returns the device's own page cache, which is stale;
- FIEMAP is asked without FIEMAP_FLAG_SYNC (which writes back too), and
  the map taken at the start must still hold at the end;
- the image is fully written and synced first, so no write needs new
  metadata: a write into an unwritten extent is on the device, yet reads
  as zeros after a crash until the journal commits the conversion;
- every write carries its own content (the run, its sequence number and
  offset in each block), and no two writes of a run touch the same bytes,
  so "on the device" means this write's bytes, not an earlier one's.

A control without a server (a buffered pwrite and an O_DIRECT pwrite on the
image) shows that the probe tells the two apart.
"""
from __future__ import annotations

import contextlib
import importlib
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nbdloop import extents
from nbdloop.bench.run import drop_image_cache, have, prepare_image
from nbdloop.paths import SBIN_PATH
from nbdloop.serve import children as srv

KiB, MiB = 1 << 10, 1 << 20
#: The unit a write lands in: the page (and the scratch filesystem's block).
BLOCK = 4 * KiB
#: Of every 32 writes, 1 of 1 MiB and 3 of 64 KiB; the rest are 4 KiB.
SIZES = ((MiB, 1), (64 * KiB, 3))
QUEUE_DEPTH = 32
#: Where the scratch goes: /tmp may be a tmpfs, which has no block device.
SCRATCH_PARENT = "/var/tmp"
TOOLS = ("losetup", "mkfs.ext4", "mount", "umount", "sync", "nbdkit")
LARGEST = max(size for size, _ in SIZES)
#: FIEMAP flags under which an extent's physical offset does not say where
#: its plain bytes are: UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED,
#: NOT_ALIGNED, DATA_INLINE, DATA_TAIL.
_UNPLACED = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
#: Seconds between probes of the writes not yet on the device.
INTERVAL = 0.5
#: A reply later than this is a hung server, not a slow one.
HANG = 120.0
_STAMP = struct.Struct("<IIQ")        # run, write, image offset of the block


class DurabilityError(Exception):
    """The measurement could not run, or its figures would be void; one line."""

    exit_status = 1


# ---- what is measured ---------------------------------------------------------------

@dataclass
class Write:
    seq: int
    offset: int                 # in the image
    data: bytes = field(repr=False)
    #: (device offset, offset within data, length), from the image's map.
    pieces: list[tuple[int, int, int]] = field(default_factory=list, repr=False)
    acked: float | None = None  # time.monotonic() at acknowledgement
    missing_at_ack: int = 0     # bytes not on the device then
    missing: int = 0            # bytes not on the device at the last probe
    landed: float | None = None  # when the probe first found all of it

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass
class PhaseResult:
    """One phase of one subject: its writes, and what of them was not on
    the block device when."""
    subject: str        # nbdloop-direct, nbdloop-buffered, control-pwrite, control-odirect
    phase: str          # qd1, qd32, fua, flush
    depth: int
    fua: bool
    writes: int
    bytes: int
    sizes: dict[str, int]               # write size (bytes) -> how many
    ack_seconds: float                  # from the first acknowledgement to the last
    missing_at_ack: int                 # bytes, each write probed at its acknowledgement
    writes_missing_at_ack: int
    #: (seconds since the phase's last acknowledgement, bytes not on the
    #: device); the first at 0 is missing_at_ack.  Only observed phases have more.
    samples: list[tuple[float, int]]
    observed: bool = False
    #: Seconds from acknowledgement to the first probe that found the
    #: whole write, fastest and slowest, of the writes not there at
    #: acknowledgement (None if every write was).
    landed_after: tuple[float, float] | None = None
    missing_at_end: int | None = None   # bytes still not there when observing stopped
    writes_missing_at_end: int | None = None
    missing_before_flush: int | None = None
    missing_after_flush: int | None = None


@dataclass
class Durability:
    modes: list[str]
    writes_per_phase: int
    window: float
    interval: float = INTERVAL
    image_size: int = 0
    scratch: str = ""           # the directory that held it all, gone afterwards
    device: str = ""
    filesystem: str = "ext4"
    dirty_expire_centisecs: int | None = None
    dirty_writeback_centisecs: int | None = None
    phases: list[PhaseResult] = field(default_factory=list)
    error: str = ""


class Phase:
    """A phase in progress: its writes and the probes made so far."""

    def __init__(self, subject: str, name: str, writes: list[Write], depth: int = 1,
                 fua: bool = False) -> None:
        self.subject, self.name, self.writes = subject, name, writes
        self.depth, self.fua = depth, fua
        self.samples: list[tuple[float, int]] = []
        self.observed = False
        self.before_flush: int | None = None
        self.after_flush: int | None = None

    @property
    def last_ack(self) -> float:
        return max(w.acked for w in self.writes)

    def missing_now(self) -> int:
        return sum(w.missing for w in self.writes)

    def result(self) -> PhaseResult:
        acks = [w.acked for w in self.writes]
        late = [w.landed - w.acked for w in self.writes
                if w.missing_at_ack and w.landed is not None]
        lengths = [w.length for w in self.writes]
        at_ack = sum(w.missing_at_ack for w in self.writes)
        return PhaseResult(
            subject=self.subject, phase=self.name, depth=self.depth, fua=self.fua,
            writes=len(self.writes), bytes=sum(lengths),
            sizes={str(n): lengths.count(n) for n in sorted(set(lengths))},
            ack_seconds=max(acks) - min(acks), missing_at_ack=at_ack,
            writes_missing_at_ack=sum(1 for w in self.writes if w.missing_at_ack),
            samples=[(0.0, at_ack), *self.samples], observed=self.observed,
            landed_after=(min(late), max(late)) if late else None,
            missing_at_end=self.missing_now() if self.observed else None,
            writes_missing_at_end=(sum(1 for w in self.writes if w.missing)
                                   if self.observed else None),
            missing_before_flush=self.before_flush, missing_after_flush=self.after_flush)


# ---- the writes ---------------------------------------------------------------------

def pattern(run: int, seq: int, offset: int, length: int) -> bytes:
    """Content that only this write of this run has: each block stamped
    with the run, the write and the block's own offset in the image."""
    return b"".join(_STAMP.pack(run, seq, offset + b) * (BLOCK // _STAMP.size)
                    for b in range(0, length, BLOCK))


def write_sizes(n: int, seed: int) -> list[int]:
    """``n`` write sizes in the proportions of SIZES, each size at least
    once where ``n`` allows, in an order fixed by ``seed``."""
    sizes: list[int] = []
    for size, per32 in SIZES:
        if len(sizes) + 1 < n:
            sizes += [size] * max(1, n * per32 // 32)
    sizes = sizes[:n] + [BLOCK] * (n - len(sizes))
    random.Random(seed).shuffle(sizes)
    return sizes


def phase_bytes(n: int) -> int:
    return sum(write_sizes(n, 0))


class Layout:
    """Hands out writes at fresh offsets of the image, so that no two writes
    of the run share a byte, each placed on the device by the image's map."""

    def __init__(self, run: int, extent_map: list[extents.Extent]) -> None:
        self.run = run
        self.extent_map = extent_map
        self.next_offset = 0
        self.seq = 0

    def writes(self, n: int) -> list[Write]:
        out = []
        for size in write_sizes(n, self.seq):
            self.seq += 1
            w = Write(self.seq, self.next_offset,
                      pattern(self.run, self.seq, self.next_offset, size))
            place(w, self.extent_map)
            out.append(w)
            self.next_offset += size
        return out


def place(w: Write, extent_map: list[extents.Extent]) -> None:
    """Where ``w``'s bytes are on the device, from the image's extents."""
    w.pieces = []
    end = w.offset + w.length
    for e in extent_map:
        lo, hi = max(w.offset, e.logical), min(end, e.logical + e.length)
        if lo < hi:
            w.pieces.append((e.physical + lo - e.logical, lo - w.offset, hi - lo))
    if sum(p[2] for p in w.pieces) != w.length:
        raise DurabilityError(f"the image's extents do not cover {w.offset}+{w.length}")


# ---- the probe ----------------------------------------------------------------------

class Probe:
    """Reads a write's bytes back from the block device under the image,
    with O_DIRECT (into an aligned buffer), and counts those not there yet."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        self.buf = mmap.mmap(-1, LARGEST)     # page-aligned, as O_DIRECT wants

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
            self.buf.close()

    def missing(self, w: Write) -> int:
        """Bytes of ``w`` not on the device, in whole blocks: a page is
        written back whole or not at all."""
        absent = 0
        view = memoryview(self.buf)
        for dev_offset, start, length in w.pieces:
            got = view[:length]
            n = os.preadv(self.fd, [got], dev_offset)
            if n != length:
                raise DurabilityError(f"read of {self.device} at {dev_offset}+{length}: "
                                      f"{n} bytes")
            want = w.data[start:start + length]
            # bytes() first: comparing memoryviews goes element by element.
            if got.tobytes() == want:
                continue
            absent += sum(BLOCK for b in range(0, length, BLOCK)
                          if got[b:b + BLOCK].tobytes() != want[b:b + BLOCK])
        return absent

    def ack(self, w: Write) -> None:
        w.acked = time.monotonic()
        w.missing_at_ack = w.missing = self.missing(w)
        if not w.missing:
            w.landed = w.acked


def observe(phases: list[Phase], probe: Probe, window: float, interval: float) -> None:
    """Probe the writes not on the device every ``interval`` seconds until
    the last has landed or ``window`` seconds have passed."""
    pending = [w for p in phases for w in p.writes if w.missing]
    start = time.monotonic()
    for p in phases:
        p.observed = True
    tick = 1
    while pending and tick * interval <= window:
        time.sleep(max(0.0, start + tick * interval - time.monotonic()))
        tick += 1
        now = time.monotonic()
        for w in pending:
            w.missing = probe.missing(w)
            if not w.missing:
                w.landed = time.monotonic()
        pending = [w for w in pending if w.missing]
        for p in phases:
            if p.samples or any(w.missing_at_ack for w in p.writes):
                p.samples.append((now - p.last_ack, p.missing_now()))


def probe_all(phase: Phase, probe: Probe) -> int:
    for w in phase.writes:
        w.missing = probe.missing(w)
    return phase.missing_now()


# ---- the subjects ---------------------------------------------------------------------

def control(image: str, phase: Phase, probe: Probe, direct: bool) -> None:
    """pwrite on the image, buffered or O_DIRECT, each write probed when
    pwrite returns: what "acknowledged" is without a server."""
    fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, max(w.length for w in phase.writes))
    try:
        for w in phase.writes:
            buf[:w.length] = w.data
            n = os.pwrite(fd, memoryview(buf)[:w.length], w.offset)
            if n != w.length:
                raise DurabilityError(f"pwrite at {w.offset}+{w.length} on {image}: {n} bytes")
            probe.ack(w)
    finally:
        os.close(fd)
        buf.close()


def nbd_writes(h, phase: Phase, probe: Probe) -> None:
    """The phase's writes over NBD, ``phase.depth`` of them in flight, each
    probed in its completion callback: right after its acknowledgement."""
    import nbd
    flags = nbd.CMD_FLAG_FUA if phase.fua else 0
    todo = list(reversed(phase.writes))
    in_flight: dict[int, object] = {}   # the buffers, alive until their reply
    errors: list[str] = []

    def issue(w: Write) -> None:
        def done(err, w=w) -> int:
            del in_flight[w.seq]
            if err.value:
                errors.append(f"pwrite at {w.offset}+{w.length}: {os.strerror(err.value)}")
            else:
                try:
                    probe.ack(w)
                except (OSError, DurabilityError) as e:
                    errors.append(str(e))
            return 1
        in_flight[w.seq] = buf = nbd.Buffer.from_bytearray(w.data)
        h.aio_pwrite(buf, w.offset, completion=done, flags=flags)

    deadline = time.monotonic() + HANG
    while todo or in_flight:
        while todo and len(in_flight) < phase.depth and not errors:
            issue(todo.pop())
        if errors and not in_flight:
            break
        h.poll(1000)
        if time.monotonic() > deadline:
            raise DurabilityError(f"no reply from the server in {HANG:g} s")
    if errors:
        raise DurabilityError(errors[0])


def measure_server(image: str, workdir: str, mode: str, layout: Layout, probe: Probe,
                   n: int, window: float, interval: float,
                   progress: Callable[[str], None]) -> list[Phase]:
    """nbdloop in ``mode``: writes one at a time, then QUEUE_DEPTH at a time,
    watched until they land; then FUA writes; then writes and a FLUSH."""
    import nbd
    subject = f"nbdloop-{mode}"
    qd1 = Phase(subject, "qd1", layout.writes(n))
    qd32 = Phase(subject, f"qd{QUEUE_DEPTH}", layout.writes(n), QUEUE_DEPTH)
    fua = Phase(subject, "fua", layout.writes(n), QUEUE_DEPTH, fua=True)
    flush = Phase(subject, "flush", layout.writes(n), QUEUE_DEPTH)
    server = srv.nbdloop_server(image, workdir, name=subject, mode=mode)
    try:
        server.start()
    except srv.ServerError as e:
        raise DurabilityError(f"{subject} did not start: {str(e).splitlines()[0]}") from None
    try:
        h = nbd.NBD()
        try:
            h.connect_uri(server.uri)
            if not (h.can_fua() and h.can_flush()):
                raise DurabilityError(f"{subject} offers no FUA or FLUSH")
            for p in (qd1, qd32):
                progress(f"{subject}: {n} writes, {p.depth} in flight")
                nbd_writes(h, p, probe)
            progress(f"{subject}: watching the writes land, for up to {window:g} s")
            # Before any FUA or FLUSH: a flush is an fdatasync of the whole
            # image, which would land these writes too.
            observe([qd1, qd32], probe, window, interval)
            progress(f"{subject}: {n} FUA writes; {n} writes, then a FLUSH")
            nbd_writes(h, fua, probe)
            nbd_writes(h, flush, probe)
            flush.before_flush = probe_all(flush, probe)
            h.flush()
            flush.after_flush = probe_all(flush, probe)
        except nbd.Error as e:
            raise DurabilityError(f"{subject}: {e}") from None
        finally:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
    finally:
        server.stop()
    return [qd1, qd32, fua, flush]


# ---- the scratch ----------------------------------------------------------------------

def require_prerequisites() -> None:
    """DurabilityError, in one line, where the measurement cannot run here."""
    if os.geteuid() != 0:
        raise DurabilityError("the durability measurement needs root: it makes a loop "
                              "device, a filesystem and a mount")
    missing = [t for t in TOOLS if not have(t, SBIN_PATH)]
    if missing:
        raise DurabilityError(f"the durability measurement needs {', '.join(missing)} "
                              "(run: make setup)")
    if not Path("/dev/loop-control").exists():
        raise DurabilityError("no loop devices here (/dev/loop-control): the durability "
                              "measurement needs one")
    try:
        importlib.import_module("nbd")
    except ImportError:
        raise DurabilityError("libnbd's Python binding is missing "
                              "(apt-get install python3-libnbd)") from None


def _sh(*argv: str) -> str:
    p = subprocess.run(argv, check=False, capture_output=True, text=True,
                       env={**os.environ, "PATH": SBIN_PATH})
    if p.returncode != 0:
        why = (p.stderr.strip() or f"exit status {p.returncode}").splitlines()[-1]
        raise DurabilityError(f"{' '.join(argv)}: {why}")
    return p.stdout.strip()


def _umount(mnt: str) -> None:
    """umount, waiting a moment for a server's last file to close; a lazy
    umount if it stays busy, so that nothing is left mounted here."""
    for _ in range(20):
        if subprocess.run(["umount", mnt], check=False, capture_output=True,
                          env={**os.environ, "PATH": SBIN_PATH}).returncode == 0:
            return
        time.sleep(0.25)
    _sh("umount", "--lazy", mnt)


@dataclass
class Scratch:
    dir: str
    device: str
    mountpoint: str
    image: str


@contextlib.contextmanager
def scratch(image_size: int) -> Iterator[Scratch]:
    """A backing file in a new directory under SCRATCH_PARENT, a loop device
    with direct I/O on it, ext4 on that, mounted, and in it an image of
    ``image_size`` bytes, fully written and synced.  All of it removed on
    the way out, whatever the way."""
    with contextlib.ExitStack() as stack:
        d = tempfile.mkdtemp(prefix="nbdloop-durability-", dir=SCRATCH_PARENT)
        stack.callback(shutil.rmtree, d, ignore_errors=True)
        backing = os.path.join(d, "backing.raw")
        with open(backing, "wb") as f:
            # Room for ext4's journal and inode tables beside the image.
            f.truncate(image_size + image_size // 8 + 64 * MiB)
        dev = _sh("losetup", "--direct-io=on", "--find", "--show", backing)
        stack.callback(subprocess.run, ["losetup", "-d", dev], check=False,
                       capture_output=True, env={**os.environ, "PATH": SBIN_PATH})
        dio = Path(f"/sys/block/{os.path.basename(dev)}/loop/dio")
        if dio.exists() and dio.read_text().strip() != "1":
            raise DurabilityError(f"{dev} would not take direct I/O: what lands on it "
                                  "would sit in the page cache of its backing file")
        # No lazy initialisation: ext4lazyinit would write to the device
        # while it is being probed.
        _sh("mkfs.ext4", "-q", "-F", "-b", str(BLOCK),
            "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        mnt = os.path.join(d, "mnt")
        os.mkdir(mnt)
        _sh("mount", dev, mnt)
        stack.callback(_umount, mnt)
        image = os.path.join(mnt, "image.raw")
        prepare_image(image, image_size)
        _sh("sync", "-f", image)     # the extents' metadata too, not only the data
        drop_image_cache(image)
        yield Scratch(d, dev, mnt, image)


def image_map(image: str, size: int) -> list[extents.Extent]:
    """The image's extents, which must all be plain written blocks at known
    places on the device."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = extents.fiemap(fd, size)
        unsettled = extents.unsettled(fd, 0, size)
    finally:
        os.close(fd)
    if unsettled:
        raise DurabilityError(f"{image}: {unsettled} bytes of holes or unwritten extents "
                              "after it was written fully")
    odd = [e for e in found if e.flags & _UNPLACED]
    if odd:
        raise DurabilityError(f"{image}: an extent at {odd[0].logical} has no fixed place "
                              f"on the device (FIEMAP flags {odd[0].flags:#x})")
    return found


def _vm_setting(name: str) -> int | None:
    try:
        return int(Path(f"/proc/sys/vm/{name}").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit, so that the scratch is removed as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def measure(modes: list[str], n: int, window: float, interval: float = INTERVAL,
            progress: Callable[[str], None] = lambda what: None) -> Durability:
    """The control, then each mode in ``modes``: ``n`` writes a phase.
    DurabilityError if it cannot run, or if the image moved on the device."""
    require_prerequisites()
    phases_per_run = 2 + 4 * len(modes)
    image_size = -(-(phases_per_run * phase_bytes(n) + MiB) // MiB) * MiB
    result = Durability(list(modes), n, window, interval, image_size=image_size,
                        dirty_expire_centisecs=_vm_setting("dirty_expire_centisecs"),
                        dirty_writeback_centisecs=_vm_setting("dirty_writeback_centisecs"))
    with _sigterm_unwinds(), contextlib.ExitStack() as stack:
        progress(f"durability: scratch under {SCRATCH_PARENT}: loop device, ext4, "
                 f"{image_size // MiB} MiB image")
        s = stack.enter_context(scratch(image_size))
        result.scratch, result.device = s.dir, s.device
        before = image_map(s.image, image_size)
        layout = Layout(random.getrandbits(32), before)
        probe = Probe(s.device)
        stack.callback(probe.close)

        buffered = Phase("control-pwrite", "qd1", layout.writes(n))
        direct = Phase("control-odirect", "qd1", layout.writes(n))
        progress(f"durability: control: {n} buffered and {n} O_DIRECT pwrites, watched "
                 f"for up to {window:g} s")
        control(s.image, buffered, probe, direct=False)
        control(s.image, direct, probe, direct=True)
        observe([buffered, direct], probe, window, interval)
        phases = [buffered, direct]
        workdir = os.path.join(s.dir, "server")
        os.mkdir(workdir)
        for mode in modes:
            phases += measure_server(s.image, workdir, mode, layout, probe, n, window,
                                     interval, lambda what: progress(f"durability: {what}"))
        if image_map(s.image, image_size) != before:
            raise DurabilityError("the image's extents moved during the measurement: "
                                  "its figures are void")
    result.phases = [p.result() for p in phases]
    return result
