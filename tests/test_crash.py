"""The crash loop: nothing the server acknowledged is lost when it is killed.

A libnbd client keeps many writes in flight (plain, FUA, and flushes among
them) while the nbdkit process is SIGKILLed at a random moment.  A new server
starts on the same image and every acknowledged write must read back intact.

Every 512-byte sector a write covers carries its own identity
(tests/sectors.py), so a sector that is torn, misplaced, stale or foreign is
told apart from the one expected.  The generation is one number per write,
rising for the whole test.

What is expected of each sector, precisely: writes in flight never overlap (a
sector is not written again before its previous write has completed), so a
sector has at most one write outstanding.  The model keeps, per sector, the
generation of its last acknowledged write (0: never written, so zeroes) and
the generation of a write issued but never acknowledged (it was in flight at
the kill).  After the restart the sector must be exactly one of those
versions; then the version found becomes the new baseline.

``NBDLOOP_CRASH_ROUNDS`` sets the number of kill points per mode (default 24);
``NBDLOOP_CRASH_SEED`` repeats a run (the seed is printed).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sectors import HEADER, SECTOR, ZERO_SECTOR, identify, pattern, sector_bytes

from nbdloop.serve.children import ServerError

MiB = 1 << 20
QUEUE_DEPTH = 64
ROUNDS = int(os.environ.get("NBDLOOP_CRASH_ROUNDS", "24"))


@dataclass
class Model:
    """Per sector: the last acknowledged generation and the generation of an
    unacknowledged write that may or may not have landed."""
    sectors: int
    acked: array = field(init=False)
    unacked: array = field(init=False)

    def __post_init__(self) -> None:
        self.acked = array("Q", bytes(8 * self.sectors))
        self.unacked = array("Q", bytes(8 * self.sectors))

    def busy(self, first: int, count: int) -> bool:
        return any(self.unacked[first:first + count])

    def issue(self, first: int, count: int, gen: int) -> None:
        self.unacked[first:first + count] = array("Q", [gen]) * count

    def ack(self, first: int, count: int, gen: int) -> None:
        self.acked[first:first + count] = array("Q", [gen]) * count
        self.unacked[first:first + count] = array("Q", bytes(8 * count))


@dataclass
class Problem:
    offset: int
    what: str

    def __str__(self) -> str:
        return f"sector at {self.offset}: {self.what}"


def check_sector(data: bytes, offset: int, acked: int, unacked: int) -> str | None:
    """None if ``data`` is a version this sector may hold, else what is wrong."""
    allowed = {acked} | ({unacked} if unacked else set())
    found = identify(data, offset)
    if isinstance(found, str):
        return f"{found}, expected generation {max(allowed)}" if found == "foreign data" \
            else found
    if found == 0 and 0 not in allowed:
        return f"zeroes, expected generation {acked}"
    if found not in allowed:
        return f"generation {found}, expected {' or '.join(map(str, sorted(allowed)))}"
    return None


def verify(read, model: Model, chunk: int = MiB) -> tuple[list[Problem], array]:
    """Check every sector through ``read(offset, length)``; returns the
    problems and the generation each sector holds now."""
    problems: list[Problem] = []
    found = array("Q", bytes(8 * model.sectors))
    total = model.sectors * SECTOR
    acked, unacked = model.acked, model.unacked
    for base in range(0, total, chunk):
        data = read(base, min(chunk, total - base))
        for i in range(0, len(data), SECTOR):
            s = (base + i) // SECTOR
            sector = data[i:i + SECTOR]
            if acked[s] == 0 and unacked[s] == 0 and sector == ZERO_SECTOR:
                continue
            what = check_sector(sector, base + i, acked[s], unacked[s])
            if what:
                problems.append(Problem(base + i, what))
            elif sector != ZERO_SECTOR:
                found[s] = HEADER.unpack_from(sector)[2]
    return problems, found


@dataclass
class Tally:
    writes_acked: int = 0
    fua_acked: int = 0
    flushes_acked: int = 0
    bytes_acked: int = 0
    in_flight_at_kill: int = 0   # writes that failed because of the kill
    landed_unacked: int = 0      # sectors of unacknowledged writes found written
    restarts_lock_busy: int = 0


class Writer:
    """One connection that keeps ``QUEUE_DEPTH`` commands in flight until the
    server goes away."""

    def __init__(self, uri: str, model: Model, rng: random.Random, next_gen: int,
                 tally: Tally) -> None:
        import nbd
        self.nbd = nbd
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.rng = rng
        self.gen = next_gen
        self.tally = tally
        self.killed = threading.Event()
        self.errors: list[str] = []
        self.buffers: dict[int, object] = {}

    def pick(self) -> tuple[int, int]:
        """A random sector range: mostly 4 KiB blocks, some sub-4K sector
        runs, some multi-segment writes (> the 128 KiB segment size)."""
        r = self.rng.random()
        if r < 0.45:
            count, align = 8, 8
        elif r < 0.65:
            count, align = self.rng.randint(1, 7), 1
        elif r < 0.90:
            count, align = 8 * self.rng.randint(2, 16), 8
        else:
            count, align = 8 * self.rng.randint(33, 96), 8
        first = self.rng.randrange(0, self.model.sectors - count + 1, align)
        return first, count

    def issue_write(self) -> None:
        for _ in range(20):
            first, count = self.pick()
            if not self.model.busy(first, count):
                break
        else:
            return
        gen = self.gen
        self.gen += 1
        fua = self.rng.random() < 0.3
        buf = self.nbd.Buffer.from_buffer(pattern(first * SECTOR, count, gen))
        self.model.issue(first, count, gen)

        def done(err, first=first, count=count, gen=gen, fua=fua):
            self.buffers.pop(gen, None)
            if err.value == 0:
                self.model.ack(first, count, gen)
                self.tally.writes_acked += 1
                self.tally.fua_acked += fua
                self.tally.bytes_acked += count * SECTOR
            elif self.killed.is_set():
                self.tally.in_flight_at_kill += 1
            else:
                self.errors.append(f"write of generation {gen} at {first * SECTOR}"
                                   f"+{count * SECTOR} failed before the kill: "
                                   f"{os.strerror(err.value)}")
            return 1
        self.buffers[gen] = buf
        try:
            self.h.aio_pwrite(buf, first * SECTOR, completion=done,
                              flags=self.nbd.CMD_FLAG_FUA if fua else 0)
        except self.nbd.Error:
            # Refused by libnbd (the connection is gone): never sent.
            del self.buffers[gen]
            self.model.issue(first, count, 0)
            raise

    def issue_flush(self) -> None:
        def done(err):
            if err.value == 0:
                self.tally.flushes_acked += 1
            elif not self.killed.is_set():
                self.errors.append(f"flush failed before the kill: {os.strerror(err.value)}")
            return 1
        self.h.aio_flush(completion=done)

    def run_until_dead(self) -> None:
        nbd = self.nbd
        h = self.h
        while True:
            try:
                while h.aio_in_flight() < QUEUE_DEPTH:
                    if self.rng.random() < 0.05:
                        self.issue_flush()
                    else:
                        self.issue_write()
                h.poll(-1)
            except nbd.Error:
                if not (h.aio_is_dead() or h.aio_is_closed()):
                    raise
                if not self.killed.is_set():
                    raise AssertionError("the connection died before the server was killed")
                assert not self.buffers, "every write completed, one way or the other"
                return


def start_server(serve_factory, image, mode, tally: Tally, existing=None, **kw):
    """Start (or restart) the server.  The image lock belongs to the killed
    nbdkit's open file; it goes with it, but the kernel may drop the last
    reference a moment after the process is reaped, so a refusal because
    the image is locked is retried and counted."""
    for attempt in range(100):
        try:
            if existing is None:
                return serve_factory(image, mode, **kw)
            return existing.start()
        except ServerError as e:
            if "locked" not in str(e):
                raise
            tally.restarts_lock_busy += 1
            time.sleep(0.05)
    raise AssertionError("the image stayed locked after its server was killed")


def reader(h):
    return lambda offset, length: h.pread(length, offset)


def crash_loop(image: Path, mode: str, serve, rounds: int, seed: int,
               processes: int = 1) -> tuple[Model, Tally]:
    """``processes``: a server of several; the writer uses one process's
    socket and either its process or another is killed (which ends them all)."""
    import nbd
    size = image.stat().st_size
    model = Model(size // SECTOR)
    rng = random.Random(seed)
    tally = Tally()
    gen = 1
    s = start_server(serve, image, mode, tally, processes=processes)
    for rnd in range(rounds):
        w = Writer(rng.choice(s.uris), model, rng, gen, tally)
        victim = rng.choice(s.server_pids)
        assert victim != s.pid
        delay = rng.uniform(0.05, 1.2)

        def kill(w=w, victim=victim):
            w.killed.set()
            os.kill(victim, signal.SIGKILL)
        timer = threading.Timer(delay, kill)
        timer.start()
        try:
            w.run_until_dead()
        finally:
            timer.cancel()
        gen = w.gen
        assert not w.errors, w.errors[:5]
        assert s.proc.wait(60) != 0, "the supervisor reports its nbdkit's death"
        del w.h

        s = start_server(serve, image, mode, tally, existing=s)
        h = nbd.NBD()
        h.connect_uri(s.uri)
        problems, found = verify(reader(h), model)
        h.shutdown()
        assert not problems, (f"round {rnd} ({mode}, killed after {delay:.2f}s): "
                              f"{len(problems)} bad sectors, first: "
                              + "; ".join(map(str, problems[:5])))
        tally.landed_unacked += sum(1 for s_, g in enumerate(model.unacked)
                                    if g and found[s_] == g)
        model.acked = found
        model.unacked = array("Q", bytes(8 * model.sectors))
    assert s.stop() == 0, s.log_tail()
    return model, tally


@pytest.mark.slow
def test_crash_loop_loses_no_acknowledged_write(image, serve, mode):
    seed = int(os.environ.get("NBDLOOP_CRASH_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"\nseed {seed} (NBDLOOP_CRASH_SEED to repeat)")
    model, tally = crash_loop(image, mode, serve, ROUNDS, seed)
    # The image file itself, read without the server.
    with open(image, "rb") as f:
        problems, _ = verify(lambda off, n: os.pread(f.fileno(), n, off), model)
    assert not problems, "; ".join(map(str, problems[:5]))
    written = sum(1 for g in model.acked if g)
    print(f"{mode}: {ROUNDS} kills, {tally.writes_acked} writes acknowledged "
          f"({tally.fua_acked} FUA, {tally.bytes_acked / MiB:.1f} MiB), "
          f"{tally.flushes_acked} flushes acknowledged, "
          f"{tally.in_flight_at_kill} writes in flight at the kills, "
          f"{tally.landed_unacked} sectors of unacknowledged writes landed, "
          f"{written} sectors hold data, restarts refused for the lock: "
          f"{tally.restarts_lock_busy}; lost: 0")
    assert tally.writes_acked > ROUNDS, "writes were acknowledged in the rounds"
    assert tally.in_flight_at_kill > 0, "the kills found writes in flight"
    assert tally.flushes_acked > 0 and tally.fua_acked > 0


@pytest.mark.slow
def test_crash_loop_with_several_processes(image, serve):
    """serve --processes 2, direct mode: a third of the rounds."""
    seed = int(os.environ.get("NBDLOOP_CRASH_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"\nseed {seed} (NBDLOOP_CRASH_SEED to repeat)")
    rounds = max(ROUNDS // 3, 2)
    model, tally = crash_loop(image, "direct", serve, rounds, seed, processes=2)
    with open(image, "rb") as f:
        problems, _ = verify(lambda off, n: os.pread(f.fileno(), n, off), model)
    assert not problems, "; ".join(map(str, problems[:5]))
    assert tally.writes_acked > rounds and tally.in_flight_at_kill > 0


def test_verifier_catches_damage(image, serve, tmp_path):
    """The check above can fail: a short run, then the image is damaged in
    each way the check is meant to catch, and each damaged sector is named."""
    model = Model(image.stat().st_size // SECTOR)
    rng = random.Random(5)
    tally = Tally()
    s = serve(image, "buffered")
    w = Writer(s.uri, model, rng, 1, tally)
    for _ in range(300):
        w.issue_write()
        while w.h.aio_in_flight() >= QUEUE_DEPTH:
            w.h.poll(-1)
    while w.h.aio_in_flight():
        w.h.poll(-1)
    w.h.shutdown()
    assert s.stop() == 0
    with open(image, "rb") as f:
        clean, _ = verify(lambda off, n: os.pread(f.fileno(), n, off), model)
    assert clean == []

    written = [i for i, g in enumerate(model.acked) if g]
    empty = next(i for i, g in enumerate(model.acked) if not g)
    lost, stale, torn, misplaced, garbage = rng.sample(written, 5)
    with open(image, "r+b") as f:
        fd = f.fileno()
        os.pwrite(fd, ZERO_SECTOR, lost * SECTOR)
        os.pwrite(fd, sector_bytes(stale * SECTOR, model.acked[stale] - 1), stale * SECTOR)
        half = sector_bytes(torn * SECTOR, model.acked[torn])
        os.pwrite(fd, half[:256] + sector_bytes(torn * SECTOR, model.acked[torn] + 7)[256:],
                  torn * SECTOR)
        # The right generation, but the sector that belongs one further on.
        os.pwrite(fd, sector_bytes((misplaced + 1) * SECTOR, model.acked[misplaced]),
                  misplaced * SECTOR)
        os.pwrite(fd, b"\xa5" * SECTOR, garbage * SECTOR)
        os.pwrite(fd, sector_bytes(empty * SECTOR, 1), empty * SECTOR)
    with open(image, "rb") as f:
        problems, _ = verify(lambda off, n: os.pread(f.fileno(), n, off), model)
    by_sector = {p.offset // SECTOR: p.what for p in problems}
    print("\n" + "\n".join(map(str, problems)))
    assert set(by_sector) == {lost, stale, torn, misplaced, garbage, empty}
    assert by_sector[lost].startswith("zeroes")
    assert by_sector[stale].startswith(f"generation {model.acked[stale] - 1}")
    assert by_sector[torn].startswith("torn")
    assert by_sector[misplaced].startswith("misplaced")
    assert by_sector[garbage].startswith("foreign")
    assert by_sector[empty].startswith("generation 1, expected 0")
