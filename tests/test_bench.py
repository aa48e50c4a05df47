"""A smoke run of `nbdloop bench --quick`: it runs every subject it can and
writes its files.  No timing thresholds: speed is the benchmark's business."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, require_tools

MiB = 1 << 20


@pytest.mark.slow
def test_bench_quick_writes_results(tmp_path):
    require_tools("fio", "qemu-nbd", "nbdkit")
    out = tmp_path / "out"
    env = dict(os.environ, NBDLOOP_CACHE=str(tmp_path / "cache"))
    p = subprocess.run(
        [sys.executable, "-m", "nbdloop.cli", "bench", "--quick", "--size", "256M",
         "--runtime", "1", "--workloads", "randread-4k-qd32,write-1m-qd8",
         "--footprint", "64M", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    # Progress with an ETA went to stderr while it ran.
    assert "ETA" in p.stderr and "[1/" in p.stderr
    data = json.loads((out / "results.json").read_text())
    subjects = set(data["subjects"])
    assert {"nbdloop-direct", "nbdloop-buffered", "qemu-nbd", "raw"} <= subjects
    runs = data["runs"]
    assert len(runs) == len(subjects) * 2
    assert all(not r["error"] for r in runs), [r["error"] for r in runs if r["error"]]
    assert all(r["iops"] > 0 and r["mib_s"] > 0 for r in runs)
    assert all(r["server_cpu_s"] is not None for r in runs if r["subject"] != "raw")
    # The page-cache footprint separates the modes: direct leaves the cache
    # alone, buffered keeps what it wrote and read.
    fp = {f["subject"]: f["percent"] for f in data["footprint"]}
    assert fp["nbdloop-direct"] < 1.0
    assert fp["nbdloop-buffered"] > 50.0
    assert "nbdloop-direct" not in data["ratios"] and "qemu-nbd" in data["ratios"]
    md = (out / "results.md").read_text()
    assert "| 4k randread QD32" in md and "nbdloop-direct / peer" in md
    for png in ("throughput.png", "footprint.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
