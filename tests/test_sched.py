"""Worker scheduling: each nbdkit worker switches itself to SCHED_BATCH on
its first request."""
from __future__ import annotations

import os

import nbd

from conftest import preads_in_flight, read_stats


def policies(pid: int) -> dict[int, int]:
    return {int(t): os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def load(uri: str) -> nbd.NBD:
    """Requests with 16 in flight, so that several workers take part."""
    h = nbd.NBD()
    h.connect_uri(uri)
    preads_in_flight(h, 4096, depth=16, rounds=20)
    return h


def test_workers_switch_to_sched_batch(image, serve, tmp_path):
    stats = tmp_path / "stats.json"
    s = serve(image, "direct", extra=["--stats-file", str(stats)])
    assert policies(s.server_pid)[s.server_pid] == os.SCHED_OTHER
    h = load(s.uri)
    pol = policies(s.server_pid)
    batched = [t for t, p in pol.items() if p == os.SCHED_BATCH]
    assert len(batched) >= 2, pol
    assert s.server_pid not in batched          # nbdkit's main thread never calls in
    assert set(pol.values()) <= {os.SCHED_OTHER, os.SCHED_BATCH}
    # The switch keeps the nice value: SCHED_BATCH needs no privilege.
    assert all(os.getpriority(os.PRIO_PROCESS, t) == os.getpriority(os.PRIO_PROCESS,
                                                                     s.server_pid)
               for t in batched)
    h.shutdown()
    assert read_stats(stats)["batched"] >= len(batched)
