#!/usr/bin/env python3
"""Record what the adaptive placement rule would be fed, on this machine:
``nbdloop serve --placement irq`` (the pool held on its home CPU) under fio's
4K random reads at QD32, with fio held on a CPU or left free, sampled every
0.15 s from outside the server (nbdloop.engine.placement.Watch on its pid).
``--rate-iops`` caps fio's rate, for what a slower machine shows: a client
that waits on the disk and leaves its CPU idle.  The samples go to
tests/data/contention/NAME.json, which tests/test_contention.py feeds to the
rule.

Usage: record-contention.py NAME [--client-cpus LIST] [--seconds N] [--rate-iops N]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from nbdloop import paths
from nbdloop.bench import run as bench
from nbdloop.engine import placement
from nbdloop.serve import children

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "contention"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--client-cpus", default=None)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rate-iops", type=int, default=None)
    args = ap.parse_args()
    image = str(paths.cache_dir() / "bench-2G.img")
    size = 2 << 30
    bench.prepare_image(image, size)
    where = placement.choose(image)
    if where is None:
        raise SystemExit("no placement on this machine: nothing to record")
    w = bench.WORKLOADS["randread-4k-qd32"]
    with tempfile.TemporaryDirectory() as wd:
        server = children.nbdloop_server(image, wd, mode="direct",
                                         extra=["--placement", "irq"])
        with server:
            argv = bench.fio_argv(w, bench.Target(uri=server.uri), args.seconds,
                                  "/dev/null", size, args.client_cpus)
            if args.rate_iops:
                argv.append(f"--rate_iops={args.rate_iops}")
            fio = threading.Thread(target=subprocess.run, args=(argv,),
                                   kwargs={"check": True, "capture_output": True})
            pid = server.server_pid
            watch = placement.Watch(set(where.idle), read=lambda: placement.read_times(pid))
            watch.sample(time.monotonic())
            fio.start()
            samples = []
            while fio.is_alive():
                time.sleep(0.15)
                s = watch.sample(time.monotonic())
                if s is not None:
                    samples.append({"seconds": s.seconds, "run": s.run, "wait": s.wait,
                                    "busy": s.busy, "switches": s.switches,
                                    "preempted": s.preempted})
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(),
            "home": sorted(where.busy), "allowed": sorted(where.idle),
            "irq": sorted(where.irq), "client_cpus": args.client_cpus,
            "rate_iops": args.rate_iops, "workload": w.name}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.name}.json"
    path.write_text(json.dumps({"meta": meta, "samples": samples}, indent=1) + "\n")
    print(f"{path}: {len(samples)} samples")


if __name__ == "__main__":
    main()
