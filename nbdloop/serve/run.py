"""``nbdloop serve``'s work: check a :class:`~nbdloop.engine.config.Server`,
open its image, and run nbdkit under the supervisor until told to stop.

One process serves the image on the socket or port of the configuration;
with ``processes`` > 1, process K is pinned to one CPU and accepts on
``SOCKET.K`` (process 0 also on SOCKET), and each gets a copy of the image's
descriptor and of its listening sockets, also after a crash.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import sys
import time
from pathlib import Path

from nbdloop import extents
from nbdloop.engine import backing
from nbdloop.engine import placement as placement_mod
from nbdloop.engine.config import Server
from nbdloop.serve.cmdline import (default_socket, listen_unix, nbdkit_argv,
                                   plugin_env, process_socket, process_stats_file, ready_files,
                                   require_free_port, require_free_socket,
                                   require_permissions, require_psk_file, require_slice)
from nbdloop.serve.supervise import Child, supervise
from nbdloop.sizes import format_size


def check(server: Server, processes: int) -> list[Path]:
    """Refuse what cannot be served before anything starts; returns the
    unix sockets to listen on (none for TCP)."""
    export = server.export
    require_permissions(export.image, export.readonly)
    if server.tls_psk:
        require_psk_file(server.tls_psk)
    if server.port is not None:
        require_free_port(server.bind, server.port)
        return []
    sock = Path(server.socket)
    sockets = [sock] + ([process_socket(sock, k) for k in range(processes)]
                        if processes > 1 else [])
    for path in sockets:
        require_free_socket(path)
    return sockets


def with_socket(server: Server) -> Server:
    """``server`` listening on its image's default socket unless it has a
    socket or a port."""
    if server.socket is None and server.port is None:
        return server.replace(socket=str(default_socket(server.export.image)))
    return server


def serve(server: Server, *, cpus: set[int] | None = None, processes: int = 1,
          say=lambda line: print(line, file=sys.stderr, flush=True)) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status."""
    server = with_socket(server)
    export = server.export
    sockets = check(server, processes)
    fd, geometry = backing.open_image(export.image, mode=export.mode, readonly=export.readonly)
    try:
        part = require_slice(geometry.size, geometry.align, export.mode, export.offset,
                             export.length)
    except BaseException:
        os.close(fd)
        raise
    export = dataclasses.replace(export, offset=part.offset,
                                 length=part.length if part.filtered else 0)
    server = server.replace(exports=(export,))
    ready = ready_files(export.image, os.getpid(), processes)
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
        placed = placement_mod.choose(export.image, set(on))
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
                return backing.open_image(export.image, mode=export.mode,
                                          readonly=export.readonly)[0]
            except backing.ImageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def spawn(k: int) -> Child:
        if processes > 1:
            # Each process is pinned, with placement off; process 0 also
            # takes the usual socket (see listen_unix).
            f = fcntl.fcntl(held, fcntl.F_DUPFD_CLOEXEC, 8)
            stats = server.stats_file
            this = server.replace(socket=None, port=None, placement="off", shared=True,
                                  stats_file=process_stats_file(stats, k) if stats else None)
            own = dict(listen=tuple(s.fileno() for s in
                                    ([listen[0]] if k == 0 else []) + [listen[1 + k]]),
                       cpu=on[k % len(on)])
        else:
            f = single_fd()
            this = server.replace(placement="off" if cpus else server.placement)
            own = {}
        this = this.replace(pidfile=str(ready[k]),
                            exports=(dataclasses.replace(
                                export, fd=f, image=os.path.abspath(export.image)),))
        return Child(nbdkit_argv(this), (f,), **own)

    where = (f"unix:{server.socket}" if server.socket else
             f"nbd://{server.bind}:{server.port}") + (" with TLS" if server.tls_psk else "")
    if not geometry.block_device and not export.readonly:
        extents.warn_if_unsettled(export.image, export.mode, part.offset, part.end, say)
    what = (f"{format_size(part.length)} at offset {part.offset} of "
            f"{format_size(geometry.size)}" if part.filtered else format_size(geometry.size))
    say(f"nbdloop: serving {export.image} ({what}, {export.mode}, "
        f"alignment {geometry.align}) on {where}" +
        (f", {processes} processes" if processes > 1 else ""))
    if cpus and processes == 1:
        os.sched_setaffinity(0, cpus)   # nbdkit and all its threads inherit it
    try:
        status = supervise(spawn, env=plugin_env(), ready_files=ready,
                           pidfile=Path(server.pidfile).absolute() if server.pidfile else None,
                           sockets=sockets)
    except backing.ImageError as e:   # reopening after a crash failed
        say(f"nbdloop: cannot restart the server: {e}")
        status = 1
    finally:
        for s in listen:
            s.close()
        if listen:
            os.close(held)
    if status != 0:
        say(f"nbdloop: server exited with status {status}")
    return 0 if status == 0 else 1
