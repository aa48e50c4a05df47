"""``nbdloop serve``: serve an image with nbdkit and our plugin, under the
supervisor, in the foreground.  The work is :func:`nbdloop.serve.run.serve`."""
from __future__ import annotations

import os
import sys

import click

from nbdloop.cli.common import SIZE, mode_option, parse_cpus, segment_size
from nbdloop.engine.config import DEFAULT_SEG_SIZE, DEFAULT_THREADS, PLACEMENTS, Export, Server


def serve_options(f):
    for opt in reversed([
        mode_option(),
        click.option("--readonly", "-r", is_flag=True, help="Serve read-only."),
        click.option("--threads", type=click.IntRange(1, 256), default=DEFAULT_THREADS,
                     show_default=True, help="nbdkit worker threads per connection."),
        click.option("--segment-size", type=SIZE, default=DEFAULT_SEG_SIZE,
                     callback=segment_size, show_default="128K",
                     help="Largest I/O segment (multiple of 4K)."),
        click.option("--export-name", default="", help="Export name to offer (default: any)."),
        click.option("--offset", "-o", type=SIZE, default=0, metavar="SIZE",
                     help="Serve the image from this byte on (losetup -o)."),
        click.option("--sizelimit", type=SIZE, default=0, metavar="SIZE",
                     help="Serve at most this many bytes (losetup --sizelimit) "
                          "[default: to the end]."),
    ]):
        f = opt(f)
    return f


@click.command()
@click.argument("image", type=click.Path())
@serve_options
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Unix socket to listen on [default: under the runtime dir].")
@click.option("--port", type=click.IntRange(1, 65535), help="Listen on TCP instead.")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address for --port.")
@click.option("--pidfile", type=click.Path(dir_okay=False),
              help="Write the server pid here once it accepts connections.")
@click.option("--verbose", "-v", is_flag=True, help="nbdkit debug messages.")
@click.option("--stats-file", type=click.Path(dir_okay=False),
              help="Write the I/O engine's counters here (JSON) as connections close "
                   "(with --processes, process K > 0 writes FILE.K).")
@click.option("--tls-psk", type=click.Path(dir_okay=False),
              help="Require TLS with a pre-shared key from this file (username:hexkey "
                   "lines, as psktool writes them).")
@click.option("--mlock", is_flag=True,
              help="Lock the server's memory as it is touched (mlockall), so it never "
                   "waits on a page-in.")
@click.option("--placement", type=click.Choice(PLACEMENTS), default="irq",
              show_default=True,
              help="irq: under load run the workers on CPUs that do not take the disk's "
                   "interrupts, and give a lone request every CPU; off: leave them to the "
                   "scheduler.")
@click.option("--cpus", callback=parse_cpus, metavar="LIST",
              help="Run the server on these CPUs only (like taskset: 0, 0-1, 0,2, 0-7:2); "
                   "turns placement off.")
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Serve with this many nbdkit processes, each on one CPU (in turn from "
                   "--cpus or the CPUs allowed), so that several connections are not held "
                   "to one Python interpreter.  Process K accepts on SOCKET.K, process 0 "
                   "also on SOCKET (attach spreads its connections over them).  In direct "
                   "mode, a write that is not aligned to the image's direct-I/O alignment "
                   "is refused.")
def serve(image, mode, readonly, threads, segment_size, export_name, offset, sizelimit,
          socket_path, port, bind, pidfile, verbose, stats_file, tls_psk, mlock, placement,
          cpus, processes):
    """Serve IMAGE over NBD in the foreground until SIGINT or SIGTERM."""
    if socket_path and port:
        raise click.BadParameter("use --socket or --port, not both", param_hint="--socket")
    if processes > 1 and port is not None:
        raise click.BadParameter("several processes serve a unix socket, not --port",
                                 param_hint="--processes")
    from nbdloop.serve import run
    export = Export(image=image, mode=mode, readonly=readonly, segment_size=segment_size,
                    name=export_name, offset=offset, length=sizelimit)
    server = Server(exports=(export,), threads=threads, placement=placement, mlock=mlock,
                    stats_file=os.path.abspath(stats_file) if stats_file else None,
                    socket=socket_path, port=port, bind=bind, pidfile=pidfile,
                    verbose=verbose, tls_psk=tls_psk)
    sys.exit(run.serve(server, cpus=cpus, processes=processes,
                       say=lambda line: click.echo(line, err=True)))
