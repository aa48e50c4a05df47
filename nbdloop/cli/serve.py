"""``nbdloop serve``: serve an image with nbdkit and our plugin, under the
supervisor, in the foreground."""
from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

import click

from nbdloop.cli.common import SIZE, mode_option, parse_cpus, warn_if_unsettled
from nbdloop.engine import backing
from nbdloop.engine import placement as placement_mod
from nbdloop.serve.cmdline import (default_socket, listen_unix, nbdkit_argv,
                                   plugin_env, process_socket, require_free_port,
                                   require_free_socket, require_permissions,
                                   require_psk_file, require_slice, ready_files)
from nbdloop.serve.supervise import Child, supervise
from nbdloop.sizes import format_size

DEFAULT_THREADS = 16


def serve_options(f):
    for opt in reversed([
        mode_option(),
        click.option("--readonly", "-r", is_flag=True, help="Serve read-only."),
        click.option("--threads", type=click.IntRange(1, 256), default=DEFAULT_THREADS,
                     show_default=True, help="nbdkit worker threads per connection."),
        click.option("--segment-size", type=SIZE, default=backing.DEFAULT_SEG_SIZE,
                     show_default="128K", help="Largest I/O segment (multiple of 4K)."),
        click.option("--export-name", default="", help="Export name to offer (default: any)."),
        click.option("--offset", "-o", type=SIZE, default=0, metavar="SIZE",
                     help="Serve the image from this byte on (losetup -o)."),
        click.option("--sizelimit", type=SIZE, default=0, metavar="SIZE",
                     help="Serve at most this many bytes (losetup --sizelimit) "
                          "[default: to the end]."),
    ]):
        f = opt(f)
    return f


def validate_serve_options(image, mode, readonly, segment_size):
    if segment_size < 4096 or segment_size % 4096 or segment_size > 16 << 20:
        raise click.BadParameter("must be a multiple of 4K between 4K and 16M",
                                 param_hint="--segment-size")
    require_permissions(image, readonly)


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
@click.option("--placement", type=click.Choice(["auto", "irq", "off"]), default="auto",
              show_default=True,
              help="irq: under load run the workers on CPUs that do not take the disk's "
                   "interrupts, and give a lone request every CPU; auto: the same, but "
                   "move them to the other CPUs (or spread them) while other work (the "
                   "client) crowds theirs; off: leave them to the scheduler (README, Placement).")
@click.option("--cpus", callback=parse_cpus, metavar="LIST",
              help="Run the server on these CPUs only (like taskset: 0, 0-1, 0,2, 0-7:2); turns "
                   "placement off.  docs/BENCHMARKS.md measures when it pays.")
@click.option("--sched", type=click.Choice(["batch", "normal"]), default="batch",
              show_default=True,
              help="batch: the workers run under SCHED_BATCH, so a worker woken up does not "
                   "preempt one that is running a request (see README); normal: leave them.")
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Serve with this many nbdkit processes, each on one CPU (in turn from "
                   "--cpus or the CPUs allowed), so that several connections are not held "
                   "to one Python interpreter.  Process K accepts on SOCKET.K, process 0 "
                   "also on SOCKET (attach spreads its connections over them).  In direct "
                   "mode, a write that is not aligned to the image's direct-I/O alignment "
                   "is refused (README, Processes).")
@click.option("--agent", is_flag=True, hidden=True,
              help="Run under a device's agent (nbdloop attach): the agent, not this "
                   "supervisor, restarts nbdkit, and a stop closes the connections first.")
def serve(image, mode, readonly, threads, segment_size, export_name, offset, sizelimit,
          socket_path, port, bind, pidfile, verbose, stats_file, tls_psk, mlock, placement,
          cpus, sched, processes, agent):
    """Serve IMAGE over NBD in the foreground until SIGINT or SIGTERM."""
    validate_serve_options(image, mode, readonly, segment_size)
    if tls_psk:
        require_psk_file(tls_psk)
    if socket_path and port:
        raise click.BadParameter("use --socket or --port, not both", param_hint="--socket")
    if processes > 1 and port is not None:
        raise click.BadParameter("several processes serve a unix socket, not --port",
                                 param_hint="--processes")
    sock = None
    sockets = []
    if port is None:
        sock = Path(socket_path) if socket_path else default_socket(image)
        sockets = [sock] + ([process_socket(sock, k) for k in range(processes)]
                            if processes > 1 else [])
        for path in sockets:
            require_free_socket(path)
    else:
        require_free_port(bind, port)
    fd, geometry = backing.open_image(image, mode=mode, readonly=readonly)
    try:
        part = require_slice(geometry.size, geometry.align, mode, offset, sizelimit)
    except BaseException:
        os.close(fd)
        raise
    ready = ready_files(image, os.getpid(), processes)
    first_fd = [fd]
    os.umask(0o077)  # the socket is 0600
    listen = []
    if processes > 1:
        # The supervisor holds the image (and its lock) and the sockets; each
        # process gets a copy of them, also after a crash.
        held = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 8)
        os.close(fd)
        try:
            listen = [listen_unix(path, 8) for path in sockets]
        except BaseException:
            os.close(held)
            raise
        on = sorted(cpus or os.sched_getaffinity(0))
        # CPUs free of the disk's interrupts first, where one process would
        # put its pool: process 0 is the one a lone client reaches.
        placed = placement_mod.choose(image, set(on))
        if placed is not None:
            on = sorted(placed.busy) + sorted(placed.irq)

    def single_fd() -> int:
        # nbdkit inherits the opened, locked descriptor: no window in which a
        # second server could take the image.  After a crash, open it again.
        if first_fd:
            return first_fd.pop()
        # The dead nbdkit's rings are torn down by the kernel a moment later,
        # and they hold the image (and so its lock) until then.
        deadline = time.monotonic() + 10
        while True:
            try:
                return backing.open_image(image, mode=mode, readonly=readonly)[0]
            except backing.ImageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def spawn(k: int) -> Child:
        if processes > 1:
            # Each process is pinned, with placement off; process 0 also
            # takes the usual socket (see listen_unix).
            f = fcntl.fcntl(held, fcntl.F_DUPFD_CLOEXEC, 8)
            how = dict(socket_path=None, port=None, placement="off", activated=True,
                       shared=True, stats_file=f"{stats_file}.{k}" if stats_file and k
                       else stats_file)
            own = dict(listen=tuple(s.fileno() for s in
                                    ([listen[0]] if k == 0 else []) + [listen[1 + k]]),
                       cpu=on[k % len(on)])
        else:
            f = single_fd()
            how = dict(socket_path=str(sock) if sock else None, port=port,
                       placement="off" if cpus else placement, stats_file=stats_file)
            own = {}
        argv = nbdkit_argv(image, fd=f, mode=mode, readonly=readonly, bind=bind,
                           threads=threads, segment_size=segment_size,
                           export_name=export_name, pidfile=str(ready[k]), verbose=verbose,
                           tls_psk=tls_psk, mlock=mlock, sched=sched,
                           exit_with_parent=not agent, slice_=part, **how)
        return Child(argv, (f,), **own)

    where = (f"unix:{sock}" if sock else f"nbd://{bind}:{port}") + (" with TLS" if tls_psk
                                                                     else "")
    # Under an agent, attach has said it once already: not again at every
    # server start, a recovery's included.
    if not geometry.block_device and not readonly and not agent:
        warn_if_unsettled(image, mode, part.offset, part.end)
    what = (f"{format_size(part.length)} at offset {part.offset} of "
            f"{format_size(geometry.size)}" if part.filtered else format_size(geometry.size))
    click.echo(f"nbdloop: serving {image} ({what}, {mode}, "
               f"alignment {geometry.align}) on {where}" +
               (f", {processes} processes" if processes > 1 else ""), err=True)
    if cpus and processes == 1:
        os.sched_setaffinity(0, cpus)   # nbdkit and all its threads inherit it
    try:
        status = supervise(spawn, env=plugin_env(), ready_files=ready,
                           pidfile=Path(pidfile).absolute() if pidfile else None,
                           sockets=sockets, handover=agent)
    except backing.ImageError as e:   # reopening after a crash failed
        click.echo(f"nbdloop: cannot restart the server: {e}", err=True)
        status = 1
    finally:
        for s in listen:
            s.close()
        if listen:
            os.close(held)
    if status != 0:
        click.echo(f"nbdloop: server exited with status {status}", err=True)
    sys.exit(0 if status == 0 else 1)
