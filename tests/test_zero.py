"""Write-zeroes and trim: ordinary zeroes always succeed in full, fast zeroes
fail fast (ENOTSUP) where zeroing would mean writing, and trims punch holes.

tmpfs supports PUNCH_HOLE but not ZERO_RANGE, so it shows every branch."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from conftest import connect, require

MiB = 1 << 20


@pytest.fixture
def shm_image():
    base = Path("/dev/shm")
    require(base.is_dir(), "a tmpfs at /dev/shm")
    d = Path(tempfile.mkdtemp(dir=base, prefix="nbdloop-test-"))
    img = d / "disk.img"
    # 100 MiB of non-zero data: more than nbdkit 1.32's broken 64 MiB fallback.
    with open(img, "wb") as f:
        for i in range(100):
            f.write(bytes([i % 250 + 1]) * MiB)
    yield img
    img.unlink()
    d.rmdir()


def test_ordinary_zero_without_zero_range_is_complete(shm_image, serve, mode):
    import nbd
    s = serve(shm_image, mode)
    h = connect(s.uri)
    assert h.can_zero() and h.can_fast_zero()
    # Whole range, holes forbidden (NO_HOLE): ZERO_RANGE is unsupported on
    # tmpfs, so the server must write the zeroes itself, all 100 MiB.
    h.zero(100 * MiB, 0, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    with pytest.raises(nbd.Error) as e:
        h.zero(MiB, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert e.value.errno in ("ENOTSUP", "EOPNOTSUPP")
    h.shutdown()
    data = shm_image.read_bytes()
    assert data.count(0) == len(data)


def test_fast_zero_with_may_trim_punches(shm_image, serve, mode):
    import nbd
    s = serve(shm_image, mode)
    h = connect(s.uri)
    # Without NO_HOLE the server may trim: a punched hole is fast.
    h.zero(4 * MiB, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4 * MiB, 8 * MiB) == bytes(4 * MiB)
    assert h.pread(MiB, 7 * MiB) == bytes([8]) * MiB       # neighbours intact
    assert h.pread(MiB, 12 * MiB) == bytes([13]) * MiB
    h.shutdown()
    st = os.stat(shm_image)
    assert st.st_blocks * 512 <= 96 * MiB + 64 * 1024, "the range was deallocated"


def test_trim_punches_a_hole(shm_image, serve, mode):
    s = serve(shm_image, mode)
    h = connect(s.uri)
    before = os.stat(shm_image).st_blocks
    h.trim(10 * MiB, 20 * MiB)
    h.flush()
    after = os.stat(shm_image).st_blocks
    assert (before - after) * 512 >= 10 * MiB - 8192
    assert h.pread(MiB, 19 * MiB) == bytes([20]) * MiB
    assert h.pread(MiB, 30 * MiB) == bytes([31]) * MiB
    h.shutdown()


def test_unaligned_fast_zero_fails_fast_in_direct_mode(tmp_path, serve):
    """Zeroing part of a block in direct mode means a read-modify-write: a
    fast zero refuses, an ordinary zero does it."""
    import nbd
    img = tmp_path / "disk.img"
    img.write_bytes(b"\xff" * (8 * MiB))
    s = serve(img, "direct")
    h = connect(s.uri)
    align = h.get_block_size(nbd.SIZE_MINIMUM)
    off, n = align // 2 if align > 1 else 100, 3 * 4096
    with pytest.raises(nbd.Error) as e:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
    assert e.value.errno in ("ENOTSUP", "EOPNOTSUPP")
    assert h.pread(n, off) == b"\xff" * n, "a failed fast zero changes nothing"
    h.zero(n, off)
    assert h.pread(n + 2, off - 1) == b"\xff" + bytes(n) + b"\xff"
    h.shutdown()
