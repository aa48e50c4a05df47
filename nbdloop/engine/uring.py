"""nbdloop's binding to liburing: the only module that imports the compiled
extension.  No cffi object leaves it (see ``__all__``); callers pass ints,
buffers and :class:`nbdloop.engine.plan.Segment` lists, and get ints and
tuples back.  Every failure leaves it through :func:`check`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from nbdloop.engine._uring import ffi, lib
from nbdloop.engine.plan import NOT_RUN, Segment

__all__ = ["OP_READ", "OP_WRITE", "OP_WRITE_ZEROES", "LOCK_NONE", "LOCK_SHARED",
           "LOCK_EXCLUSIVE", "PLACE_MAX_LEN", "check", "dio_alignment", "stats",
           "set_io_flusher", "outlive_parent", "lock_memory", "Engine"]

OP_READ = lib.NBDL_OP_READ
OP_WRITE = lib.NBDL_OP_WRITE
OP_WRITE_ZEROES = lib.NBDL_OP_WRITE_ZEROES

LOCK_NONE = lib.NBDL_LOCK_NONE
LOCK_SHARED = lib.NBDL_LOCK_SHARED
LOCK_EXCLUSIVE = lib.NBDL_LOCK_EXCLUSIVE

#: Requests longer than this never move their worker between CPUs.
PLACE_MAX_LEN = lib.NBDL_PLACE_MAX_LEN

_VERBS = {OP_READ: "pread", OP_WRITE: "pwrite", OP_WRITE_ZEROES: "write zeroes"}
# from_buffer(type, buf, require_writable) positionally: with a keyword
# argument the call is measurably slower, and it runs once per request.
_CHARS = ffi.typeof("char[]")

if lib.NBDL_NOT_RUN != NOT_RUN:  # the two halves must agree
    raise ImportError("nbdloop.engine._uring was built from a different nbdl.h")

_STAT_FIELDS = [name for name, _ in ffi.typeof("struct nbdl_stats").fields]


def check(ret: int, what: str) -> int:
    """Turn a negative errno return into OSError; the only place that does."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def dio_alignment(fd: int) -> tuple[int, int]:
    """statx(STATX_DIOALIGN) of ``fd``: ``(memory, offset)`` alignment, or
    ``(0, 0)`` if the kernel or filesystem does not report it."""
    mem = ffi.new("uint32_t *")
    off = ffi.new("uint32_t *")
    check(lib.nbdl_dio_align(fd, mem, off), "statx")
    return mem[0], off[0]


def stats() -> dict[str, int]:
    """The engine's counters, summed over all threads."""
    out = ffi.new("struct nbdl_stats *")
    lib.nbdl_stats(out)
    return {name: getattr(out, name) for name in _STAT_FIELDS}


def release_idle(idle_seconds: float) -> int:
    """Free the rings (and bounce slots) that no thread has used for
    ``idle_seconds``, whichever thread owns them; how many were freed."""
    return lib.nbdl_release_idle(int(idle_seconds * 1000))


def set_io_flusher() -> None:
    """Mark the calling thread, and threads it creates later, as an I/O
    flusher (PR_SET_IO_FLUSHER), so reclaim never waits on our own device."""
    check(lib.nbdl_set_io_flusher(), "prctl(PR_SET_IO_FLUSHER)")


def outlive_parent() -> None:
    """No death signal when the parent dies: the daemon's servers outlive
    the daemon, which stops them itself."""
    check(lib.nbdl_outlive_parent(), "prctl(PR_SET_PDEATHSIG)")


def lock_memory() -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): a page the server
    has touched never leaves memory, so it never waits on a page-in."""
    check(lib.nbdl_mlockall(), "mlockall")


class Engine:
    """The rings that serve one open backing file.

    Each thread that calls in gets its own ring (and, in direct mode, its own
    registered bounce slots, for segments whose place in the caller's buffer
    does not meet ``mem_align``), created on first use and freed when the
    thread exits.  ``pin`` keeps the calling thread's Python thread state alive
    between nbdkit callbacks.
    """

    def __init__(self, fd: int, *, direct: bool, seg_size: int, entries: int,
                 mem_align: int = 0, pin: bool = False, name: str = "") -> None:
        # mem_align 0: every direct-mode segment goes through a bounce slot.
        img = lib.nbdl_image_new(fd, int(direct), mem_align, seg_size, entries, int(pin))
        if img == ffi.NULL:
            check(-ffi.errno, "setting up the I/O engine")
        # Freed by close(), or by the garbage collector if nobody closes it.
        self._img = ffi.gc(img, lib.nbdl_image_free)
        self.name = name
        self.direct = direct
        self.seg_size = seg_size
        self.entries = entries

    def set_placement(self, busy: set[int], idle: set[int], busy_at: int = 4) -> None:
        """Run workers on ``busy`` CPUs while ``busy_at`` or more requests are
        in progress, and on ``idle`` CPUs when a request is alone.  Once,
        before any worker calls in."""
        b, i = sorted(busy), sorted(idle)
        check(lib.nbdl_image_set_placement(self._img, ffi.new("int[]", b), len(b),
                                           ffi.new("int[]", i), len(i), busy_at),
              "setting the CPU placement")

    def set_sched_batch(self, on: bool) -> None:
        """Threads that call in for the first time switch to SCHED_BATCH."""
        lib.nbdl_image_set_sched_batch(self._img, int(on))

    def close(self) -> None:
        """Free the engine.  Safe to call twice.

        A ring keeps the file registered, and so open (and flock-locked), until
        the ring is freed.  The calling thread's ring is freed here; other
        threads drop theirs on their next call or when they exit."""
        img, self._img = self._img, None
        if img is not None:
            lib.nbdl_thread_release()
            ffi.release(img)   # runs nbdl_image_free now, and never again

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _what(self, op: int, offset: int, count: int) -> str:
        return f"{_VERBS[op]} at {offset}+{count} on {self.name}"

    def rw1(self, op: int, buf, offset: int, fua: bool, lock: int) -> int:
        """One full-window segment of ``len(buf)`` bytes at ``offset``.
        Returns the bytes transferred, which may be short; raises OSError."""
        # A read must not write into an immutable object (bytes).
        user = ffi.from_buffer(_CHARS, buf, op == OP_READ)
        res = lib.nbdl_rw1(self._img, op, fua, user, offset, len(buf), lock)
        if res < 0:
            check(res, self._what(op, offset, len(buf)))
        return res

    def rw(self, op: int, buf, segs: Sequence[Segment], fua: bool,
           lock: tuple[int, int, int]) -> list[tuple[int, int]]:
        """Run ``segs``; returns one ``(res, order)`` per segment, each the
        bytes transferred or -errno, for :func:`nbdloop.engine.plan.merge`.
        ``buf`` may be None for OP_WRITE_ZEROES.  ``lock`` is ``(offset,
        length, mode)``.  Raises OSError only if no ring could be set up."""
        n = len(segs)
        arr = ffi.new("struct nbdl_seg[]", n)
        for c, s in zip(arr, segs):
            c.file_off = s.file_off
            c.user_off = s.user_off
            c.len = s.length
            c.skip = s.skip
            c.copy_len = s.copy_len
            c.flags = lib.NBDL_SEG_PREREAD if s.preread else 0
        user = ffi.NULL if buf is None else ffi.from_buffer(_CHARS, buf, op == OP_READ)
        ret = lib.nbdl_rw(self._img, op, fua, user, arr, n, lock[0], lock[1], lock[2])
        check(ret, "io_uring setup")
        return [(c.res, c.order) for c in arr]

    def fsync(self, datasync: bool = True) -> None:
        check(lib.nbdl_fsync(self._img, int(datasync)),
              f"{'fdatasync' if datasync else 'fsync'} on {self.name}")

    def fallocate(self, mode: int, offset: int, length: int, lock: int, what: str) -> None:
        """fallocate under the range lock; ``what`` names the request in the error."""
        check(lib.nbdl_fallocate(self._img, mode, offset, length, lock), what)

    def fadvise(self, offset: int, length: int, advice: int, what: str) -> None:
        check(lib.nbdl_fadvise(self._img, offset, length, advice), what)
