"""Request planning: the logic of the I/O path, with no I/O in it.

An NBD request becomes a bio_vec-like scatter list of segments, each at most
``seg_size`` bytes and aligned to the backing's direct-I/O alignment.  The C
engine (``cffi_build/ring.c``) executes such a list and reports one result per
segment; :func:`merge` turns those results into one outcome for the request:
done, an error, or the segments still to do.

Nothing here imports cffi or nbdkit, so it can be tested exhaustively.

Coordinates: a segment covers ``[file_off, file_off + length)`` of the backing
file.  Its bytes ``[skip, skip + copy_len)`` belong to the request and sit at
``user_off`` in the request's buffer (the "window").  In buffered mode the
alignment is 1, every segment is all window, and the I/O uses the request's
buffer directly.  In direct mode a segment that is all window goes straight
to the request's buffer when the buffer's address allows (the engine decides
that), any other through an aligned bounce slot; and a write whose window
does not fill its segment must first read the segment (``preread``): a
read-modify-write of an edge block.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, replace

#: A segment's result when it was never submitted (matches NBDL_NOT_RUN).
NOT_RUN = -1_000_000_000


@dataclass(frozen=True, slots=True)
class Segment:
    file_off: int
    length: int
    skip: int
    user_off: int
    copy_len: int
    preread: bool = False

    @property
    def end(self) -> int:
        return self.file_off + self.length


def validate_geometry(align: int, seg_size: int) -> None:
    """Raise ValueError unless ``align`` and ``seg_size`` can be planned with."""
    if align < 1 or align & (align - 1):
        raise ValueError(f"alignment {align} is not a power of two")
    if seg_size < align or seg_size % align:
        raise ValueError(f"segment size {seg_size} is not a multiple of the alignment {align}")


def align_down(x: int, align: int) -> int:
    return x - x % align


def align_up(x: int, align: int) -> int:
    return align_down(x + align - 1, align)


def covering(offset: int, length: int, align: int) -> tuple[int, int]:
    """The aligned range ``(start, length)`` that covers a request."""
    start = align_down(offset, align)
    return start, align_up(offset + length, align) - start


def _chunk(start: int, stop: int, offset: int, length: int, seg_size: int,
           preread: bool = False) -> list[Segment]:
    """Cut the aligned range [start, stop) into segments of at most
    ``seg_size``, each with its window onto the request [offset, offset+length)."""
    req_end = offset + length
    segs = []
    pos = start
    while pos < stop:
        seg_end = min(pos + seg_size, stop)
        lo = max(pos, offset)
        hi = min(seg_end, req_end)
        segs.append(Segment(
            file_off=pos,
            length=seg_end - pos,
            skip=lo - pos,
            user_off=lo - offset,
            copy_len=max(hi - lo, 0),
            preread=preread,
        ))
        pos = seg_end
    return segs


def plan_read(offset: int, length: int, align: int, seg_size: int) -> list[Segment]:
    """Segments that read ``length`` bytes at ``offset``.

    An unaligned read covers whole aligned blocks and copies out only the
    request's window.
    """
    validate_geometry(align, seg_size)
    if length <= 0:
        return []
    start, span = covering(offset, length, align)
    return _chunk(start, start + span, offset, length, seg_size)


def plan_write(offset: int, length: int, align: int, seg_size: int) -> list[Segment]:
    """Segments that write ``length`` bytes at ``offset``.

    Partial edge blocks become segments of one block each, marked ``preread``
    so the engine reads them before overlaying the request's bytes.  The
    aligned middle is cut into full-window segments.
    """
    validate_geometry(align, seg_size)
    if length <= 0:
        return []
    end = offset + length
    start, span = covering(offset, length, align)
    stop = start + span
    head_partial = offset % align != 0
    tail_partial = end % align != 0
    if stop - start == align and (head_partial or tail_partial):
        # The request lies inside a single block.
        return _chunk(start, stop, offset, length, seg_size, preread=True)
    segs: list[Segment] = []
    mid_start, mid_stop = start, stop
    if head_partial:
        segs += _chunk(start, start + align, offset, length, seg_size, preread=True)
        mid_start = start + align
    tail: list[Segment] = []
    if tail_partial:
        tail = _chunk(stop - align, stop, offset, length, seg_size, preread=True)
        mid_stop = stop - align
    segs += _chunk(mid_start, mid_stop, offset, length, seg_size)
    return segs + tail


def plan_zero(offset: int, length: int, align: int, seg_size: int
              ) -> tuple[list[Segment], tuple[int, int]]:
    """Split a zero request into edge segments to zero by read-modify-write,
    and the aligned middle ``(offset, length)`` for fallocate (length may be 0)."""
    validate_geometry(align, seg_size)
    if length <= 0:
        return [], (offset, 0)
    end = offset + length
    mid_start = align_up(offset, align)
    mid_stop = align_down(end, align)
    if mid_start >= mid_stop:
        # No whole block inside: it is all edge.
        return plan_write(offset, length, align, seg_size), (offset, 0)
    edges = []
    if mid_start > offset:
        edges += plan_write(offset, mid_start - offset, align, seg_size)
    if end > mid_stop:
        edges += plan_write(mid_stop, end - mid_stop, align, seg_size)
    return edges, (mid_start, mid_stop - mid_start)


def aligned_interior(offset: int, length: int, align: int) -> tuple[int, int]:
    """The whole blocks inside a request, as ``(offset, length)``; length may be 0."""
    start = align_up(offset, align)
    stop = align_down(offset + length, align)
    return start, max(stop - start, 0)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a request's completions add up to.

    ``error`` is a negative errno (the first failure to complete) or None.
    ``resubmit`` lists what is still to do when there is no error: the
    remainders of short transfers and the segments that never ran.
    """
    error: int | None
    reason: str
    failed: Segment | None
    resubmit: tuple[Segment, ...]

    @property
    def done(self) -> bool:
        return self.error is None and not self.resubmit


def remainder(seg: Segment, progress: int) -> Segment:
    """The part of ``seg`` after its first ``progress`` bytes."""
    new_skip = max(seg.skip - progress, 0)
    new_end = max(seg.skip + seg.copy_len - progress, 0)
    return replace(
        seg,
        file_off=seg.file_off + progress,
        length=seg.length - progress,
        skip=new_skip,
        user_off=seg.user_off + (new_skip + progress - seg.skip),
        copy_len=max(new_end - new_skip, 0),
    )


def merge(segs: list[Segment] | tuple[Segment, ...],
          results: list[tuple[int, int]], align: int) -> Outcome:
    """Merge per-segment ``(res, order)`` completions into one outcome.

    - The first error to complete wins (lowest ``order``).
    - A short transfer is resubmitted for its remainder, restarting at an
      aligned position; a transfer that makes no aligned progress, end of
      file included, is an error, never silent zeros.
    - A segment that never ran is resubmitted as it was.
    """
    if len(segs) != len(results):
        raise ValueError("one result per segment")
    first: tuple[int, int, str, Segment] | None = None  # (order, -errno, reason, seg)
    again: list[Segment] = []
    for seg, (res, order) in zip(segs, results):
        if res == NOT_RUN:
            again.append(seg)
            continue
        if res < 0:
            failure = (order, res, "", seg)
        elif res > seg.length:
            failure = (order, -errno.EIO, f"transferred {res} of {seg.length} bytes", seg)
        elif res == seg.length:
            continue
        else:
            progress = align_down(res, align)
            if progress == 0:
                why = "end of file" if res == 0 else f"short transfer of {res} bytes"
                failure = (order, -errno.EIO, why, seg)
            else:
                again.append(remainder(seg, progress))
                continue
        if first is None or failure[0] < first[0]:
            first = failure
    if first is not None:
        return Outcome(error=first[1], reason=first[2], failed=first[3], resubmit=())
    again.sort(key=lambda s: s.file_off)
    return Outcome(error=None, reason="", failed=None, resubmit=tuple(again))
