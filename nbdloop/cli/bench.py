"""``nbdloop bench``: nbdloop's two modes against its peers, with fio; and
how long each mode leaves acknowledged writes off the disk.  The work is
:mod:`nbdloop.bench.command`."""
from __future__ import annotations

import contextlib
import sys

import click

from nbdloop.bench import command
from nbdloop.bench import run as bench
from nbdloop.cli.common import SIZE, parse_cpus


def _choices(known, what: str):
    """Click callback: a comma-separated list of ``known`` names."""
    def check(ctx, param, value):
        names = [v.strip() for v in value.split(",") if v.strip()] if value else None
        for name in names or []:
            if name not in known:
                raise click.BadParameter(f"{name!r} is not {what} ({', '.join(known)})")
        return names
    return check


@contextlib.contextmanager
def _progress(total: int):
    """Each run reported: a bar on a terminal, a line a run in a log."""
    if sys.stderr.isatty():
        with click.progressbar(length=total, label="bench", file=sys.stderr,
                               show_pos=True, item_show_func=lambda what: what) as bar:
            yield lambda done, what: bar.update(done - bar.pos, what)
            bar.update(total - bar.pos)
    else:   # a log: a line a run (click's bar would print only its label)
        yield lambda done, what: click.echo(f"[{done + 1}/{total}] {what}", err=True)


@click.command()
@click.option("--image", type=click.Path(dir_okay=False),
              help="Benchmark this image (it is overwritten by the write workloads).")
@click.option("--size", type=SIZE, default="2G", show_default=True,
              help="Size of the image made for the benchmark when --image is not given.")
@click.option("--modes", default="direct,buffered", show_default=True,
              callback=_choices(("direct", "buffered"), "a mode"),
              help="nbdloop modes to measure.")
@click.option("--peers", default=None, callback=_choices(bench.PEERS, "a peer"),
              help=f"Peers to compare against [default: all: {','.join(bench.PEERS)}; "
                   f"--quick: {','.join(command.QUICK['peers'])}].  {bench.NULL_PEER} is "
                   "nbdkit's null plugin (no disk), the floor for server CPU per GiB.")
@click.option("--workloads", default=None, callback=_choices(bench.WORKLOADS, "a workload"),
              help=f"Workloads [default: all: {','.join(bench.WORKLOADS)}].")
@click.option("--runtime", type=click.FloatRange(0.5, 600), default=None,
              help="Seconds per run [default 5; --quick 3].")
@click.option("--rounds", type=click.IntRange(1, 50), default=None,
              help="Interleaved rounds [default 2; --quick 1].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write results.json, results.md and the charts "
                   "[default: bench-results/DATE].")
@click.option("--quick", is_flag=True, help="A short run: the main workloads, one round each.")
@click.option("--pin", metavar="CPUS", default=None,
              help="Also measure nbdloop direct mode pinned to these CPUs "
                   "(nbdloop serve --cpus).")
@click.option("--placements", default=None, metavar="LIST",
              callback=_choices(("off",), "a placement to compare"),
              help="Also measure nbdloop direct mode with each of these --placement "
                   "rules (off), beside the default (irq).")
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
    """Measure nbdloop against qemu-nbd, nbdkit's file plugin, nbdkit's null
    plugin (the protocol alone, no disk), the kernel loop device
    (--direct-io=on) and the raw file, in interleaved rounds; then
    (not with --quick) how long each mode leaves acknowledged writes off
    the disk."""
    opts = command.Options.with_preset(
        quick=quick, peers=peers, workloads=workloads, runtime=runtime, rounds=rounds,
        footprint=footprint_size, out=out_dir, image=image, size=size,
        modes=tuple(modes or ()), pin=pin, placements=tuple(placements or ()),
        processes=processes, client_cpus=frozenset(client_cpus) if client_cpus else None,
        durability_window=durability_window, durability_writes=durability_writes)
    say = lambda line: click.echo(line, err=True)   # noqa: E731
    if durability_only:
        command.durability_only(opts, say, click.echo)
    else:
        command.measure(opts, say, click.echo, _progress)
