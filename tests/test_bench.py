"""A smoke run of `nbdloop bench --quick`: it runs every subject it can and
writes its files.  No timing thresholds: speed is the benchmark's business."""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import require_tools, run_cli

MiB = 1 << 20


@pytest.mark.slow
def test_bench_quick_writes_results(tmp_path):
    require_tools("fio", "qemu-nbd", "nbdkit")
    out = tmp_path / "out"
    p = run_cli("bench", "--quick", "--size", "256M",
                "--runtime", "1", "--workloads", "randread-4k-qd32,write-1m-qd8",
                "--footprint", "64M", "--client-cpus", "0", "--out", str(out),
                env={"NBDLOOP_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[1/" in p.stderr and " on nbdloop-" in p.stderr   # a line a run, in a log
    data = json.loads((out / "results.json").read_text())
    subjects = set(data["subjects"])
    assert {"nbdloop-direct", "nbdloop-buffered", "qemu-nbd", "raw"} <= subjects
    assert data["client_cpus"] == "0" and data["warmup"] > 0
    runs = data["runs"]
    assert len(runs) == len(subjects) * 2
    assert all(not r["error"] for r in runs), [r["error"] for r in runs if r["error"]]
    assert all(r["iops"] > 0 and r["mib_s"] > 0 for r in runs)
    assert all(r["server_cpu_s"] is not None for r in runs if r["subject"] != "raw")
    # The whole machine's busy time includes the server's and cannot exceed
    # every CPU busy for the whole run.  Loose bounds: /proc/stat is sampled
    # at clock ticks, a process's time is not; a wrong unit would be 100x off.
    assert all(r["machine_cpu_s"] > 0 and r["machine_cpu_s_per_gib"] > 0 for r in runs)
    assert all(r["machine_cpu_s"] >= 0.5 * r["server_cpu_s"]
               for r in runs if r["server_cpu_s"] is not None)
    assert all(r["machine_cpu_s"] <= os.cpu_count() * (data["runtime"] + 10) for r in runs)
    # The page-cache footprint separates the modes: direct leaves the cache
    # alone, buffered keeps what it wrote and read.
    fp = {f["subject"]: f["percent"] for f in data["footprint"]}
    assert fp["nbdloop-direct"] < 1.0
    assert fp["nbdloop-buffered"] > 50.0
    assert "nbdloop-direct" not in data["ratios"] and "qemu-nbd" in data["ratios"]
    md = (out / "results.md").read_text()
    assert "| 4k randread QD32" in md and "nbdloop-direct / peer" in md
    assert "| machine CPU s/GiB |" in md
    # Steal is a share of the machine's time, and every run has a reading.
    assert all(r["steal"] is not None and 0 <= r["steal"] < 1 for r in runs)
    assert "Steal, the share of the machine's CPU time" in md
    for png in ("throughput.png", "footprint.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


NUMBER_RANGE = r"\d+\.\d\d \(\d+\.\d\d-\d+\.\d\d\)"


@pytest.mark.slow
def test_bench_reports_cpu_per_gib_beside_the_null_floor(tmp_path):
    """nbdloop direct and nbdkit's null plugin on 1M reads, one short round:
    results.md has a row a subject of MiB/s and server CPU s/GiB, each a
    median and its range, and the null peer, a floor, has no ratio."""
    require_tools("fio", "nbdkit")
    out = tmp_path / "out"
    p = run_cli("bench", "--quick", "--size", "64M", "--modes", "direct",
                "--peers", "nbdkit-null", "--workloads", "read-1m-qd8", "--rounds", "1",
                "--runtime", "0.5", "--footprint", "0", "--out", str(out),
                env={"NBDLOOP_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["subjects"] == ["nbdloop-direct", "nbdkit-null"]
    null = [r for r in data["runs"] if r["subject"] == "nbdkit-null"]
    assert len(null) == 1 and not null[0]["error"], null
    assert null[0]["mib_s"] > 0 and null[0]["server_cpu_s"] > 0
    assert null[0]["cpu_s_per_gib"] == pytest.approx(null[0]["server_cpu_s"] / null[0]["gib"])
    summary = data["summary"]["read-1m-qd8"]["nbdkit-null"]
    assert summary["cpu_s_per_gib_range"] == [null[0]["cpu_s_per_gib"]] * 2
    assert "nbdkit-null" not in data["ratios"]
    md = (out / "results.md").read_text()
    assert "| subject | 1M read QD8 MiB/s | server CPU s/GiB |" in md
    for subject in ("nbdloop-direct", "nbdkit-null"):
        assert re.search(rf"^\| {subject} \| \d+ \(\d+-\d+\) \| {NUMBER_RANGE} \|$", md,
                         re.MULTILINE), md
    assert "Ratios," not in md    # the only peer is the floor


def test_cpu_per_gib_table_has_medians_and_ranges_over_rounds(tmp_path):
    """The 1M table from results alone: medians and min-max over rounds,
    failed runs left out, "-" where a subject has no server process."""
    from nbdloop.bench import report
    from nbdloop.bench import run as bench

    def result(subject, workload, rnd, mib_s, cpu, error=""):
        gib = mib_s / 1024
        return bench.RunResult(subject, workload, rnd, mib_s, mib_s, 1, 2,
                               None if cpu is None else cpu * gib, cpu, gib, 0, error=error)

    def subject(name):
        return bench.Subject(name, "peer", lambda: None)

    campaign = bench.Campaign(
        image="x.img", rounds=3, runtime=1, size=MiB,
        subjects=[subject("nbdkit-null"), subject("raw")],
        workloads=[bench.WORKLOADS[w] for w in ("randread-4k-qd1", "read-1m-qd8",
                                                 "write-1m-qd8")])
    campaign.results = [
        result("nbdkit-null", "read-1m-qd8", 0, 3000, 0.20),
        result("nbdkit-null", "read-1m-qd8", 1, 2000, 0.40),
        result("nbdkit-null", "read-1m-qd8", 2, 2500, 0.25),
        result("nbdkit-null", "write-1m-qd8", 0, 1000, 0.50),
        result("nbdkit-null", "write-1m-qd8", 1, 0, None, error="fio failed"),
        result("nbdkit-null", "write-1m-qd8", 2, 1200, 0.30),
        result("raw", "read-1m-qd8", 0, 900, None),
    ]
    lines = report._cpu_per_gib(campaign, ["nbdkit-null", "raw"])
    assert lines[3:] == [
        "| subject | 1M read QD8 MiB/s | server CPU s/GiB "
        "| 1M write QD8 MiB/s | server CPU s/GiB |",
        "|---|---|---|---|---|",
        "| nbdkit-null | 2500 (2000-3000) | 0.25 (0.20-0.40) | 1100 (1000-1200) "
        "| 0.40 (0.30-0.50) |",
        "| raw | 900 (900-900) | - | - | - |"]
    campaign.workloads = [bench.WORKLOADS["randread-4k-qd1"]]
    assert report._cpu_per_gib(campaign, ["nbdkit-null", "raw"]) == []


def test_rounds_alternate_the_subject_order(tmp_path):
    """A B C, then C B A: no subject always runs right after another's
    workload.  The subjects here fail at once, which the campaign records."""
    from nbdloop.bench import run as bench

    def failing(name):
        def start():
            raise RuntimeError(f"{name} not started")
        return bench.Subject(name, "peer", start)

    campaign = bench.Campaign(image=str(tmp_path / "none.img"), rounds=3, runtime=1, size=MiB,
                      subjects=[failing(n) for n in "ABC"],
                      workloads=[bench.WORKLOADS["randread-4k-qd1"]])
    (tmp_path / "none.img").write_bytes(b"\0" * MiB)
    seen = []
    bench.run(campaign, progress=lambda done, what: seen.append((done, what)))
    assert "".join(r.subject for r in campaign.results) == "ABCCBAABC"
    assert [done for done, _ in seen] == list(range(9))
    assert seen[3][1].startswith("round 2/3 ") and seen[3][1].endswith(" on C")
    assert all(r.error.endswith("not started") for r in campaign.results)


@pytest.mark.parametrize("cpus", ["999", "x", ""])
def test_bench_rejects_cpus_it_does_not_have(tmp_path, cpus):
    p = run_cli("bench", "--client-cpus", cpus, "--image", str(tmp_path / "missing.img"),
                "--out", str(tmp_path / "out"), timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--client-cpus" in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_fio_jobs_spread_over_the_processes(image, serve, tmp_path):
    """multiconn against serve --processes 2: fio's job k connects to
    process k's socket, so both processes serve requests."""
    require_tools("fio")
    import psutil

    from nbdloop.bench import run as bench
    s = serve(image, "direct", processes=2)
    target = bench.Target(uri=s.uri, server_pids=tuple(s.server_pids), uris=tuple(s.uris))
    argv = bench.fio_argv(bench.WORKLOADS["multiconn-4k-4x8"], target, 1, "out.json",
                          image.stat().st_size)
    assert [a for a in argv if a.startswith("--uri=")] == [f"--uri={u}" for u in s.uris] * 2
    before = [psutil.Process(p).cpu_times() for p in s.server_pids]
    job = bench.run_fio(bench.WORKLOADS["multiconn-4k-4x8"], target, 1,
                        image.stat().st_size)["jobs"]
    assert len(job) == 1 and job[0]["read"]["total_ios"] > 0, "one group, reads done"
    after = [psutil.Process(p).cpu_times() for p in s.server_pids]
    for b, a in zip(before, after):
        assert a.user + a.system > b.user + b.system, "each process served requests"
