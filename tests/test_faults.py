"""Faults in the backing store reach the client with their own errno.

Two real faulty backings:

* **EIO**: the image is a file on FUSE (``nbdfuse``) whose NBD export is
  ``nbdkit memory`` behind nbdkit's error filter.  Errors are switched on
  and off by creating and removing a trigger file (``error-*-file=``), or
  injected at random under load (``error-*-rate=``).  O_DIRECT works on the
  nbdfuse file (FUSE passes it through), so both modes are served from it;
  nbdfuse writes through (no writeback cache), so even buffered writes see
  the error at once.
* **ENOSPC**: the image is a sparse file on a small ext4 filesystem (on a
  loop device) that is then filled up, so writing into the image's holes
  finds no space.

In every case: the client sees EIO or ENOSPC (not another errno, not a
silent success), requests that do not touch the fault go on being served
during it, the server goes on serving once the fault ends (and stops
cleanly at the end: the ``serve`` fixture checks its exit status), and the
data written before the fault is intact.
"""
from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import connect, read_stats, require_root, require_tools, run

from nbdloop.serve.children import ServerProcess

MiB = 1 << 20
KiB = 1 << 10
IMAGE_SIZE = 64 * MiB
#: No request here takes more than a moment; a reply later than this is a hang.
HANG = 120.0


def outcome(h, op: str, *args) -> str:
    """Run one command asynchronously (so that a hang fails the test instead
    of stopping it) and name its result: "ok" or the errno's name."""
    import nbd
    if op == "pwrite":
        data, offset, *flags = args
        buf = nbd.Buffer.from_bytearray(data)

        def issue(cb):
            return h.aio_pwrite(buf, offset, completion=cb, flags=sum(flags))
    elif op == "pread":
        count, offset = args
        buf = nbd.Buffer(count)

        def issue(cb):
            return h.aio_pread(buf, offset, completion=cb)
    elif op == "zero":
        count, offset, *flags = args

        def issue(cb):
            return h.aio_zero(count, offset, completion=cb, flags=sum(flags))
    else:
        raise ValueError(op)
    [err] = run_aio(h, [issue])
    return errno.errorcode.get(err, str(err)) if err else "ok"


def block(tag: int, size: int) -> bytes:
    return random.Random(tag).randbytes(size)


def drop_cache(path: Path) -> None:
    """Drop the page cache of ``path`` so that buffered reads go to the store."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class FaultyStore:
    """``nbdkit memory`` behind the error filter, as a file on nbdfuse."""

    def __init__(self, workdir: Path, filter_args: list[str]) -> None:
        self.workdir = workdir
        workdir.mkdir()
        sock, pid, log = (str(workdir / f"lower.{s}") for s in ("sock", "pid", "log"))
        self.lower = ServerProcess(
            ["nbdkit", "-f", "-U", sock, "-P", pid, "memory", str(IMAGE_SIZE),
             "--filter=error", *filter_args],
            socket_path=sock, pidfile=pid, log=log)
        self.mountpoint = workdir / "fuse"
        self.mountpoint.mkdir()
        self.path = self.mountpoint / "disk.img"
        self.fuse: subprocess.Popen | None = None

    def start(self) -> FaultyStore:
        self.lower.start()
        pidfile = self.workdir / "nbdfuse.pid"
        self.fuse_log = open(self.workdir / "nbdfuse.log", "wb")
        self.fuse = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(self.path), "--unix", self.lower.socket_path],
            stdin=subprocess.DEVNULL, stdout=self.fuse_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            assert self.fuse.poll() is None, (self.workdir / "nbdfuse.log").read_text()
            assert time.monotonic() < deadline, "nbdfuse did not start"
            time.sleep(0.02)
        assert self.path.stat().st_size == IMAGE_SIZE
        return self

    def stop(self) -> None:
        if self.fuse is not None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            try:
                self.fuse.wait(30)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait()
            self.fuse_log.close()
        self.lower.stop()


@pytest.fixture
def faulty_store(tmp_path):
    """Factory for a FaultyStore; unmounted and stopped at teardown (after
    the nbdloop servers on it, which the serve fixture stops first because
    it was requested later)."""
    require_root()
    require_tools("nbdkit", "nbdfuse", "fusermount3")
    stores: list[FaultyStore] = []

    def make(*filter_args: str) -> FaultyStore:
        store = FaultyStore(tmp_path / f"store{len(stores)}", list(filter_args))
        stores.append(store)
        return store.start()

    yield make
    for store in stores:
        store.stop()


def eio_store(faulty_store, rate: str, write_fault: Path, read_fault: Path):
    """A store whose writes (reads) fail with EIO at ``rate`` while the file
    ``write_fault`` (``read_fault``) exists."""
    return faulty_store("error=EIO",
                        f"error-pwrite-rate={rate}", f"error-pwrite-file={write_fault}",
                        f"error-pread-rate={rate}", f"error-pread-file={read_fault}")


def test_eio_reaches_the_client_and_the_server_recovers(faulty_store, serve, mode, tmp_path):
    write_fault = tmp_path / "write-fault"
    read_fault = tmp_path / "read-fault"
    store = eio_store(faulty_store, "100%", write_fault, read_fault)
    s = serve(store.path, mode)
    h = connect(s.uri)
    before = block(1, 4 * MiB)
    h.pwrite(before, 0)
    h.flush()

    write_fault.touch()
    import nbd
    outcomes = {
        "4K write": outcome(h, "pwrite", block(2, 4096), 8 * MiB),
        "FUA write": outcome(h, "pwrite", block(3, 64 * KiB), 9 * MiB,
                                nbd.CMD_FLAG_FUA),
        "1M write (8 segments)": outcome(h, "pwrite", block(4, MiB), 10 * MiB),
        "unaligned write": outcome(h, "pwrite", block(5, 1000), 12 * MiB + 100),
    }
    print(f"\n{mode}, during the write fault: {outcomes}")
    assert set(outcomes.values()) == {"EIO"}, outcomes
    # Reads go on being served during the write fault.
    assert h.pread(4 * MiB, 0) == before
    write_fault.unlink()

    read_fault.touch()
    drop_cache(store.path)
    outcomes = {
        "4K read": outcome(h, "pread", 4096, 0),
        "1M read": outcome(h, "pread", MiB, MiB),
        "unaligned read": outcome(h, "pread", 1000, 2 * MiB + 100),
    }
    print(f"{mode}, during the read fault: {outcomes}")
    assert set(outcomes.values()) == {"EIO"}, outcomes
    # Writes go on being served during the read fault.
    during = block(6, MiB)
    h.pwrite(during, 16 * MiB)
    read_fault.unlink()

    # After the fault: everything works, and nothing acknowledged was lost.
    drop_cache(store.path)
    assert h.pread(4 * MiB, 0) == before
    assert h.pread(MiB, 16 * MiB) == during
    after = block(7, MiB)
    h.pwrite(after, 8 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(MiB, 8 * MiB) == after
    h.flush()
    h.shutdown()
    # The server logged which request failed and why.
    log = s.log.read_text(errors="replace")
    assert "Input/output error" in log
    # And a fresh connection is served normally.
    h2 = connect(s.uri)
    assert h2.pread(4 * MiB, 0) == before
    h2.shutdown()


def run_aio(h, commands, depth: int = 32) -> list[int]:
    """Run ``commands`` (callables that issue one aio command with the given
    completion callback) ``depth`` at a time; returns each one's errno
    (0 for success).  Fails if nothing completes for ``HANG`` seconds."""
    results: list[int | None] = [None] * len(commands)
    pending = list(enumerate(commands))
    pending.reverse()

    def completion(i):
        def done(err):
            results[i] = err.value
            return 1
        return done

    while pending or h.aio_in_flight():
        while pending and h.aio_in_flight() < depth:
            i, issue = pending.pop()
            issue(completion(i))
        if h.poll(int(HANG * 1000)) == 0:
            raise AssertionError(f"no reply for {HANG}s with {h.aio_in_flight()} "
                                 "requests in flight: the server hung")
    assert None not in results
    return results  # type: ignore[return-value]


def test_a_store_slower_than_a_wait_slice(faulty_store, serve, mode, tmp_path):
    """Reads from the store take 2.5 s (nbdkit's delay filter): longer than
    one of the engine's bounded waits for a completion, so a read waits
    more than once, which the engine's wait_slices counter shows, and then
    returns the data written before, several requests in flight at once."""
    import nbd
    store = faulty_store("--filter=delay", "delay-read=2500ms")
    stats_file = tmp_path / "stats.json"
    s = serve(store.path, mode, extra=["--stats-file", str(stats_file)])
    h = connect(s.uri)
    data = block(20, 4 * MiB)
    h.pwrite(data, 0)
    h.flush()
    drop_cache(store.path)
    sizes = [4096, 512, 64 * KiB, MiB]          # the last in several segments
    offs = [0, 100 * 512 + 512, MiB + 4096, 2 * MiB]
    bufs = [nbd.Buffer(n) for n in sizes]
    errs = run_aio(h, [lambda cb, b=b, o=o: h.aio_pread(b, o, completion=cb)
                       for b, o in zip(bufs, offs)])
    assert errs == [0] * len(sizes)
    for b, o, n in zip(bufs, offs, sizes):
        assert b.to_bytearray() == data[o:o + n], o
    h.shutdown()
    stats = read_stats(stats_file)
    assert stats["wait_slices"] >= 1, stats


def test_a_stalled_store_is_reported_and_still_waited_for(faulty_store, serve, tmp_path):
    """A read that takes 14 s: the server's log says, after ten seconds,
    that a submission has not completed, and the read then returns its data
    (the engine never gives up on a submission: the kernel may still be
    using the buffer).  The report comes after ten one-second waits, which
    on a loaded machine take longer than ten seconds: with a read of 11 s
    it once did not come in time."""
    store = faulty_store("--filter=delay", "delay-read=14")
    s = serve(store.path, "direct")
    h = connect(s.uri)
    data = block(21, 64 * KiB)
    h.pwrite(data, 0)
    h.flush()
    assert h.pread(len(data), 0) == data
    log = s.log.read_text(errors="replace")
    assert re.search(r"nbdloop: 1 of 1 I/O submissions not completed after 10 s", log), log


FAULT_ROUNDS = 4


def test_random_eio_under_load(faulty_store, serve, mode, tmp_path):
    """A quarter of the store's reads and writes fail, at random, while 32
    requests are in flight: each request either succeeds or fails with EIO,
    and every write that succeeded reads back once the fault ends.  Four
    rounds, each rewriting every slot of the second half with new data."""
    import nbd
    faults = tmp_path / "faults"
    store = eio_store(faulty_store, "25%", faults, faults)
    s = serve(store.path, mode)
    h = connect(s.uri)
    rng = random.Random(11)
    slot = 256 * KiB                       # each write its own slot: no overlaps
    half = IMAGE_SIZE // 2
    base = block(100, half)                # the first half, written before the faults
    h.pwrite(base, 0)
    h.flush()
    totals = {"writes": {}, "reads": {}}
    for rnd in range(FAULT_ROUNDS):
        # Writes to the second half: 4 KiB to 256 KiB (2 segments), some FUA.
        sizes = {i: rng.choice([4 * KiB, 16 * KiB, 64 * KiB, 200 * KiB, slot])
                 for i in range(half // slot, IMAGE_SIZE // slot)}
        datas = {i: block(rnd * 10_000 + i, n) for i, n in sizes.items()}
        bufs = {i: nbd.Buffer.from_bytearray(d) for i, d in datas.items()}
        order = list(sizes)
        rng.shuffle(order)
        writes = [lambda cb, i=i, buf=bufs[i]: h.aio_pwrite(
                      buf, i * slot, completion=cb, flags=nbd.CMD_FLAG_FUA if i % 3 == 0 else 0)
                  for i in order]
        # Reads of the first half, unaligned ones among them.
        roffs = [rng.randrange(0, half - 64 * KiB, rng.choice([512, 4096, 1]))
                 for _ in range(256)]
        rbufs = [nbd.Buffer(rng.choice([512, 4 * KiB, 64 * KiB])) for _ in roffs]
        reads = [lambda cb, buf=buf, off=off: h.aio_pread(buf, off, completion=cb)
                 for buf, off in zip(rbufs, roffs)]
        faults.touch()
        drop_cache(store.path)
        # Writes and reads interleaved, 32 in flight.
        mixed = [c for pair in zip(writes, reads[:len(writes)]) for c in pair]
        mixed += reads[len(writes):]
        errs = run_aio(h, mixed)
        faults.unlink()
        write_errs = errs[0:2 * len(writes):2]
        read_errs = errs[1:2 * len(writes):2] + errs[2 * len(writes):]
        for kind, es in (("writes", write_errs), ("reads", read_errs)):
            for e in es:
                name = errno.errorcode.get(e, str(e)) if e else "ok"
                totals[kind][name] = totals[kind].get(name, 0) + 1
        assert set(write_errs) <= {0, errno.EIO}, totals
        assert set(read_errs) <= {0, errno.EIO}, totals
        # Reads that succeeded during the fault returned the right data.
        for j, e in enumerate(read_errs):
            if e == 0:
                n = len(rbufs[j])
                assert rbufs[j].to_bytearray() == base[roffs[j]:roffs[j] + n], roffs[j]
        # After the fault: every acknowledged write, and the data from before.
        drop_cache(store.path)
        lost = [i for i, e in zip(order, write_errs)
                if e == 0 and h.pread(sizes[i], i * slot) != datas[i]]
        assert lost == [], f"round {rnd}: acknowledged writes lost at slots {lost}"
        assert h.pread(half, 0) == base
    print(f"\n{mode}: {FAULT_ROUNDS} rounds, writes {totals['writes']}, "
          f"reads {totals['reads']}")
    # Both outcomes happened, or the test proved nothing.
    assert totals["writes"].get("EIO") and totals["writes"].get("ok"), totals
    assert totals["reads"].get("EIO") and totals["reads"].get("ok"), totals
    h.shutdown()


# ---- ENOSPC ------------------------------------------------------------------------

@pytest.fixture
def full_fs(tmp_path):
    """A 32 MiB ext4 filesystem on a loop device, mounted; yields (mountpoint,
    fill, unfill): ``fill()`` takes every free block, ``unfill()`` gives
    them back."""
    require_root()
    require_tools("losetup", "mkfs.ext4", "mount", "umount")
    backing = tmp_path / "fs.raw"
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)
    run(["mkfs.ext4", "-q", "-F", "-m", "0", str(backing)])
    mnt = tmp_path / "fs"
    mnt.mkdir()
    run(["mount", "-o", "loop", str(backing), str(mnt)])
    filler = mnt / "filler"

    def fill() -> int:
        """Write until the filesystem is full; returns the bytes taken."""
        n = 0
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (MiB, 64 * KiB, 4 * KiB, 512):
                data = b"\xff" * chunk
                while True:
                    try:
                        n += os.write(fd, data)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC, e
                        break
            os.fsync(fd)
        finally:
            os.close(fd)
        return n

    def unfill() -> None:
        filler.unlink()
        os.sync()

    try:
        yield mnt, fill, unfill
    finally:
        # The servers on it are stopped by now (the serve fixture was set up
        # after this one, so it is torn down first).
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_enospc_reaches_the_client_and_the_server_recovers(full_fs, serve, mode):
    import nbd
    mnt, fill, unfill = full_fs
    img = mnt / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)            # sparse: 64 MiB on a 32 MiB filesystem
    s = serve(img, mode)
    h = connect(s.uri)
    before = block(1, 4 * MiB)
    h.pwrite(before, 0)
    h.flush()
    taken = fill()
    print(f"\n{mode}: filled the filesystem with {taken / MiB:.1f} MiB; "
          f"{os.statvfs(mnt).f_bavail} blocks left")

    outcomes = {
        "4K write into a hole": outcome(h, "pwrite", block(2, 4096), 32 * MiB),
        "FUA write into a hole": outcome(h, "pwrite", block(3, 64 * KiB), 33 * MiB,
                                            nbd.CMD_FLAG_FUA),
        "4M write into holes": outcome(h, "pwrite", block(4, 4 * MiB), 40 * MiB),
        "unaligned write into a hole": outcome(h, "pwrite", block(5, 1000), 50 * MiB + 10),
        "write zeroes (no hole)": outcome(h, "zero", MiB, 56 * MiB, nbd.CMD_FLAG_NO_HOLE),
    }
    print(f"{mode}, on the full filesystem: {outcomes}")
    assert set(outcomes.values()) == {"ENOSPC"}, outcomes
    # Everything that needs no new space still works: reads, overwrites of
    # allocated blocks, flush.
    assert h.pread(4 * MiB, 0) == before
    over = block(6, MiB)
    h.pwrite(over, MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(MiB, MiB) == over
    expected = before[:MiB] + over + before[2 * MiB:]

    # Space comes back: the same writes now succeed.
    unfill()
    late = block(7, 4 * MiB)
    h.pwrite(late, 40 * MiB)
    h.pwrite(block(2, 4096), 32 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(4 * MiB, 40 * MiB) == late
    assert h.pread(4 * MiB, 0) == expected
    h.shutdown()
    log = s.log.read_text(errors="replace")
    assert "No space left on device" in log
    # Each failed request is one line that names it, not a traceback.
    assert "Traceback" not in log and "OSError" not in log, log
    failed = [ln for ln in log.splitlines() if "No space left on device" in ln]
    assert any(re.search(rf"pwrite at {32 * MiB}\+4096 on disk\.img: No space left on device$",
                         ln) for ln in failed), failed
    assert s.stop() == 0, s.log_tail()
    # The image itself, read without the server.
    with open(img, "rb") as f:
        assert f.read(4 * MiB) == expected
        f.seek(40 * MiB)
        assert f.read(4 * MiB) == late
