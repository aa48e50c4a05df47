#!/usr/bin/env python3
"""Record what the adaptive placement rule would be fed, on this machine:
``nbdloop serve --placement irq`` (the pool held on its home CPU) under fio's
4K random reads at QD32, with fio held on a CPU or left free, sampled every
0.15 s from outside the server (nbdloop.engine.placement.Watch on its pid).
The samples go to tests/data/contention/NAME.json, which
tests/test_contention.py feeds to the rule.

Usage: record-contention.py NAME [--client-cpus LIST] [--seconds N]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
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
            fio = threading.Thread(target=bench.run_fio, args=(
                w, bench.Target(uri=server.uri), args.seconds, size, args.client_cpus))
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
                                    "busy": s.busy})
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(),
            "home": sorted(where.busy), "allowed": sorted(where.idle),
            "irq": sorted(where.irq), "client_cpus": args.client_cpus,
            "workload": w.name}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.name}.json"
    path.write_text(json.dumps({"meta": meta, "samples": samples}, indent=1) + "\n")
    print(f"{path}: {len(samples)} samples")


if __name__ == "__main__":
    main()
