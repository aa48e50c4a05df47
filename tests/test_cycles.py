"""Many connect/disconnect cycles leave nothing behind in the server: every
connection's worker threads (each with a ring and a pinned Python thread
state) must be gone, with their descriptors, once the client leaves."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

MiB = 1 << 20


def snapshot(pid: int) -> tuple[int, int, int]:
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return threads, fds, rss


def settle(pid: int, want_threads: int, timeout: float = 20) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(pid)
        if snap[0] <= want_threads or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def cycle(uri: str, i: int) -> None:
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    data = bytes([i % 256]) * 4096
    h.pwrite(data, (i % 64) * 4096)          # a ring and a pinned thread state
    assert h.pread(4096, (i % 64) * 4096) == data
    h.shutdown()
    del h


@pytest.mark.slow
def test_300_connect_disconnect_cycles_leak_nothing(image, serve, mode, tmp_path):
    stats_file = tmp_path / "stats.json"
    s = serve(image, mode, extra=["--stats-file", str(stats_file)])
    pid = s.server_pid
    assert pid != s.pid, "the nbdkit process under the supervisor"
    for i in range(10):                       # warm up: imports, first allocations
        cycle(s.uri, i)
    threads0, fds0, rss0 = settle(pid, 0, timeout=2)
    for i in range(300):
        cycle(s.uri, i)
    threads1, fds1, rss1 = settle(pid, threads0)
    print(f"\n{mode}: threads {threads0}->{threads1}, fds {fds0}->{fds1}, "
          f"RSS {rss0 / MiB:.1f}->{rss1 / MiB:.1f} MiB")
    stats = json.loads(stats_file.read_text())
    print(stats)
    assert stats["pinned"] >= 310, "every connection's worker pinned its thread state"
    assert stats["unpinned"] == stats["pinned"], "and released it when it exited"
    assert stats["rings"] >= 310 and stats["rings_freed"] == stats["rings"]
    assert threads1 == threads0
    assert fds1 == fds0
    # One leaked thread state or ring per worker would be 16 per cycle:
    # 4800 rings of bounce buffers would show as hundreds of MiB.
    assert rss1 - rss0 < 16 * MiB
