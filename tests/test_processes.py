"""``serve --processes``: several nbdkit processes serve one image, each
pinned to one CPU and accepting on a socket of its own (process 0 also on
the usual one).

What must hold: every process sees every other's writes (one file, no cache
of ours); a write that would need a read-modify-write, which another
process's range lock could not see, is refused before anything is written;
one crashed process is restarted on its sockets while the others keep their
connections; a stop with idle connections ends cleanly."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time

import pytest

from conftest import connect, nbdinfo_json, require_tools, run, run_cli

from nbdloop.engine.placement import irq_cpus
from nbdloop.serve.supervise import connections

MiB = 1 << 20


def test_each_process_has_a_cpu_and_a_socket_and_sees_the_others(image, serve):
    s = serve(image, "direct", processes=2)
    pids = s.server_pids
    assert len(pids) == 2
    cpus = [os.sched_getaffinity(p) for p in pids]
    assert sorted(cpus, key=min) == [{0}, {1}]
    irq = irq_cpus(str(image)) & {0, 1}
    if len(irq) == 1:
        assert cpus[0] != irq, "process 0 (a lone client's) is on the interrupts' CPU"
    hs = [connect(uri, strict=True) for uri in s.uris]
    for k, pid in enumerate(pids):
        assert connections(pid) == 1, f"process {k} holds the connection to its socket"
    rng = random.Random(3)
    blocks = {}
    for i in range(64):
        off = rng.randrange(0, 64 * MiB // 4096) * 4096
        blocks[off] = rng.randbytes(4096)
        hs[i % 2].pwrite(blocks[off], off)
    hs[0].flush()
    for off, data in blocks.items():
        assert hs[1].pread(4096, off) == data and hs[0].pread(4096, off) == data
    with open(image, "rb") as f:
        for off, data in blocks.items():
            assert os.pread(f.fileno(), 4096, off) == data
    # The usual socket is process 0's too.
    h = connect(s.uri, strict=True)
    off = next(iter(blocks))
    assert h.pread(4096, off) == blocks[off]
    assert [connections(p) for p in pids] == [2, 1]


def test_the_minimum_block_size_is_the_alignment(fourk_fs, serve):
    require_tools("nbdinfo")
    img = fourk_fs / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 32 * MiB)
    s = serve(img, "direct", processes=2)
    for uri in s.uris + [s.uri]:
        info = nbdinfo_json(uri)["exports"][0]
        assert info["block_size_minimum"] == 4096, uri


def test_unaligned_writes_are_refused_and_change_nothing(fourk_fs, serve):
    import nbd
    img = fourk_fs / "disk.img"
    content = random.Random(7).randbytes(8 * MiB)
    img.write_bytes(content)
    s = serve(img, "direct", processes=2)
    h = connect(s.uris[1])
    for what, call in (("pwrite", lambda: h.pwrite(b"x" * 512, 4096 + 512)),
                       ("pwrite across blocks", lambda: h.pwrite(b"x" * 8192, 1024)),
                       ("zero", lambda: h.zero(1024, 3 * 4096 + 512)),
                       ("zero with a whole block inside", lambda: h.zero(3 * 4096, 100))):
        with pytest.raises(nbd.Error) as e:
            call()
        assert e.value.errno == "EINVAL", what
    h.flush()
    assert hashlib.sha256(img.read_bytes()).digest() == hashlib.sha256(content).digest()
    # Aligned ones are served; trim leaves partial blocks alone, as always.
    h.pwrite(b"y" * 4096, 4096)
    h.trim(4096 + 512, 8192 - 512)
    assert h.pread(4096, 4096) == b"y" * 4096
    assert "no read-modify-write" in s.log_tail(40)


def test_attach_refuses_a_block_size_below_the_alignment(fourk_fs):
    """The kernel would send 512-byte writes that every process refuses:
    attach says so before it starts anything.  A bad --device, checked
    next, stops the combinations that pass, whether or not this kernel
    has an NBD driver."""
    img = fourk_fs / "disk.img"
    content = random.Random(8).randbytes(MiB)
    img.write_bytes(content)
    for args, refused in ((["--processes", "2", "--block-size", "512"], True),
                          (["--processes", "2", "--block-size", "512", "--mode", "buffered"],
                           False),
                          (["--processes", "2", "--block-size", "512", "--readonly"], False),
                          (["--block-size", "512"], False)):
        p = run_cli("attach", str(img), *args, "--device", "/dev/not-nbd", timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (args, p.stderr)
        if refused:
            assert "--block-size 512 is below the image's direct-I/O alignment, 4096" \
                in lines[0], p.stderr
        else:
            assert "not an NBD device name" in lines[0], (args, p.stderr)
        assert "Traceback" not in p.stderr
    assert img.read_bytes() == content


def test_buffered_mode_still_serves_any_byte_range(image, serve):
    s = serve(image, "buffered", processes=2)
    h = connect(s.uris[1])
    h.pwrite(b"abc", 1001)
    assert connect(s.uris[0]).pread(5, 1000) == b"\0abc\0"


def test_a_crashed_process_is_restarted_on_its_socket(image, serve):
    s = serve(image, "direct", processes=2)
    a, b = (connect(uri, strict=True) for uri in s.uris)
    a.pwrite(b"a" * 4096, 0)
    victim = s.server_pids[1]
    os.kill(victim, signal.SIGSEGV)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = s.server_pids
        if len(pids) == 2 and victim not in pids and \
                all(f.exists() for f in _ready_files(s)):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"process 1 was not restarted: {s.log_tail()}")
    assert a.pread(4096, 0) == b"a" * 4096, "the other process kept its connection"
    import nbd
    with pytest.raises(nbd.Error):
        b.pread(4096, 0)
    assert connect(s.uris[1], strict=True).pread(4096, 0) == b"a" * 4096
    assert "crashed (SIGSEGV); restarting" in s.log_tail()


def _ready_files(s):
    from nbdloop.serve.cmdline import ready_files
    return ready_files(str(s.argv[4]), s.pid, s.processes)


def test_a_stop_with_idle_connections_is_clean(image, serve):
    s = serve(image, "direct", processes=2)
    held = [connect(uri, strict=True) for uri in s.uris] + [connect(s.uri, strict=True)]
    sockets = [s.socket_path] + s.sockets
    t = time.monotonic()
    assert s.stop() == 0, s.log_tail()
    assert time.monotonic() - t < 30
    assert not any(os.path.exists(p) for p in sockets), "the sockets are removed"
    assert not any(f.exists() for f in _ready_files(s))
    del held


def test_a_killed_process_ends_the_server_and_the_image_is_free(image, serve):
    """SIGKILL is not a crash (someone meant it): the supervisor stops the
    other process too and exits non-zero, and a new server can take the image."""
    s = serve(image, "direct", processes=2)
    os.kill(s.server_pids[0], signal.SIGKILL)
    assert s.proc.wait(30) != 0
    assert not any(os.path.exists(p) for p in s.sockets)
    s2 = serve(image, "direct", name="again")
    connect(s2.uri, strict=True).pread(4096, 0)


def test_nbdcopy_over_four_connections_copies_exactly(image, serve, tmp_path):
    require_tools("nbdcopy")
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(5).randbytes(64 * MiB))
    s = serve(image, "direct", processes=2)
    run(["nbdcopy", "--connections=4", "--requests=16", str(src), s.uri])
    out = tmp_path / "out.raw"
    run(["nbdcopy", "--connections=4", s.uris[1], str(out)])
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert image.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("args, phrase", [
    (["--processes", "2", "--port", "10809"], "unix socket"),
    (["--processes", "0"], "--processes"),
])
def test_bad_usage_is_one_line(image, tmp_path, args, phrase):
    before = hashlib.sha256(image.read_bytes()).digest()
    p = run_cli("serve", str(image), *args, timeout=60)
    assert p.returncode == 2, p.stderr
    assert phrase in p.stderr and "Traceback" not in p.stderr
    assert hashlib.sha256(image.read_bytes()).digest() == before


def test_every_socket_stays_served_and_a_stop_is_prompt(image, serve):
    """Connections to one socket never leave a process deaf to its other
    socket, or to SIGTERM: with one socket shared by all, nbdkit processes
    that lost the race for a connection waited in accept() (or, the socket
    non-blocking, retried it without pause and never stopped)."""
    s = serve(image, "direct", processes=2)
    for _ in range(6):
        connect(s.uri, strict=True).pread(4096, 0)
        for uri in s.uris:
            h = handle_within(uri, 10)
            h.pread(4096, 0)
    t = time.monotonic()
    assert s.stop() == 0, s.log_tail()
    assert time.monotonic() - t < 20, "nbdkit stopped on SIGTERM, not on the drain's end"


def handle_within(uri: str, seconds: float):
    """A connection, or AssertionError if the handshake is not answered in time."""
    import threading
    got = []
    t = threading.Thread(target=lambda: got.append(connect(uri, strict=True)), daemon=True)
    t.start()
    t.join(seconds)
    assert got, f"{uri} was not answered in {seconds} s"
    return got[0]


def test_each_process_writes_its_own_stats_file(image, serve, tmp_path):
    stats = tmp_path / "stats.json"
    s = serve(image, "direct", processes=2, extra=["--stats-file", str(stats)])
    for uri in s.uris:
        h = connect(uri, strict=True)
        h.pread(4096, 0)
        h.shutdown()
    assert s.stop() == 0
    for path in (stats, tmp_path / "stats.json.1"):
        assert json.loads(path.read_text())["requests"] > 0, path
