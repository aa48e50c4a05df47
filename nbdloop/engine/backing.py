"""The backing file: opening, checking and locking it, and serving every NBD
command on it through the io_uring engine.

This module drives the I/O: it asks :mod:`nbdloop.engine.plan` for segments,
runs them with :class:`nbdloop.engine.uring.Engine`, and merges the
completions.  It knows nothing about nbdkit, so it is used the same way by the
plugin and the tests.

Errors: a backing that cannot be served raises :class:`ImageError` (one line);
a failed request raises OSError through :func:`nbdloop.engine.uring.check`,
its message naming the request: ``pwrite at 4096+512 on disk.img: No space
left on device``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from nbdloop.engine import plan
from nbdloop.engine import uring
from nbdloop.engine.config import DEFAULT_SEG_SIZE, MODES, check_segment_size
from nbdloop.engine.plan import Segment
from nbdloop.sizes import SECTOR

DEFAULT_ENTRIES = 8
MAX_REQUEST = 32 * 1024 * 1024
FALLBACK_ALIGN = 4096

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# <linux/fs.h>
BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272


class ImageError(Exception):
    """A backing file that cannot be served, with a one-line reason."""


@dataclass(frozen=True)
class Geometry:
    size: int
    align: int          # direct-I/O alignment of offsets and lengths
    mem_align: int      # direct-I/O alignment of buffers in memory
    block_device: bool


def discover_alignment(fd: int, st: os.stat_result) -> tuple[int, int]:
    """The backing's direct-I/O alignment, ``(offset, memory)``: statx
    STATX_DIOALIGN where the kernel says; else, for a block device, its
    logical block size for both; else 4096 for both."""
    mem, off = uring.dio_alignment(fd)
    if off > 0:
        return off, mem
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
        size = struct.unpack("i", buf)[0]
        if size > 0:
            return size, size
    return FALLBACK_ALIGN, FALLBACK_ALIGN


def _size_of(fd: int, st: os.stat_result) -> int:
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return st.st_size


def open_image(path: str, *, mode: str = "direct", readonly: bool = False,
               lock: bool = True) -> tuple[int, Geometry]:
    """Open, check and lock the backing file.  Returns the fd (O_DIRECT in
    direct mode) and its geometry; raises ImageError with a one-line reason.

    Locking: a writable server holds an exclusive flock on the image, a
    read-only one a shared lock, so a second writer is refused.
    """
    if mode not in MODES:
        raise ImageError(f"unknown mode {mode!r}: use direct or buffered")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file "
                         f"(make one with: nbdloop create {path} SIZE)") from None
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a directory, not an image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(f"{path}: not a regular file or block device")

    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    if mode == "direct":
        flags |= os.O_DIRECT
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EINVAL and mode == "direct":
            raise ImageError(f"{path}: this filesystem does not support O_DIRECT; "
                             "use --mode buffered") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not readonly:
            raise ImageError(f"{path}: cannot open for writing ({e.strerror}); "
                             "use --readonly to serve it read-only") from None
        raise ImageError(f"{path}: cannot open: {e.strerror}") from None
    try:
        if lock:
            _lock(fd, path, readonly)
        geometry = inspect_fd(fd, path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, geometry


def adopt_image(fd: int, path: str, *, mode: str, readonly: bool,
                lock: bool = True) -> Geometry:
    """What open_image does, for an image opened elsewhere (a user's, which
    only the user may open): O_DIRECT set on it in direct mode, locked,
    checked.  ``path`` is for messages."""
    if mode == "direct":
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise ImageError(f"{path}: this filesystem does not support O_DIRECT; "
                                 "use --mode buffered") from None
            raise ImageError(f"{path}: cannot set O_DIRECT: {e.strerror}") from None
    if lock:
        _lock(fd, path, readonly)
    return inspect_fd(fd, path, mode)


def _lock(fd: int, path: str, readonly: bool) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ImageError(f"{path}: already in use by another nbdloop server "
                         "(the image is locked)") from None


def inspect_fd(fd: int, path: str, mode: str) -> Geometry:
    """Size and alignment of an open backing; ImageError if unservable."""
    st = os.fstat(fd)
    size = _size_of(fd, st)
    if size == 0:
        raise ImageError(f"{path}: the image is empty")
    if size % SECTOR:
        raise ImageError(f"{path}: size {size} is not a multiple of {SECTOR} bytes")
    align, mem_align = discover_alignment(fd, st)
    if mode == "direct" and size % align:
        raise ImageError(f"{path}: size {size} is not a multiple of the direct-I/O "
                         f"alignment {align}; use --mode buffered")
    return Geometry(size=size, align=align, mem_align=mem_align,
                    block_device=stat.S_ISBLK(st.st_mode))


class Backing:
    """One open backing file, shared by every connection of a server.

    Thread safety: the methods are called concurrently from nbdkit's worker
    threads.  Each thread does its I/O on its own ring.  The only shared
    mutable state, the range lock that serialises read-modify-write of edge
    blocks, lives in the C engine.
    """

    def __init__(self, fd: int, path: str, geometry: Geometry, *, mode: str,
                 readonly: bool, seg_size: int = DEFAULT_SEG_SIZE,
                 entries: int = DEFAULT_ENTRIES, pin: bool = False,
                 shared: bool = False) -> None:
        self.fd = fd
        self.path = path
        self.name = os.path.basename(path)
        self.size = geometry.size
        self.align = geometry.align
        self.mem_align = geometry.mem_align
        self.block_device = geometry.block_device
        self.mode = mode
        self.readonly = readonly
        self.direct = mode == "direct"
        # Planning granularity: buffered I/O needs no alignment at all.
        self.io_align = self.align if self.direct else 1
        try:
            if self.direct:
                check_segment_size(seg_size)
            plan.validate_geometry(self.io_align, seg_size)
        except ValueError as e:
            raise ImageError(f"{path}: {e}") from None
        self.seg_size = seg_size
        # Writes in direct mode take the range lock so that a read-modify-write
        # of an edge block never races another write to that block.
        self.write_lock = uring.LOCK_SHARED if self.direct else uring.LOCK_NONE
        # Other processes serve this image too (serve --processes) and their
        # range locks cannot see ours, so a read-modify-write could lose one
        # of their writes: such writes are refused, and clients are told the
        # minimum block size that avoids them.
        self.shared = shared
        self.no_rmw = shared and self.direct
        self.engine = uring.Engine(fd, direct=self.direct, mem_align=self.mem_align,
                                   seg_size=seg_size,
                                   entries=entries, pin=pin, name=self.name)
        self._zero_range_ok = True
        self._punch_ok = True

    @classmethod
    def open(cls, path: str, *, mode: str = "direct", readonly: bool = False,
             lock: bool = True, **kw) -> Backing:
        fd, geometry = open_image(path, mode=mode, readonly=readonly, lock=lock)
        try:
            return cls(fd, path, geometry, mode=mode, readonly=readonly, **kw)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close the engine and the file (dropping the lock).  Safe twice."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            # Unlock before closing: io_uring's workers may still hold a
            # reference to the file for a moment after an fsync or fallocate,
            # and the lock would go only with the last reference.  Not when
            # shared: the lock is the supervisor's, for all the processes.
            if not self.shared:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- advertised geometry ------------------------------------------------

    def block_size(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) for NBD block size negotiation.
        The minimum is 1: any byte range is served exactly, an unaligned
        one by read-modify-write, so a client (libnbd enforces the
        minimum) must not refuse it.  The preferred size avoids that.
        Shared with other processes, there is no read-modify-write, and
        the minimum is the alignment."""
        return self.io_align if self.no_rmw else 1, max(4096, self.align), MAX_REQUEST

    # ---- data ---------------------------------------------------------------

    def _what(self, verb: str, offset: int, count: int) -> str:
        return f"{verb} at {offset}+{count} on {self.name}"

    def _run(self, verb: str, op: int, buf, segs: list[Segment], fua: bool,
             lock: tuple[int, int, int], offset: int, count: int) -> None:
        """Run segments until all are done, resubmitting short transfers."""
        while segs:
            results = self.engine.rw(op, buf, segs, fua, lock)
            outcome = plan.merge(segs, results, self.io_align)
            if outcome.error is not None:
                what = self._what(verb, offset, count)
                if outcome.reason:
                    what += f" ({outcome.reason})"
                uring.check(outcome.error, what)
            segs = list(outcome.resubmit)

    def pread(self, buf, offset: int) -> None:
        count = len(buf)
        if count <= self.seg_size and not (offset | count) & (self.io_align - 1):
            # Fast path: one aligned segment.  A short read falls through to
            # the general path, which resubmits the remainder.
            if self.engine.rw1(uring.OP_READ, buf, offset, False, uring.LOCK_NONE) == count:
                return
        segs = plan.plan_read(offset, count, self.io_align, self.seg_size)
        self._run("pread", uring.OP_READ, buf, segs, False, (0, 0, uring.LOCK_NONE),
                  offset, count)

    def pwrite(self, buf, offset: int, fua: bool = False) -> None:
        count = len(buf)
        if count <= self.seg_size and not (offset | count) & (self.io_align - 1):
            if self.engine.rw1(uring.OP_WRITE, buf, offset, fua, self.write_lock) == count:
                return
        self._write(uring.OP_WRITE, buf, offset, count, fua)

    def _write(self, op: int, buf, offset: int, count: int, fua: bool) -> None:
        segs = plan.plan_write(offset, count, self.io_align, self.seg_size)
        self._run_write(op, buf, segs, offset, count, fua)

    def _run_write(self, op: int, buf, segs: list[Segment], offset: int, count: int,
                   fua: bool) -> None:
        if not segs:
            return
        start = segs[0].file_off
        length = segs[-1].end - start
        rmw = any(s.preread for s in segs)
        verb = "pwrite" if op == uring.OP_WRITE else "write zeroes"
        if rmw and self.no_rmw:
            self._refuse_unaligned(verb, offset, count)
        mode = uring.LOCK_EXCLUSIVE if (rmw and self.direct) else self.write_lock
        self._run(verb, op, buf, segs, fua, (start, length, mode), offset, count)

    def _refuse_unaligned(self, verb: str, offset: int, count: int) -> None:
        uring.check(-errno.EINVAL, self._what(verb, offset, count) +
                    f" (not aligned to {self.io_align} bytes, and other processes "
                    "serve the image: no read-modify-write)")

    def flush(self) -> None:
        self.engine.fsync(True)

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        """Punch a hole.  In direct mode only whole blocks are punched: trim is
        advisory in NBD, so partial edge blocks are left as they are."""
        start, length = (plan.aligned_interior(offset, count, self.io_align)
                         if self.direct else (offset, count))
        if length and self._punch_ok:
            # Advisory: where holes cannot be punched there is nothing more to do.
            self._punch_ok = self._fallocate(FALLOC_FL_PUNCH_HOLE, start, length,
                                             self._what("trim", offset, count))
        if fua:
            self.flush()

    def zero(self, count: int, offset: int, may_trim: bool = False, fast: bool = False,
             fua: bool = False) -> None:
        """Write zeroes.  The aligned middle is deallocated (PUNCH_HOLE when the
        client allows trimming, else ZERO_RANGE); partial edge blocks in direct
        mode are zeroed by read-modify-write.  A fast zero fails with ENOTSUP
        rather than fall back to writing zeroes."""
        if self.direct:
            edges, (mid_off, mid_len) = plan.plan_zero(offset, count, self.io_align,
                                                      self.seg_size)
        else:
            edges, (mid_off, mid_len) = [], (offset, count)
        if edges and self.no_rmw:
            self._refuse_unaligned("zero", offset, count)   # before any of it is done
        if edges and fast:
            # Edge blocks need reads and writes: not fast.
            uring.check(-errno.ENOTSUP, self._what("fast zero", offset, count))
        if mid_len:
            self._zero_middle(mid_off, mid_len, may_trim, fast, offset, count)
        for seg in edges:
            self._run_write(uring.OP_WRITE_ZEROES, None, [seg], offset, count, False)
        if fua:
            self.flush()

    def _zero_middle(self, off: int, length: int, may_trim: bool, fast: bool,
                     req_off: int, req_count: int) -> None:
        what = self._what("zero", req_off, req_count)
        if may_trim and self._punch_ok:
            self._punch_ok = self._fallocate(FALLOC_FL_PUNCH_HOLE, off, length, what)
            if self._punch_ok:
                return
        if self._zero_range_ok:
            self._zero_range_ok = self._fallocate(FALLOC_FL_ZERO_RANGE, off, length, what)
            if self._zero_range_ok:
                return
        if fast:
            uring.check(-errno.ENOTSUP, f"fast {what}")
        # Slow but complete: write zeroes over the whole range.
        segs = plan.plan_write(off, length, self.io_align, self.seg_size)
        self._run_write(uring.OP_WRITE_ZEROES, None, segs, req_off, req_count, False)

    def _fallocate(self, mode: int, off: int, length: int, what: str) -> bool:
        """fallocate(mode | KEEP_SIZE) under the write lock; False if the
        filesystem does not support ``mode`` (so the caller stops asking)."""
        try:
            self.engine.fallocate(mode | FALLOC_FL_KEEP_SIZE, off, length, self.write_lock,
                                  what)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            return False
        return True

    def prefetch(self, count: int, offset: int) -> None:
        """NBD_CMD_CACHE: read ahead into the page cache (buffered mode; a
        no-op when direct, whose reads never use the page cache)."""
        if self.direct:
            return
        pos, end = offset, offset + count
        while pos < end:   # fadvise's length is 32 bits in the SQE
            n = min(end - pos, 1 << 30)
            self.engine.fadvise(pos, n, os.POSIX_FADV_WILLNEED,
                                self._what("cache", offset, count))
            pos += n

    def extents(self, count: int, offset: int, req_one: bool = False
                ) -> list[tuple[int, int, int]]:
        """Allocation map of [offset, offset+count) as (offset, length, type),
        type 3 (hole|zero) for holes and 0 for data, from SEEK_DATA/SEEK_HOLE."""
        hole_zero = 3
        end = offset + count
        if self.block_device:
            return [(offset, count, 0)]
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # only a hole from here to EOF
                    data = self.size
                elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    return [(offset, count, 0)]  # no hole information
                else:
                    uring.check(-e.errno, self._what("extents", offset, count))
            if data > pos:
                stop = min(data, end)
                out.append((pos, stop - pos, hole_zero))
                pos = stop
            else:
                try:
                    hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                except OSError as e:
                    uring.check(-e.errno, self._what("extents", offset, count))
                stop = min(hole, end)
                out.append((pos, stop - pos, 0))
                pos = stop
            if req_one:
                break
        return out
