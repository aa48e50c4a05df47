"""What ``nbdloop bench`` does once its options are parsed: make or check
the image, run the fio campaign and the durability measurement, and write
the reports.  The click command builds an :class:`Options` and calls
:func:`measure` or :func:`durability_only`."""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nbdloop import paths
from nbdloop.bench import durability, report
from nbdloop.bench import run as bench
from nbdloop.engine.placement import format_cpu_list
from nbdloop.sizes import format_size

QUICK = {"workloads": bench.QUICK_WORKLOADS, "rounds": 1, "runtime": 3.0,
         "peers": ["qemu-nbd", bench.NULL_PEER, "raw"], "footprint": 256 << 20}
FULL = {"workloads": bench.DEFAULT_WORKLOADS, "rounds": 2, "runtime": 5.0,
        "peers": list(bench.PEERS), "footprint": 512 << 20}

#: Called with one line of progress or of the report.
Say = Callable[[str], None]


class BenchError(Exception):
    """Bad usage or input: one line, exit status 2."""
    exit_status = 2


class BenchFailed(BenchError):
    """A measurement failed at run time: exit status 1."""
    exit_status = 1


@dataclass(frozen=True)
class Options:
    """The bench command's options, the presets (--quick or the full run)
    already applied."""

    image: str | None
    size: int
    modes: tuple[str, ...]
    peers: tuple[str, ...]
    workloads: tuple[str, ...]
    runtime: float
    rounds: int
    footprint: int
    out: Path
    quick: bool
    pin: str | None = None
    placements: tuple[str, ...] = ()
    processes: int = 1
    client_cpus: frozenset[int] | None = None
    durability_window: float = 60.0
    durability_writes: int = 256

    @classmethod
    def with_preset(cls, *, quick: bool, peers, workloads, runtime, rounds, footprint,
                    out, **given) -> Options:
        """Options with what was not given taken from the preset."""
        preset = QUICK if quick else FULL
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return cls(quick=quick,
                   peers=tuple(peers if peers is not None else preset["peers"]),
                   workloads=tuple(workloads or preset["workloads"]),
                   runtime=runtime if runtime is not None else preset["runtime"],
                   rounds=rounds if rounds is not None else preset["rounds"],
                   footprint=footprint if footprint is not None else preset["footprint"],
                   out=Path(out) if out else Path("bench-results") / stamp, **given)


def default_image(size: int) -> Path:
    return paths.cache_dir() / f"bench-{format_size(size)}.img"


def _meta(fio: bool) -> dict:
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["nbdloop", "bench"] + sys.argv[2:]),
            "host": platform.node(), "kernel": platform.release(),
            "cpus": os.cpu_count()}
    if fio:
        meta["fio"] = subprocess.run(["fio", "--version"], capture_output=True,
                                     text=True, check=False).stdout.strip()
    return meta


def _durability(modes, writes: int, window: float, say: Say) -> durability.Durability:
    """The durability measurement, its progress a line each; DurabilityError
    if it cannot run or its figures are void."""
    return durability.measure(list(modes), writes, window, progress=say)


def _written(written, out: Path, say: Say, echo: Say) -> None:
    echo((out / "results.md").read_text())
    say("wrote " + ", ".join(str(p) for p in written))


def durability_only(opts: Options, say: Say, echo: Say) -> None:
    """bench --durability: only the durability measurement."""
    if not opts.modes:
        raise BenchError("nothing to measure: give --modes")
    try:
        result = _durability(opts.modes, opts.durability_writes, opts.durability_window, say)
    except durability.DurabilityError as e:
        raise BenchFailed(str(e)) from None
    written = report.write_reports(None, [], {}, opts.out, _meta(fio=False), durability=result)
    _written(written, opts.out, say, echo)


def measure(opts: Options, say: Say, echo: Say, progress) -> None:
    """The fio campaign, the footprints and (not with --quick) the
    durability measurement; ``progress(total)`` is a context manager that
    gives the function each run is reported to, ``(done, what)``."""
    if shutil.which("fio") is None:
        raise BenchFailed("fio is not installed (apt-get install fio)")
    if not opts.modes and not opts.peers:
        raise BenchError("nothing to measure: give --modes or --peers")
    image, size = opts.image, opts.size
    if image:
        if not os.path.isfile(image):
            raise BenchError(f"{image}: no such file (or use --size to make one)")
        size = os.path.getsize(image)
    else:
        image = str(default_image(size))
        Path(image).parent.mkdir(parents=True, exist_ok=True)
        say(f"preparing {image} ({format_size(size)}, fully written)")
        bench.prepare_image(image, size)
    fp_bytes = min(opts.footprint, size)

    with tempfile.TemporaryDirectory(prefix="nbdloop-bench-") as wd:
        subjects, skipped = bench.make_subjects(image, wd, list(opts.modes), list(opts.peers),
                                                pin=opts.pin, placements=opts.placements,
                                                processes=opts.processes)
        for name, why in skipped.items():
            say(f"skipping {name}: {why}")
        campaign = bench.Campaign(
            image=image, subjects=subjects, rounds=opts.rounds, runtime=opts.runtime,
            size=size, workloads=[bench.WORKLOADS[w] for w in opts.workloads],
            client_cpus=format_cpu_list(opts.client_cpus) if opts.client_cpus else None)
        say(f"{len(subjects)} subjects x {len(campaign.workloads)} workloads x {opts.rounds} "
            f"round(s) of {opts.runtime:g} s")
        with progress(opts.rounds * len(subjects) * len(campaign.workloads)) as step:
            bench.run(campaign, step)
        footprints = []
        if fp_bytes:
            for s in subjects:
                if s.kind == "nbdloop" or s.name == "raw":
                    say(f"page-cache footprint: write+read {format_size(fp_bytes)} on {s.name}")
                    try:
                        footprints.append(bench.footprint(s, image, fp_bytes, size))
                    except Exception as e:  # noqa: BLE001 - reported, the rest goes on
                        say(f"footprint on {s.name} failed: {e}")
    dur = None
    if not opts.quick and opts.modes:
        try:
            durability.require_prerequisites()
        except durability.DurabilityError as e:
            skipped["durability"] = str(e)
            say(f"skipping durability: {e}")
        else:
            try:
                dur = _durability(opts.modes, opts.durability_writes, opts.durability_window,
                                  say)
            except durability.DurabilityError as e:
                dur = durability.Durability(list(opts.modes), opts.durability_writes,
                                            opts.durability_window, error=str(e))
    written = report.write_reports(campaign, footprints, skipped, opts.out, _meta(fio=True),
                                   durability=dur)
    _written(written, opts.out, say, echo)
    failed = []
    runs_failed = sum(1 for r in campaign.results if r.error)
    if runs_failed:
        failed.append(f"{runs_failed} run(s)")
    if dur is not None and dur.error:
        failed.append("the durability measurement")
    if failed:
        raise BenchFailed(f"{' and '.join(failed)} failed; see {opts.out / 'results.md'}")
