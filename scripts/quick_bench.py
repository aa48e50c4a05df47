#!/usr/bin/env python3
"""Quick benchmark: nbdloop direct mode against qemu-nbd
(--cache=none --aio=io_uring), fio's nbd engine, interleaved rounds.

    .venv/bin/python scripts/quick_bench.py [--rounds 3] [--runtime 5] [--size 2G]

Prints, per workload, the median ratio nbdloop/qemu-nbd over rounds (and its
min-max).  A benchmark, not a test: nothing here passes or fails on speed.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import click  # noqa: E402
from nbdloop.bench import run as bench  # noqa: E402
from nbdloop.cli.common import parse_cpus  # noqa: E402
from nbdloop.sizes import parse_size  # noqa: E402


def cpu_list(value: str) -> str:
    """argparse type: a CPU list this process may use, checked like the CLI's."""
    try:
        parse_cpus(None, None, value)
    except click.BadParameter as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return value


def size_arg(value: str) -> str:
    try:
        parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def workload_list(value: str) -> list[str]:
    names = value.split(",")
    unknown = [n for n in names if n not in bench.WORKLOADS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown workload {unknown[0]!r}; known: {', '.join(bench.WORKLOADS)}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--size", type=size_arg, default="2G")
    ap.add_argument("--image", default=None, help="reuse this image (default: made under /var/tmp)")
    ap.add_argument("--threads", type=int, default=None, help="nbdloop --threads")
    ap.add_argument("--workloads", type=workload_list, default=list(bench.QUICK_WORKLOADS))
    ap.add_argument("--pin", type=cpu_list, default=None, metavar="CPUS",
                    help="also measure nbdloop direct pinned to these CPUs (serve --cpus)")
    ap.add_argument("--client-cpus", type=cpu_list, default=None, metavar="CPUS",
                    help="run fio on these CPUs for every subject (fio --cpus_allowed)")
    args = ap.parse_args()
    size = parse_size(args.size)
    image = args.image or f"/var/tmp/nbdloop-bench-{args.size}.img"
    bench.prepare_image(image, size)
    with tempfile.TemporaryDirectory() as wd:
        kw = {"threads": args.threads} if args.threads else {}
        plan = bench.Plan(image=image, rounds=args.rounds, runtime=args.runtime, size=size,
                          workloads=[bench.WORKLOADS[w] for w in args.workloads],
                          subjects=[bench.nbdloop_subject(image, wd, "direct", **kw),
                                    bench.qemu_nbd_subject(image, wd)],
                          client_cpus=args.client_cpus)
        if args.pin:
            plan.subjects.insert(1, bench.nbdloop_subject(image, wd, "direct", cpus=args.pin,
                                                          **kw))
        bench.run(plan)
    for ours in [s.name for s in plan.subjects if s.name.startswith("nbdloop")]:
        print(f"\n{ours} / qemu-nbd, median of {args.rounds} interleaved rounds "
              f"({args.runtime:g}s each):")
        print(f"{'workload':<20} {'nbdloop':>10} {'qemu-nbd':>10} {'ratio':>7}  min-max")
        rat = bench.ratios(plan, ours, "qemu-nbd")
        for w in plan.workloads:
            a = bench.medians(plan, ours, w)
            b = bench.medians(plan, "qemu-nbd", w)
            unit = "MiB/s" if w.bs.upper().endswith("M") else "IOPS"
            r = rat[w.name]
            if a is None or b is None or r is None:
                print(f"{w.label:<20} failed: see errors above")
                continue
            print(f"{w.label:<20} {a['metric']:>10.0f} {b['metric']:>10.0f} {r[0]:>7.2f}  "
                  f"{r[1]:.2f}-{r[2]:.2f}  ({unit})")
    errors = [r for r in plan.results if r.error]
    for r in errors:
        print(f"error: {r.subject} {r.workload} round {r.round}: {r.error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
