"""Where a file's bytes are not yet plain written blocks: holes (SEEK_HOLE)
and unwritten extents (FIEMAP's FIEMAP_EXTENT_UNWRITTEN, what fallocate
leaves).  In direct mode a write into either reaches the disk at once, but
the filesystem's record that the block now holds data (an allocation, or
the extent's conversion to written) is metadata, journaled later: until a
flush, a crash can lose the write.  FIEMAP is asked without
FIEMAP_FLAG_SYNC, which would write the file's dirty pages back.

The CLI, the server and the benchmark use it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import struct
from collections.abc import Callable

from nbdloop.sizes import format_size

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_HEAD = struct.Struct("=QQLLLL")            # struct fiemap, before its extents
_EXTENT = struct.Struct("=QQQQQLLLL")       # struct fiemap_extent
_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)


def fiemap(fd: int, length: int) -> list[Extent]:
    """The extents of the first ``length`` bytes of ``fd``; OSError (say
    EOPNOTSUPP) where the filesystem has no FIEMAP."""
    found: list[Extent] = []
    start = 0
    while start < length:
        request = bytearray(_HEAD.pack(start, length - start, 0, 0, _BATCH, 0)
                            + bytes(_EXTENT.size * _BATCH))
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        mapped = _HEAD.unpack_from(request)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            logical, physical, size, _, _, flags, *_ = _EXTENT.unpack_from(
                request, _HEAD.size + i * _EXTENT.size)
            found.append(Extent(logical, physical, size, flags))
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            break
        start = found[-1].logical + found[-1].length
    return found


def unsettled(fd: int, start: int, end: int) -> int:
    """How many bytes of ``[start, end)`` of a file are in holes or
    unwritten extents (ext4 counts an unwritten extent as a hole for
    SEEK_HOLE, others may not: the two are merged).  A filesystem without
    SEEK_HOLE says the file is all data; one without FIEMAP has no
    unwritten extents here."""
    ranges: list[tuple[int, int]] = []
    offset = start
    while offset < end:
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError:
            break
        if hole >= end:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:        # ENXIO: a hole to the end
            data = end
        ranges.append((hole, min(data, end)))
        offset = data
    try:
        ranges += [(max(e.logical, start), min(e.logical + e.length, end))
                   for e in fiemap(fd, end) if e.unwritten]
    except OSError:
        pass
    total = 0
    covered = start
    for lo, hi in sorted(ranges):
        lo = max(lo, covered)
        if hi > lo:
            total += hi - lo
            covered = hi
    return total


def warn_if_unsettled(image: str, mode: str, start: int, end: int,
                      say: Callable[[str], None]) -> None:
    """In direct mode, one line through ``say`` when ``[start, end)`` of the
    image has holes or unwritten extents: an acknowledged write there is on
    the disk, but the filesystem's record of it is not until a flush."""
    if mode != "direct":
        return
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return          # whoever opens it next says why
    try:
        # An image written a moment ago is still being written back, and
        # ext4 shows blocks under writeback as unwritten extents until it
        # completes: settle them first, or a written image looks holey.
        with contextlib.suppress(OSError):
            os.fdatasync(fd)
        n = unsettled(fd, start, end)
    finally:
        os.close(fd)
    if n:
        say(f"nbdloop: warning: {image}: {format_size(n)} of it is holes or unwritten "
            "extents, where a write in direct mode is durable only after a flush "
            "(nbdloop create --preallocate writes an image fully)")


def write_zeros(fd: int, start: int, end: int, chunk: int = 8 << 20) -> None:
    """Write zeros over bytes [start, end) of ``fd`` and make them durable
    (create --preallocate, resize --preallocate): written, not fallocated,
    so that the filesystem records them as data."""
    zeros = memoryview(bytes(chunk))
    offset = start
    while offset < end:
        offset += os.pwrite(fd, zeros[:min(chunk, end - offset)], offset)
    os.fdatasync(fd)
