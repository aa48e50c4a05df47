"""Slices of an image (``--offset``, ``--sizelimit``), through libnbd and
nbdkit's offset filter, in both modes: the export is that byte range, and
nothing outside it is ever read, written, zeroed, trimmed or reported by
block status.  The bytes on both sides of the slice hold a pattern that
must survive everything done to the export."""
from __future__ import annotations

import random

import pytest

from conftest import connect, create_image, run, run_cli

MiB = 1 << 20
IMAGE = 8 * MiB


def extents(h, length: int) -> list[tuple[int, int, bool]]:
    """(offset, length, is_hole) of the export's base:allocation extents."""
    import nbd
    found: list[tuple[int, int, bool]] = []
    offset = 0
    while offset < length:
        def got(meta, off, entries, err):
            nonlocal offset
            pos = off
            for n, flags in zip(entries[::2], entries[1::2]):
                found.append((pos, n, bool(flags & nbd.STATE_HOLE)))
                pos += n
            offset = pos
            return 0
        h.block_status(min(length - offset, 32 * MiB), offset, got)
    merged: list[tuple[int, int, bool]] = []
    for off, n, hole in found:
        if merged and merged[-1][2] == hole and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n, hole)
        else:
            merged.append((off, n, hole))
    return merged


def punch(path, offset: int, length: int) -> None:
    run(["fallocate", "--punch-hole", "--offset", str(offset), "--length", str(length),
         str(path)])


@pytest.mark.parametrize("mode,offset,length", [
    ("direct", 1 * MiB, 3 * MiB),
    ("buffered", 1 * MiB + 100, 3 * MiB + 512),     # buffered: any byte offset
])
def test_nothing_outside_the_slice_is_touched(tmp_path, serve, mode, offset, length):
    img = tmp_path / "disk.img"
    rng = random.Random(3)
    outside = bytearray(rng.randbytes(IMAGE))
    img.write_bytes(outside)
    end = offset + length
    # A hole inside the slice and one just outside each edge; data elsewhere.
    hole = 64 * 1024
    inside = (offset + MiB + 4095) // 4096 * 4096
    for at in (inside, offset // 4096 * 4096 - hole, (end + 4095) // 4096 * 4096):
        punch(img, at, hole)
        outside[at:at + hole] = bytes(hole)
    assert img.read_bytes() == outside
    s = serve(img, mode, extra=["--offset", str(offset), "--sizelimit", str(length)])
    # Not strict: the out-of-range requests below must reach the server.
    h = connect(s.uri, "base:allocation")
    assert h.get_size() == length
    assert h.pread(length, 0) == outside[offset:end]

    # Block status: the inside hole where it is in the slice, nothing of the
    # holes outside it.
    ext = extents(h, length)
    assert sum(n for _, n, _ in ext) == length
    holes = [(o, n) for o, n, is_hole in ext if is_hole]
    assert holes and all(o <= inside - offset and inside - offset + hole <= o + n
                         for o, n in holes), ext

    # Writes, zeroes and trims that reach both edges of the slice, and
    # requests past its end, which must fail.
    for off, n in ((0, 4096), (length - 4096, 4096), (0, length), (100, 1000),
                   (length - 1000, 1000)):
        h.pwrite(rng.randbytes(n), off)
    h.zero(8192, 0)
    h.zero(8192, length - 8192)
    assert h.pread(8192, 0) == bytes(8192) and h.pread(8192, length - 8192) == bytes(8192)
    h.trim(length, 0)          # advisory in direct mode: only whole blocks go
    import nbd
    for off, n in ((length - 512, 1024), (length, 512)):
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * n, off)
        with pytest.raises(nbd.Error):
            h.zero(n, off)
    served = h.pread(length, 0)
    h.flush()
    h.shutdown()
    s.stop()
    data = img.read_bytes()
    assert len(data) == IMAGE
    assert data[:offset] == outside[:offset], "bytes before the slice changed"
    assert data[end:] == outside[end:], "bytes after the slice changed"
    assert data[offset:end] == served


@pytest.mark.parametrize("args,phrase", [
    (["--offset", "1000"], "--offset 1000 is not a multiple of the image's direct-I/O"),
    (["--offset", "1M", "--sizelimit", "1000"], "the slice's end"),
    (["--offset", "9M"], "--offset 9437184 is not inside the image (8M"),
    (["--mode", "buffered", "--sizelimit", "1000"], "length 1000 is not a multiple of 512"),
    (["--offset", "-1"], "--offset"),
    (["--sizelimit", "lots"], "--sizelimit"),
])
def test_bad_slices_are_refused_in_one_line(tmp_path, args, phrase):
    img = create_image(tmp_path / "disk.img", "8M")
    for command in (["serve", str(img), "--socket", str(tmp_path / "s.sock")],
                    ["attach", str(img)]):
        p = run_cli(*command, *args)
        assert p.returncode == 2, (command, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0], (command, p.stderr)
        assert "Traceback" not in p.stderr
    assert img.read_bytes() == bytes(8 * MiB)
