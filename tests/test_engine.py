"""The engine tested in-process, through :class:`nbdloop.engine.backing.Backing`:
no nbdkit, no NBD client, just the public Python API on a real file.

- A hypothesis state machine runs sequences of reads, writes, zeroes, trims,
  flushes and extent queries, at aligned, sector-unaligned, block-unaligned
  and byte-granular offsets, across segment and wave boundaries and up to
  the end of the image, and compares every read, and the file itself after
  every step, with a bytearray oracle of the whole image.
- A threaded stress writes interleaved sub-block ranges of the same blocks
  from several threads at once: every byte must end up holding the last
  write of the one thread that owns it (no update lost to a racing
  read-modify-write of an edge block).

Both run in both modes, on a backing with 512-byte direct-I/O alignment (the
filesystem of the temporary directory) and on one with 4 KiB sectors
(``fourk_fs``), where every sub-4K request is a read-modify-write.  The
request buffers sit at chosen places in memory too, so that in direct mode
some are used as they are (no bounce copy) and others are not.
"""
from __future__ import annotations

import ctypes
import errno
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from conftest import dio_alignment, in_threads, require
from nbdloop.engine import uring
from nbdloop.engine.backing import Backing

KiB = 1024
NOTSUP = {errno.ENOTSUP, errno.EOPNOTSUPP}
MODES = ["direct", "buffered"]


# ---- the two backings --------------------------------------------------------

def fs_type(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (from mountinfo)."""
    dev = os.stat(path).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[2] == want:
                return right.split()[0]
    return None


@pytest.fixture(params=["512", "4k"], ids=["sector512", "sector4k"])
def backing_dir(request, tmp_path) -> tuple[Path, int]:
    """(directory, its direct-I/O alignment): tmp_path, which must take
    512-byte direct I/O, or the 4 KiB-sector ext4 of ``fourk_fs``.

    The oracle's zero and trim rules are those of ext4's fallocate (PUNCH_HOLE
    and ZERO_RANGE both supported, partial blocks zeroed exactly), so the
    backing must be ext4."""
    if request.param == "512":
        directory, want = tmp_path, 512
    else:
        directory, want = request.getfixturevalue("fourk_fs"), 4096
    kind = fs_type(directory)
    require(kind == "ext4", f"{directory} on ext4 (it is {kind})")
    align = dio_alignment(directory)
    require(align is not None, f"O_DIRECT on {directory} ({kind})")
    require(align == want, f"{want}-byte direct-I/O alignment on {directory} (it is {align})")
    return directory, align


def placed(n: int, residue: int, fill: int = 0) -> tuple[memoryview, bytearray, int]:
    """A writable buffer of ``n`` bytes whose address is ``residue`` mod
    4096, inside a bigger bytearray of ``fill`` bytes: (buffer, whole, pad)."""
    big = bytearray(bytes([fill]) * (n + 8192))
    pad = (residue - ctypes.addressof(ctypes.c_char.from_buffer(big))) % 4096
    return memoryview(big)[pad:pad + n], big, pad


def read_file(path: Path) -> bytes:
    """The file's bytes, read through the page cache, independently of the engine."""
    with open(path, "rb", buffering=0) as f:
        return f.read()


def first_difference(got, want) -> int:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return min(len(got), len(want))


def assert_same(got, want, offset: int, what: str) -> None:
    got, want = bytes(got), bytes(want)
    if got != want:
        i = first_difference(got, want)
        raise AssertionError(
            f"{what}: {len(got)} bytes at {offset} differ from the oracle first at "
            f"byte {offset + i} (got {got[i:i + 8].hex()}, want {want[i:i + 8].hex()})")


# ---- the oracle state machine -------------------------------------------------

class ImageMachine(RuleBasedStateMachine):
    """One Backing on one image per example; the oracle is a bytearray of the
    whole image.  Subclassed per (directory, mode, alignment) by the test."""

    directory: Path
    mode: str
    align: int          # the backing's direct-I/O alignment

    def __init__(self) -> None:
        super().__init__()
        self.backing: Backing | None = None
        self.plain = -1

    @initialize(size=st.sampled_from([64 * KiB, 256 * KiB, 268 * KiB]),
                seg_size=st.sampled_from([4096, 8192]),
                entries=st.integers(1, 3),
                seed=st.integers(0, 2**32 - 1))
    def open_image(self, size: int, seg_size: int, entries: int, seed: int) -> None:
        # The image is mostly random data with two holes, one in the middle
        # and one at the end: data everywhere makes a misplaced, lost or
        # zero-filled byte visible; the holes make reads and read-modify-
        # writes of unallocated blocks part of the test too.  (A fully sparse
        # image would hide bugs that return zeroes instead of data.)
        self.size, self.seg_size, self.entries = size, seg_size, entries
        self.wave = seg_size * entries
        rng = random.Random(seed)
        self.oracle = bytearray(rng.randbytes(size))
        hole = (size // 2 - 3 * 4096, size // 2 + 2 * 4096)
        self.oracle[hole[0]:hole[1]] = bytes(hole[1] - hole[0])
        self.oracle[size - 8192:] = bytes(8192)
        self.path = self.directory / "oracle.img"
        if self.path.exists():
            self.path.unlink()
        with open(self.path, "wb") as f:
            f.write(self.oracle[:hole[0]])
            f.seek(hole[1])
            f.write(self.oracle[hole[1]:size - 8192])
            f.truncate(size)
        self.backing = Backing.open(str(self.path), mode=self.mode, seg_size=seg_size,
                                    entries=entries)
        assert self.backing.size == size
        assert self.backing.align == self.align
        self.direct = self.mode == "direct"
        self.plain = os.open(self.path, os.O_RDONLY)

    # ---- choosing requests ----

    def draw_range(self, data) -> tuple[int, int]:
        """(offset, count) inside the image, of one of several kinds."""
        size, seg, wave = self.size, self.seg_size, self.wave
        kind = data.draw(st.sampled_from(["4k", "512", "byte", "boundary", "end"]),
                         label="kind")
        if kind == "4k":
            off = 4096 * data.draw(st.integers(0, size // 4096 - 1))
            n = 4096 * data.draw(st.integers(1, 3 * wave // 4096 + 1))
        elif kind == "512":
            off = 512 * data.draw(st.integers(0, size // 512 - 1))
            n = 512 * data.draw(st.integers(1, 3 * wave // 512 + 1))
        elif kind == "byte":
            off = data.draw(st.integers(0, size - 1))
            n = data.draw(st.one_of(st.just(1), st.integers(1, 17), st.integers(1, 3 * wave)))
        elif kind == "boundary":
            # Start just before (or at) a segment or wave boundary, end past it.
            anchors = sorted({a for step in (seg, wave) for a in range(step, size, step)})
            anchor = data.draw(st.sampled_from(anchors))
            before = data.draw(st.one_of(st.sampled_from([0, 1, 511, 512, 513, 4095, 4096]),
                                         st.integers(0, 2 * 4096)))
            off = anchor - before
            n = before + data.draw(st.integers(1, 2 * wave))
        else:  # "end": up to, or just short of, the end of the image
            n = data.draw(st.one_of(st.integers(1, 17), st.integers(1, 3 * wave)))
            gap = data.draw(st.sampled_from([0, 0, 1, 511, 512, 4095, 4096]))
            off = size - n - gap
        off = min(max(off, 0), size - 1)
        n = min(max(n, 1), size - off)
        return off, n

    def read_buffer(self, data, n: int):
        """A writable buffer of n bytes: a bytearray, or a memoryview at an
        odd offset or at a chosen address mod 4096 (page-aligned, just the
        memory alignment, or short of it) inside a bigger bytearray whose
        other bytes are a guard."""
        how = data.draw(st.sampled_from(["bytearray", "slice", "placed"]), label="buffer")
        if how == "slice":
            pad = data.draw(st.sampled_from([1, 3, 7, 511, 4095]), label="pad")
            big = bytearray(b"\x5a" * (pad + n + 13))
            return memoryview(big)[pad:pad + n], (big, pad, 13)
        if how == "placed":
            buf, big, pad = placed(n, data.draw(self.residues(), label="residue"), 0x5a)
            return buf, (big, pad, len(big) - pad - n)
        return bytearray(n), None

    def residues(self):
        mem = self.backing.mem_align
        return st.sampled_from(sorted({0, mem % 4096, mem // 2, 16}))

    def write_buffer(self, data, payload: bytes):
        how = data.draw(st.sampled_from(["bytes", "bytearray", "slice", "readonly-slice",
                                         "placed", "readonly-placed"]), label="buffer")
        if how == "bytes":
            return payload
        if how == "bytearray":
            return bytearray(payload)
        if how.endswith("placed"):
            buf, _, _ = placed(len(payload), data.draw(self.residues(), label="residue"))
            buf[:] = payload
            return buf.toreadonly() if how.startswith("readonly") else buf
        pad = data.draw(st.sampled_from([1, 3, 7, 511]), label="pad")
        big = b"\xa5" * pad + payload + b"\xa5" * 5
        if how == "slice":
            return memoryview(bytearray(big))[pad:pad + len(payload)]
        return memoryview(big)[pad:pad + len(payload)]

    # ---- rules ----

    @rule(data=st.data())
    def read(self, data) -> None:
        off, n = self.draw_range(data)
        buf, guard = self.read_buffer(data, n)
        self.backing.pread(buf, off)
        assert_same(buf, self.oracle[off:off + n], off, "pread")
        if guard is not None:
            big, pad, tail = guard
            assert big[:pad] == b"\x5a" * pad and big[pad + n:] == b"\x5a" * tail, \
                "pread wrote outside its buffer"

    @rule(data=st.data(), fua=st.booleans())
    def write(self, data, fua: bool) -> None:
        off, n = self.draw_range(data)
        payload = random.Random(data.draw(st.integers(0, 2**32 - 1))).randbytes(n)
        self.backing.pwrite(self.write_buffer(data, payload), off, fua=fua)
        self.oracle[off:off + n] = payload

    @rule(data=st.data(), may_trim=st.booleans(), fast=st.booleans(), fua=st.booleans())
    def zero(self, data, may_trim: bool, fast: bool, fua: bool) -> None:
        off, n = self.draw_range(data)
        # On ext4 a zero can always be done by fallocate, except partial edge
        # blocks in direct mode, which need a read-modify-write: a fast zero
        # must refuse exactly those, before changing anything.
        edges = self.direct and (off % self.align or n % self.align)
        try:
            self.backing.zero(n, off, may_trim=may_trim, fast=fast, fua=fua)
        except OSError as e:
            assert fast and e.errno in NOTSUP, f"zero at {off}+{n} failed: {e}"
            assert edges, f"a fast zero at {off}+{n} failed without partial blocks"
            got = bytearray(n)
            self.backing.pread(got, off)
            assert_same(got, self.oracle[off:off + n], off, "after a refused fast zero")
            return
        assert not (fast and edges), f"a fast zero at {off}+{n} did a read-modify-write"
        self.oracle[off:off + n] = bytes(n)

    @rule(data=st.data(), fua=st.booleans())
    def trim(self, data, fua: bool) -> None:
        off, n = self.draw_range(data)
        self.backing.trim(n, off, fua=fua)
        if self.direct:
            # Only whole blocks of the direct-I/O alignment are punched; the
            # partial edge blocks are left as they were (trim is advisory).
            a = self.align
            start, stop = -(-off // a) * a, (off + n) // a * a
        else:
            # ext4 punches the whole byte range, zeroing partial fs blocks.
            start, stop = off, off + n
        if stop > start:
            self.oracle[start:stop] = bytes(stop - start)

    @rule(data=st.data())
    def other(self, data) -> None:
        """The rarer commands, together in one rule so that reads and writes
        make up most of each run."""
        what = data.draw(st.sampled_from(["flush", "extents", "read past end"]))
        if what == "flush":
            self.backing.flush()
        elif what == "extents":
            self.extents(data, data.draw(st.booleans(), label="req_one"))
        else:
            self.read_past_end(data)

    def extents(self, data, req_one: bool) -> None:
        off, n = self.draw_range(data)
        got = self.backing.extents(n, off, req_one=req_one)
        pos = off
        for o, length, kind in got:
            assert o == pos and length > 0 and kind in (0, 3), got
            if kind == 3:
                assert self.oracle[o:o + length] == bytes(length), \
                    f"extent {o}+{length} is reported a hole but holds data"
            pos += length
        assert len(got) == 1 if req_one else pos == off + n, got
        assert pos <= off + n, got

    def read_past_end(self, data) -> None:
        n = data.draw(st.integers(1, 2 * self.wave))
        over = data.draw(st.one_of(st.just(1), st.integers(1, n + 4096)))
        off = self.size + over - n       # offset + count == size + over > size
        with pytest.raises(OSError) as e:
            self.backing.pread(bytearray(n), off)
        assert e.value.errno == errno.EIO and "end of file" in str(e.value), e.value

    @invariant()
    def file_matches_oracle(self) -> None:
        """After every step, the file read through another fd (the page cache,
        not the engine) holds exactly the oracle."""
        if self.backing is None:
            return
        got = os.pread(self.plain, self.size + 1, 0)
        assert len(got) == self.size, "the image changed size"
        assert_same(got, self.oracle, 0, "the file")

    def teardown(self) -> None:
        if self.backing is None:
            return
        try:
            whole = bytearray(self.size)
            self.backing.pread(whole, 0)
            assert_same(whole, self.oracle, 0, "pread of the whole image")
        finally:
            os.close(self.plain)
            self.backing.close()
            self.backing.close()            # safe twice
        assert self.backing.fd == -1
        # Not checked: that the image's flock is free as soon as close()
        # returns.  Usually it is, but after fsync or fallocate (which
        # io_uring runs in io-wq workers) the lock can stay held for some
        # milliseconds more, so such a check would be flaky.


@pytest.mark.parametrize("mode", MODES)
def test_requests_match_the_oracle(backing_dir, mode):
    directory, align = backing_dir

    class Machine(ImageMachine):
        pass
    Machine.directory, Machine.mode, Machine.align = directory, mode, align
    before = uring.stats()
    run_state_machine_as_test(Machine, settings=settings(
        max_examples=30, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
    after = uring.stats()
    if mode == "direct":
        # Both ways of doing a request were taken and checked.
        assert after["zero_copy"] > before["zero_copy"]
        assert after["copied"] > before["copied"]


# ---- which requests are copied ---------------------------------------------------

def test_direct_mode_copies_only_what_the_buffer_cannot_take(backing_dir):
    """A request whose offset and length meet the offset alignment and whose
    buffer meets the memory alignment is done on the buffer itself: nothing
    copied.  A buffer short of it, or an unaligned request, goes through the
    bounce slots.  The memory alignment is the filesystem's own, not the
    (larger) offset alignment folded into it."""
    directory, align = backing_dir
    path = directory / "zc.img"
    path.write_bytes(random.Random(7).randbytes(1 << 20))
    with Backing.open(str(path), mode="direct", seg_size=65536, entries=2) as b:
        mem = b.mem_align
        assert 0 < mem <= align and b.align == align
        payload = random.Random(8).randbytes(256 * KiB)    # two waves of two segments

        def run(residue: int, off: int, n: int) -> dict[str, int]:
            before = uring.stats()
            buf, _, _ = placed(n, residue)
            buf[:] = payload[:n]
            b.pwrite(buf.toreadonly(), off)
            back, _, _ = placed(n, residue)
            b.pread(back, off)
            assert_same(back, payload[:n], off, f"pread into a buffer at {residue} mod 4096")
            after = uring.stats()
            return {k: after[k] - before[k] for k in ("copied", "zero_copy", "zero_copy_bytes")}

        for n in (align, 64 * KiB, 256 * KiB):
            # Exactly the memory alignment (not more, unless it is a page).
            assert run(mem % 4096, align * 3, n) == \
                {"copied": 0, "zero_copy": 2, "zero_copy_bytes": 2 * n}, f"{n} bytes"
        if mem > 1:
            got = run(mem // 2, align * 3, 64 * KiB)
            assert got == {"copied": 128 * KiB, "zero_copy": 0, "zero_copy_bytes": 0}, got
        # An unaligned write reads and rewrites its edge block; its aligned
        # middle still goes straight from the buffer.
        got = run(0, align * 3 + 512 if align > 512 else 100, 64 * KiB)
        assert got["copied"] > 0 and got["zero_copy"] == 0, got


# ---- the range lock under concurrent read-modify-writes -------------------------

GRANULE = 64     # bytes; a 512-byte sector holds 8 granules, one per thread
SHIFT = 32       # granules start mid-way, so some straddle sector and block edges


def owner(rel: int, nthreads: int) -> int:
    """The thread that owns byte ``rel`` of the stressed region."""
    return ((rel + SHIFT) // GRANULE) % nthreads


def run_stress(b: Backing, region: int, length: int, nthreads: int, iters: int,
               seed: int) -> tuple[bytearray, list[int]]:
    """``nthreads`` threads, each writing (or zeroing) ``iters`` random
    sub-ranges of its own granules of [region, region + length), all at
    once.  Returns the bytes each thread last wrote (the expectation) and the
    number of edge blocks of all requests in direct mode (the pre-reads)."""
    start = threading.Barrier(nthreads)
    expected = bytearray(length)
    b.pread(expected, region)
    edge_blocks = [0] * nthreads
    granules = range((length + SHIFT) // GRANULE + 1)

    def writer(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        mine = [k for k in granules if k % nthreads == t]
        start.wait()
        for gen in range(1, iters + 1):
            k = rng.choice(mine)
            g0 = max(k * GRANULE - SHIFT, 0)
            g1 = min((k + 1) * GRANULE - SHIFT, length)
            if rng.random() < 0.25:
                a, z = g0, g1
            else:
                a = rng.randrange(g0, g1)
                z = rng.randrange(a + 1, g1 + 1)
            n, off = z - a, region + a
            if rng.random() < 0.1:
                b.zero(n, off)
                value = bytes(n)
            else:
                # The write's generation is in its data: a lost update
                # leaves an older generation (or the initial byte).
                value = bytes([gen % 255 + 1]) * n
                buf = value if rng.random() < 0.5 else \
                    memoryview(bytearray(b"\0" + value))[1:]
                b.pwrite(buf, off)
            expected[a:z] = value
            if b.direct and (off % b.align or n % b.align):
                edge_blocks[t] += (off + n - 1) // b.align - off // b.align + 1

    in_threads(writer, nthreads)
    return expected, sum(edge_blocks)


def lost_updates(got, expected, nthreads: int) -> list[str]:
    return [f"byte {i} (thread {owner(i, nthreads)}): {got[i]:#04x} instead of "
            f"{expected[i]:#04x}" for i in range(len(expected)) if got[i] != expected[i]]


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_sub_block_writes_lose_no_update(backing_dir, mode):
    """Eight threads own interleaved 64-byte granules of the same two 4 KiB
    blocks (every 512-byte sector holds one granule of each thread) and write
    random pieces of them concurrently, so in direct mode edge blocks are
    read-modify-written while other threads write the same blocks."""
    directory, _ = backing_dir
    path = directory / "stress.img"
    path.write_bytes(random.Random(5).randbytes(64 * KiB))
    nthreads, iters = 8, 300
    region, length = 3 * 4096, 2 * 4096
    with Backing.open(str(path), mode=mode, seg_size=8192, entries=2) as b:
        before = uring.stats()
        expected, edge_blocks = run_stress(b, region, length, nthreads, iters, seed=1)
        after = uring.stats()
        got = bytearray(length)
        b.pread(got, region)
    lost = lost_updates(got, expected, nthreads)
    assert not lost, f"{len(lost)} bytes lost their last update, e.g. {lost[:5]}"
    assert read_file(path)[region:region + length] == expected
    delta = {k: after[k] - before[k] for k in after}
    assert delta["requests"] >= nthreads * iters
    if mode == "direct":
        # One pre-read per partial block of each request, and no more.
        assert delta["prereads"] == edge_blocks
        assert edge_blocks >= nthreads * iters   # every request is sub-sector
        assert 0 <= delta["lock_waits"] <= delta["requests"]
    else:
        # Buffered mode needs no read-modify-write and takes no range lock.
        assert delta["prereads"] == 0 and delta["lock_waits"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_read_never_writes_into_an_immutable_buffer(tmp_path, mode):
    """The engine asks for a writable buffer to read into: a bytes object
    is refused, not silently overwritten."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 * 1024))
    with Backing.open(str(path), mode=mode) as b:
        frozen = bytes(4096)
        with pytest.raises(BufferError):
            b.pread(frozen, 0)
        with pytest.raises(BufferError):
            b.pread(memoryview(frozen)[1:1001], 1)    # the general path too
        assert frozen == bytes(4096)
        b.pwrite(memoryview(bytes(range(256)) * 16), 0)   # a write takes a read-only one
        got = bytearray(4096)
        b.pread(got, 0)
        assert got == bytes(range(256)) * 16


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_idle_rings_are_freed_from_another_thread_and_built_again(tmp_path, mode):
    """A worker that waits between requests (as nbdkit's do, for as long as
    their connection lives) loses its ring to release_idle, which runs on
    another thread, and its next request builds a new one and is served
    right."""
    require(mode != "direct" or dio_alignment(tmp_path) <= 4096, "no O_DIRECT here")
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 20))
    workers = 4
    served = threading.Barrier(workers + 1)
    freed = threading.Barrier(workers + 1)
    wrong: list[str] = []
    with Backing.open(str(path), mode=mode) as backing:
        def worker(i: int) -> None:
            at = i * 131072
            backing.pwrite(bytes([i + 1]) * 65536, at)
            served.wait()
            freed.wait()           # idle, ring and all, while another thread frees it
            backing.pwrite(bytes([i + 101]) * 65536, at + 32768)
            got = bytearray(98304)
            backing.pread(got, at)
            if got != bytes([i + 1]) * 32768 + bytes([i + 101]) * 65536:
                wrong.append(f"worker {i} read back otherwise")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        served.wait()
        before = uring.stats()
        n = uring.release_idle(0)
        after = uring.stats()
        freed.wait()
        for t in threads:
            t.join()
        assert not wrong, wrong
        assert n >= workers
        assert after["rings_idle_freed"] - before["rings_idle_freed"] == n
        assert uring.stats()["rings"] - after["rings"] >= workers
    assert uring.release_idle(3600) == 0
