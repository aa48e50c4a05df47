"""Property tests for the pure request logic (nbdloop/engine/plan.py).

The executor below is a model of what the C engine does with a segment list
(read into a bounce slot and copy the window out; or pre-read, overlay the
window and write), run against a bytearray "disk", with hypothesis choosing
where transfers come up short or fail.  The merge loop must always finish
with exactly the right bytes, or with the first error.

The model is only worth what it says about the engine, so the last tests run
it in lockstep with the real engine (nbdloop.engine.uring.Engine on a file
holding the same bytes) on the same plans, without injected faults: every
round must give the same result for every segment, the same completion
orders within each wave (as sets: the real order within a wave varies), and
the same bytes in the buffer and the file.
"""
import errno
import os
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import dio_alignment, require
from nbdloop.engine import plan, uring
from nbdloop.engine.plan import NOT_RUN, Segment

ALIGNS = st.sampled_from([1, 512, 4096])
SEG_MULT = st.integers(min_value=1, max_value=8)


@st.composite
def geometry(draw, aligns=ALIGNS):
    align = draw(aligns)
    seg_size = align * draw(SEG_MULT) if align > 1 else draw(st.integers(1, 9000))
    disk_blocks = draw(st.integers(1, 64))
    disk_size = disk_blocks * max(align, 512)
    offset = draw(st.integers(0, disk_size - 1))
    length = draw(st.integers(1, disk_size - offset))
    return align, seg_size, disk_size, offset, length


def check_cover(segs, offset, length, align, seg_size):
    """Windows tile the request exactly, in order; segments are aligned,
    bounded, disjoint and sorted."""
    pos = 0
    prev_end = None
    for s in segs:
        assert s.file_off % align == 0 and s.length % align == 0
        assert 0 < s.length <= seg_size
        assert 0 <= s.skip and s.skip + s.copy_len <= s.length
        if prev_end is not None:
            assert s.file_off >= prev_end
        prev_end = s.end
        if s.copy_len:
            assert s.user_off == pos, "windows are contiguous in the buffer"
            assert s.file_off + s.skip == offset + s.user_off, "window maps to the file"
            pos += s.copy_len
    assert pos == length


@given(geometry())
def test_plan_read_covers_request(g):
    align, seg_size, _, offset, length = g
    segs = plan.plan_read(offset, length, align, seg_size)
    check_cover(segs, offset, length, align, seg_size)
    assert not any(s.preread for s in segs)


@given(geometry())
def test_plan_write_covers_request_and_prereads_only_partial_blocks(g):
    align, seg_size, _, offset, length = g
    segs = plan.plan_write(offset, length, align, seg_size)
    check_cover(segs, offset, length, align, seg_size)
    for s in segs:
        partial = s.copy_len != s.length
        assert s.preread == partial
        if s.preread:
            assert s.length == align, "an edge is one block"


@given(geometry())
def test_plan_zero_splits_edges_and_aligned_middle(g):
    align, seg_size, _, offset, length = g
    edges, (mid_off, mid_len) = plan.plan_zero(offset, length, align, seg_size)
    if mid_len:
        assert mid_off % align == 0 and mid_len % align == 0
    covered = sum(s.copy_len for s in edges) + mid_len
    assert covered == length
    for s in edges:
        assert s.preread and s.length == align
        lo, hi = s.file_off + s.skip, s.file_off + s.skip + s.copy_len
        assert not (lo < mid_off + mid_len and mid_off < hi), "edges stay out of the middle"


def test_plan_examples():
    # 512 bytes inside one 4K block: a single read-modify-write segment.
    assert plan.plan_write(4608, 512, 4096, 131072) == [
        Segment(4096, 4096, skip=512, user_off=0, copy_len=512, preread=True)]
    # Aligned 256K with 128K segments: two full segments, no pre-reads.
    assert plan.plan_write(0, 262144, 4096, 131072) == [
        Segment(0, 131072, 0, 0, 131072), Segment(131072, 131072, 0, 131072, 131072)]
    # Unaligned 8K straddling three blocks: head edge, full middle, tail edge.
    segs = plan.plan_write(1024, 8192, 4096, 131072)
    assert [(s.file_off, s.length, s.preread) for s in segs] == [
        (0, 4096, True), (4096, 4096, False), (8192, 4096, True)]
    assert plan.plan_read(1024, 8192, 4096, 131072) == [
        Segment(0, 12288, skip=1024, user_off=0, copy_len=8192)]


def test_geometry_is_checked():
    with pytest.raises(ValueError):
        plan.plan_read(0, 512, 3, 4096)
    with pytest.raises(ValueError):
        plan.plan_read(0, 512, 4096, 6000)


# ---- a model of the engine, with injected short transfers and errors -----------

class NoFaults:
    """Every submission transfers all it can (all of it, short of end of file)."""

    def result(self, seg: Segment, max_ok: int) -> int:
        return max_ok


class Faults:
    """Decides each submission's result from a hypothesis-drawn script."""

    def __init__(self, data):
        self.data = data

    def result(self, seg: Segment, max_ok: int) -> int:
        kind = self.data.draw(st.sampled_from(["full", "full", "full", "short", "error"]))
        if kind == "error":
            return -self.data.draw(st.sampled_from([errno.EIO, errno.ENOSPC]))
        if kind == "short" and max_ok > 0:
            return self.data.draw(st.integers(0, max_ok))
        return max_ok


def execute(disk: bytearray, op: str, segs, user: bytearray, faults, entries: int):
    """What nbdl_rw does, on a bytearray.  ``op`` is "read", "write" or
    "zero" (NBDL_OP_WRITE_ZEROES: zeroes where the window's data would go;
    ``user`` is not used).  Returns (res, order) per segment."""
    results = [(NOT_RUN, 2**32 - 1)] * len(segs)
    order = 0
    for w0 in range(0, len(segs), entries):
        wave = list(range(w0, min(w0 + entries, len(segs))))
        bad = False
        slots = {}
        if op in ("write", "zero"):
            for i in wave:
                s = segs[i]
                slot = bytearray(s.length)
                if s.preread:
                    slot[:] = disk[s.file_off:s.end]
                slot[s.skip:s.skip + s.copy_len] = (
                    user[s.user_off:s.user_off + s.copy_len] if op == "write"
                    else bytes(s.copy_len))
                slots[i] = slot
        for i in wave:
            s = segs[i]
            in_file = max(min(len(disk) - s.file_off, s.length), 0)
            res = faults.result(s, in_file)
            if op == "read":
                if res > 0:
                    got = disk[s.file_off:s.file_off + res]
                    lo, hi = s.skip, min(s.skip + s.copy_len, res)
                    if hi > lo:
                        user[s.user_off:s.user_off + hi - lo] = got[lo:hi]
            elif res > 0:
                disk[s.file_off:s.file_off + res] = slots[i][:res]
            results[i] = (res, order)
            order += 1
            bad |= res != s.length
        if bad:
            break
    return results


def drive(disk, op, segs, user, faults, align, entries):
    """The Backing's merge loop."""
    for _ in range(10_000):
        if not segs:
            return None
        results = execute(disk, op, segs, user, faults, entries)
        out = plan.merge(segs, results, align)
        if out.error is not None:
            return out
        segs = list(out.resubmit)
    raise AssertionError("merge loop did not terminate")


@settings(max_examples=300)
@given(geometry(), st.data(), st.integers(1, 4))
def test_read_with_short_transfers_and_errors(g, data, entries):
    align, seg_size, disk_size, offset, length = g
    disk = bytearray(random.Random(offset).randbytes(disk_size))
    user = bytearray(length)
    segs = plan.plan_read(offset, length, align, seg_size)
    out = drive(disk, "read", segs, user, Faults(data), align, entries)
    if out is None:
        assert user == disk[offset:offset + length]
    else:
        assert out.error < 0 and out.failed is not None


@settings(max_examples=300)
@given(geometry(), st.data(), st.integers(1, 4))
def test_write_with_short_transfers_and_errors(g, data, entries):
    align, seg_size, disk_size, offset, length = g
    rng = random.Random(length)
    disk = bytearray(rng.randbytes(disk_size))
    before = bytes(disk)
    user = bytearray(rng.randbytes(length))
    segs = plan.plan_write(offset, length, align, seg_size)
    out = drive(disk, "write", segs, user, Faults(data), align, entries)
    outside = before[:offset], before[offset + length:]
    # Whatever happened, bytes outside the request are never changed.
    assert (bytes(disk[:offset]), bytes(disk[offset + length:])) == outside
    if out is None:
        assert disk[offset:offset + length] == user


@given(geometry(), st.data())
def test_end_of_file_is_an_error_not_zeros(g, data):
    align, seg_size, disk_size, offset, length = g
    cut = data.draw(st.integers(0, offset + length - 1))   # the file got truncated
    assume(plan.align_down(cut, max(align, 1)) < offset + length)
    disk = bytearray(b"\xaa" * cut)
    user = bytearray(length)
    out = drive(disk, "read", plan.plan_read(offset, length, align, seg_size), user,
                NoFaults(), align, 4)
    assert out is not None and out.error == -errno.EIO
    assert "end of file" in out.reason or "short" in out.reason


def test_merge_first_error_wins_by_completion_order():
    segs = [Segment(0, 4096, 0, 0, 4096), Segment(4096, 4096, 0, 4096, 4096),
            Segment(8192, 4096, 0, 8192, 4096)]
    out = plan.merge(segs, [(4096, 0), (-errno.ENOSPC, 2), (-errno.EIO, 1)], 4096)
    assert out.error == -errno.EIO and out.failed == segs[2]


def test_merge_short_and_not_run():
    segs = [Segment(0, 8192, 0, 0, 8192), Segment(8192, 8192, 0, 8192, 8192)]
    out = plan.merge(segs, [(5000, 0), (NOT_RUN, 2**32 - 1)], 4096)
    assert out.error is None
    assert out.resubmit == (Segment(4096, 4096, 0, 4096, 4096), segs[1])
    assert plan.merge(segs, [(8192, 1), (8192, 0)], 4096).done


def test_merge_short_without_aligned_progress_is_an_error():
    segs = [Segment(0, 4096, 0, 0, 4096)]
    out = plan.merge(segs, [(100, 0)], 4096)
    assert out.error == -errno.EIO and "short" in out.reason
    # Buffered mode (alignment 1) resubmits from byte 100.
    out = plan.merge(segs, [(100, 0)], 1)
    assert out.resubmit == (Segment(100, 3996, 0, 100, 3996),)


def test_remainder_keeps_window_mapping():
    s = Segment(0, 8192, skip=1000, user_off=0, copy_len=6000)
    r = plan.remainder(s, 4096)
    assert r == Segment(4096, 4096, skip=0, user_off=3096, copy_len=2904)


# ---- the model against the real engine --------------------------------------------

@pytest.fixture(params=["sector512", "sector4k"])
def engine_dir(request, tmp_path):
    """(directory, the alignments to plan with there): tmp_path, where direct
    I/O is 512-aligned, so 512 and 4096 both work, or the 4 KiB-sector
    ``fourk_fs``.  Alignment 1 is buffered mode."""
    if request.param == "sector512":
        directory, want, aligns = tmp_path, 512, [1, 512, 4096]
    else:
        directory, want, aligns = request.getfixturevalue("fourk_fs"), 4096, [1, 4096]
    got = dio_alignment(directory)
    require(got == want, f"{want}-byte direct-I/O alignment on {directory} (it is {got})")
    return directory, aligns


def real_round(engine, op: str, buf, segs, direct: bool):
    """One nbdl_rw of ``segs`` with the range lock the Backing would take."""
    if op == "read":
        return engine.rw(uring.OP_READ, buf, segs, False, (0, 0, uring.LOCK_NONE))
    start, length = segs[0].file_off, segs[-1].end - segs[0].file_off
    if not direct:
        mode = uring.LOCK_NONE
    elif any(s.preread for s in segs):
        mode = uring.LOCK_EXCLUSIVE
    else:
        mode = uring.LOCK_SHARED
    code = uring.OP_WRITE if op == "write" else uring.OP_WRITE_ZEROES
    return engine.rw(code, buf if op == "write" else None, segs, False,
                     (start, length, mode))


def lockstep(disk: bytearray, engine, op: str, segs, user_model, user_real,
             align: int, entries: int):
    """``drive`` with the model and the real engine side by side: each round
    must give the same results; returns the real merge's last outcome (None
    when done)."""
    for _ in range(10_000):
        if not segs:
            return None
        model = execute(disk, op, segs, user_model, NoFaults(), entries)
        real = real_round(engine, op, user_real, segs, align > 1)
        assert [r for r, _ in real] == [r for r, _ in model], (segs, real, model)
        for w0 in range(0, len(segs), entries):
            wave = slice(w0, w0 + entries)
            assert sorted(o for _, o in real[wave]) == sorted(o for _, o in model[wave]), \
                (segs, real, model)
        out_model = plan.merge(segs, model, align)
        out = plan.merge(segs, real, align)
        assert (out.error, out.resubmit) == (out_model.error, out_model.resubmit)
        if out.error is not None:
            return out
        segs = list(out.resubmit)
    raise AssertionError("merge loop did not terminate")


def open_engine(path, align: int, seg_size: int, entries: int):
    direct = align > 1
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    # Bounce slots must be 4 KiB multiples to stay aligned in memory; a
    # bigger slot than the planned segment size is fine.
    slot = plan.align_up(seg_size, 4096) if direct else seg_size
    return fd, uring.Engine(fd, direct=direct, seg_size=slot, entries=entries)


# The directory (and on sector4k the mounted filesystem) is shared by all
# examples; each example writes its own image from scratch.
ENGINE_SETTINGS = settings(max_examples=200, deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture])


@ENGINE_SETTINGS
@given(st.data(), st.integers(1, 4), st.sampled_from(["read", "write", "zero"]),
       st.integers(0, 2**32 - 1))
def test_model_matches_the_engine(engine_dir, data, entries, op, seed):
    directory, aligns = engine_dir
    align, seg_size, disk_size, offset, length = data.draw(geometry(st.sampled_from(aligns)))
    rng = random.Random(seed)
    disk = bytearray(rng.randbytes(disk_size))
    before = bytes(disk)
    path = directory / "model.img"
    path.write_bytes(disk)
    if op == "read":
        segs = plan.plan_read(offset, length, align, seg_size)
        user_model, user_real = bytearray(length), bytearray(length)
    else:
        segs = plan.plan_write(offset, length, align, seg_size)
        user_model = bytearray(rng.randbytes(length))
        user_real = bytes(user_model)
    fd, engine = open_engine(path, align, seg_size, entries)
    try:
        out = lockstep(disk, engine, op, segs, user_model, user_real, align, entries)
    finally:
        engine.close()
        os.close(fd)
    assert out is None
    if op == "read":
        assert user_real == user_model == before[offset:offset + length]
    else:
        want = user_model if op == "write" else bytes(length)
        assert disk == before[:offset] + want + before[offset + length:]
        assert path.read_bytes() == disk


@ENGINE_SETTINGS
@given(st.data(), st.integers(1, 4))
def test_model_matches_the_engine_at_end_of_file(engine_dir, data, entries):
    """A read past the end of a truncated file (not even a whole block in
    direct mode) comes up short in the same places in the model and the
    engine, and ends in EIO in both."""
    directory, aligns = engine_dir
    align, seg_size, _, offset, length = data.draw(geometry(st.sampled_from(aligns)))
    cut = data.draw(st.integers(0, offset + length - 1))
    disk = bytearray(random.Random(cut).randbytes(cut))
    path = directory / "model.img"
    path.write_bytes(disk)
    user_model, user_real = bytearray(length), bytearray(length)
    fd, engine = open_engine(path, align, seg_size, entries)
    try:
        out = lockstep(disk, engine, "read", plan.plan_read(offset, length, align, seg_size),
                       user_model, user_real, align, entries)
    finally:
        engine.close()
        os.close(fd)
    assert out is not None and out.error == -errno.EIO
    assert user_real == user_model, "the same bytes arrived before the error"
