"""``nbdloop bench``: nbdloop's two modes against its peers, with fio; and
how long each mode leaves acknowledged writes off the disk."""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from nbdloop import paths
from nbdloop.bench import durability, report
from nbdloop.bench import run as bench
from nbdloop.cli.common import SIZE, Failure, UsageError, parse_cpus
from nbdloop.engine.placement import format_cpu_list
from nbdloop.sizes import format_size

QUICK = {"workloads": bench.QUICK_WORKLOADS, "rounds": 1, "runtime": 3.0,
         "peers": ["qemu-nbd", "raw"], "footprint": 256 << 20}
FULL = {"workloads": bench.DEFAULT_WORKLOADS, "rounds": 2, "runtime": 5.0,
        "peers": list(bench.PEERS), "footprint": 512 << 20}


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


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


def _durability(modes: list[str], writes: int, window: float) -> durability.Durability:
    """The durability measurement, its progress a line each on stderr;
    DurabilityError if it cannot run or its figures are void."""
    return durability.measure(modes, writes, window,
                              progress=lambda what: click.echo(what, err=True))


@click.command()
@click.option("--image", type=click.Path(dir_okay=False),
              help="Benchmark this image (it is overwritten by the write workloads).")
@click.option("--size", type=SIZE, default="2G", show_default=True,
              help="Size of the image made for the benchmark when --image is not given.")
@click.option("--modes", default="direct,buffered", show_default=True,
              help="nbdloop modes to measure.")
@click.option("--peers", default=None,
              help=f"Peers to compare against [default: all: {','.join(bench.PEERS)}; "
                   "--quick: qemu-nbd,raw].")
@click.option("--workloads", default=None,
              help=f"Workloads [default: all: {','.join(bench.WORKLOADS)}].")
@click.option("--runtime", type=click.FloatRange(0.5, 600), default=None,
              help="Seconds per run [default 5; --quick 3].")
@click.option("--rounds", type=click.IntRange(1, 50), default=None,
              help="Interleaved rounds [default 2; --quick 1].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write results.json, results.md and the charts "
                   "[default: bench-results/DATE].")
@click.option("--quick", is_flag=True, help="A short run: under 3 minutes.")
@click.option("--pin", metavar="CPUS", default=None,
              help="Also measure nbdloop direct mode pinned to these CPUs "
                   "(nbdloop serve --cpus).")
@click.option("--placements", default=None, metavar="LIST",
              help="Also measure nbdloop direct mode with each of these --placement "
                   "rules (irq, off), beside the default (auto).")
@click.option("--processes", type=click.IntRange(1, 64), default=1,
              help="Also measure nbdloop direct mode served by this many processes "
                   "(serve --processes); fio's jobs connect to their sockets in turn.")
@click.option("--client-cpus", metavar="CPUS", default=None, callback=parse_cpus,
              help="Run fio on these CPUs (e.g. 1 or 0-3) for every subject, so that "
                   "where the scheduler puts the client does not decide the result.")
@click.option("--footprint", "footprint_size", type=SIZE, default=None,
              help="Bytes to write then read for the page-cache footprint "
                   "[default 512M; --quick 256M; 0 to skip].")
@click.option("--durability", "durability_only", is_flag=True,
              help="Measure only durability: for each of --modes, how many bytes of "
                   "acknowledged writes are not yet on the block device under the image, "
                   "at acknowledgement and until the last lands, around a FLUSH and with "
                   "FUA, beside a control of plain pwrites.  It makes its own loop device, "
                   "ext4 and image (root only) and removes them.  The full run does this "
                   "after fio; --quick does not.")
@click.option("--durability-window", type=click.FloatRange(0, 3600), default=60.0,
              show_default=True, metavar="SECONDS",
              help="How long to watch acknowledged writes for their arrival on the "
                   "device; what has not arrived by then is reported as such.  Long "
                   "enough for the kernel's flusher (vm.dirty_expire_centisecs) by default.")
@click.option("--durability-writes", type=click.IntRange(1, 4096), default=256,
              show_default=True, metavar="N",
              help="Writes in each phase of the durability measurement (mostly 4K, some "
                   "64K and 1M).")
def bench_command(image, size, modes, peers, workloads, runtime, rounds, out_dir, quick,
                  pin, placements, processes, client_cpus, footprint_size, durability_only,
                  durability_window, durability_writes):
    """Measure nbdloop against qemu-nbd, nbdkit's file plugin, the kernel loop
    device (--direct-io=on) and the raw file, in interleaved rounds; then
    (not with --quick) how long each mode leaves acknowledged writes off
    the disk."""
    preset = QUICK if quick else FULL
    modes_l = _csv(modes) or []
    for m in modes_l:
        if m not in ("direct", "buffered"):
            raise click.BadParameter(f"{m!r} is not a mode (direct, buffered)",
                                     param_hint="--modes")
    placements_l = _csv(placements) or []
    for p in placements_l:
        if p not in ("irq", "off"):
            raise click.BadParameter(f"{p!r} is not a placement to compare (irq, off)",
                                     param_hint="--placements")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else Path("bench-results") / stamp
    if durability_only:
        if not modes_l:
            raise UsageError("nothing to measure: give --modes")
        try:
            result = _durability(modes_l, durability_writes, durability_window)
        except durability.DurabilityError as e:
            raise Failure(str(e)) from None
        written = report.write_reports(None, [], {}, out, _meta(fio=False), durability=result)
        click.echo((out / "results.md").read_text())
        click.echo("wrote " + ", ".join(str(p) for p in written), err=True)
        return
    peers_l = _csv(peers) if peers is not None else list(preset["peers"])
    for p in peers_l:
        if p not in bench.PEERS:
            raise click.BadParameter(f"{p!r} is not a peer ({', '.join(bench.PEERS)})",
                                     param_hint="--peers")
    wl_names = _csv(workloads) or list(preset["workloads"])
    for w in wl_names:
        if w not in bench.WORKLOADS:
            raise click.BadParameter(f"{w!r} is not a workload ({', '.join(bench.WORKLOADS)})",
                                     param_hint="--workloads")
    runtime = runtime if runtime is not None else preset["runtime"]
    rounds = rounds if rounds is not None else preset["rounds"]
    fp_bytes = footprint_size if footprint_size is not None else preset["footprint"]
    if shutil.which("fio") is None:
        raise Failure("fio is not installed (apt-get install fio)")
    if not modes_l and not peers_l:
        raise UsageError("nothing to measure: give --modes or --peers")

    if image:
        if not os.path.isfile(image):
            raise UsageError(f"{image}: no such file (or use --size to make one)")
        size = os.path.getsize(image)
    else:
        image = str(default_image(size))
        Path(image).parent.mkdir(parents=True, exist_ok=True)
        click.echo(f"preparing {image} ({format_size(size)}, fully written)", err=True)
        bench.prepare_image(image, size)
    fp_bytes = min(fp_bytes, size)

    with tempfile.TemporaryDirectory(prefix="nbdloop-bench-") as wd:
        subjects, skipped = bench.make_subjects(image, wd, modes_l, peers_l, pin=pin,
                                                placements=tuple(placements_l),
                                                processes=processes)
        for name, why in skipped.items():
            click.echo(f"skipping {name}: {why}", err=True)
        campaign = bench.Campaign(image=image, subjects=subjects, rounds=rounds, runtime=runtime,
                          size=size, workloads=[bench.WORKLOADS[w] for w in wl_names],
                          client_cpus=format_cpu_list(client_cpus) if client_cpus else None)
        click.echo(f"{len(subjects)} subjects x {len(campaign.workloads)} workloads x {rounds} "
                   f"round(s) of {runtime:g} s", err=True)
        total = rounds * len(subjects) * len(campaign.workloads)
        if sys.stderr.isatty():
            with click.progressbar(length=total, label="bench", file=sys.stderr,
                                   show_pos=True, item_show_func=lambda what: what) as bar:
                bench.run(campaign, lambda done, what: bar.update(done - bar.pos, what))
                bar.update(total - bar.pos)
        else:   # a log: a line a run (click's bar would print only its label)
            bench.run(campaign, lambda done, what: click.echo(f"[{done + 1}/{total}] {what}",
                                                              err=True))
        footprints = []
        if fp_bytes:
            for s in subjects:
                if s.kind == "nbdloop" or s.name == "raw":
                    click.echo(f"page-cache footprint: write+read {format_size(fp_bytes)} "
                               f"on {s.name}", err=True)
                    try:
                        footprints.append(bench.footprint(s, image, fp_bytes, size))
                    except Exception as e:  # noqa: BLE001 - reported, the rest goes on
                        click.echo(f"footprint on {s.name} failed: {e}", err=True)
    dur = None
    if not quick and modes_l:
        try:
            durability.require_prerequisites()
        except durability.DurabilityError as e:
            skipped["durability"] = str(e)
            click.echo(f"skipping durability: {e}", err=True)
        else:
            try:
                dur = _durability(modes_l, durability_writes, durability_window)
            except durability.DurabilityError as e:
                dur = durability.Durability(modes_l, durability_writes, durability_window,
                                            error=str(e))
    written = report.write_reports(campaign, footprints, skipped, out, _meta(fio=True),
                                   durability=dur)
    click.echo((out / "results.md").read_text())
    click.echo("wrote " + ", ".join(str(p) for p in written), err=True)
    failed = []
    runs_failed = sum(1 for r in campaign.results if r.error)
    if runs_failed:
        failed.append(f"{runs_failed} run(s)")
    if dur is not None and dur.error:
        failed.append("the durability measurement")
    if failed:
        raise click.ClickException(f"{' and '.join(failed)} failed; see {out / 'results.md'}")
