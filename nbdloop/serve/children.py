"""Run NBD servers as child processes: nbdloop itself (through ``nbdloop
serve``, so what runs is what users run) and the peers we compare against.

Used by vm-check, the benchmark and the tests; and the one reader of a
server's log.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nbdloop import process
from nbdloop.engine.config import DEFAULT_SEG_SIZE, DEFAULT_THREADS, Export, Server
from nbdloop.serve.cmdline import process_socket
from nbdloop.sizes import parse_size


class ServerError(Exception):
    """A server that would not start, with the end of its log."""


def server_error(log: Path, size: int = 16384) -> str:
    """The reason a server failed, in one line, from the end of its log:
    serve's own ``nbdloop: ...`` refusal, else the last error nbdkit or
    Python printed, else the last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            text = f.read().decode(errors="replace")
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    noise = ("nbdloop: serving ", "nbdloop: server exited", "nbdloop: warning",
             "nbdloop: workers run")
    for line in reversed(lines):
        if line.startswith("nbdloop: ") and not line.startswith(noise):
            return line.removeprefix("nbdloop: ")
    for line in reversed(lines):
        if re.search(r"\b\w*Error\b|\berror\b", line) and not line.startswith(noise):
            return line
    return lines[-1] if lines else "no output"


def serve_argv(server: Server, *, processes: int = 1) -> list[str]:
    """``nbdloop serve``'s command line for ``server``: the inverse of what
    the serve command builds from its options."""
    export = server.export
    argv = [sys.executable, "-m", "nbdloop.cli", "serve", export.image, "--mode", export.mode]
    if server.socket:
        argv += ["--socket", server.socket]
    if server.port:
        argv += ["--port", str(server.port), "--bind", server.bind]
    for flag, on in (("--readonly", export.readonly), ("--mlock", server.mlock),
                     ("--verbose", server.verbose)):
        if on:
            argv.append(flag)
    for option, value, default in (
            ("--pidfile", server.pidfile, None),
            ("--threads", server.threads, DEFAULT_THREADS),
            ("--segment-size", export.segment_size, DEFAULT_SEG_SIZE),
            ("--export-name", export.name, ""),
            ("--offset", export.offset, 0),
            ("--sizelimit", export.length, 0),
            ("--stats-file", server.stats_file, None),
            ("--tls-psk", server.tls_psk, None),
            ("--placement", server.placement, "irq"),
            ("--processes", processes, 1)):
        if value != default:
            argv += [option, str(value)]
    return argv


def nbdloop_serve_argv(image: str, socket_path: str, *, mode: str = "direct",
                       pidfile: str | None = None, readonly: bool = False,
                       threads: int | None = None, segment_size: int | str | None = None,
                       export_name: str | None = None, processes: int = 1,
                       extra: list[str] | None = None) -> list[str]:
    """``nbdloop serve`` on a unix socket, as the benchmark and the tests
    start it; ``extra``: more of serve's options, as they are."""
    export = Export(image=image, mode=mode, readonly=readonly, name=export_name or "",
                    segment_size=parse_size(str(segment_size)) if segment_size
                    else DEFAULT_SEG_SIZE)
    server = Server(exports=(export,), socket=socket_path, pidfile=pidfile,
                    threads=threads or DEFAULT_THREADS)
    return serve_argv(server, processes=processes) + list(extra or [])


def qemu_nbd_argv(image: str, socket_path: str, *, pidfile: str | None = None,
                  cache: str = "none", aio: str = "io_uring") -> list[str]:
    """qemu-nbd as the peer: persistent (-t), several clients (-e), O_DIRECT."""
    qemu_nbd = shutil.which("qemu-nbd")
    if qemu_nbd is None:
        raise ServerError("qemu-nbd is not installed (apt-get install qemu-utils)")
    argv = [qemu_nbd, "-t", "-e", "64", "-f", "raw", "-k", socket_path,
            f"--cache={cache}", f"--aio={aio}", "--discard=unmap"]
    if pidfile:
        argv += [f"--pid-file={pidfile}"]
    return argv + [image]


def nbdkit_peer_argv(plugin: list[str], socket_path: str, *, pidfile: str | None = None,
                     threads: int = 16) -> list[str]:
    """nbdkit with one of its own C plugins (``plugin``: its name and
    arguments), as a peer."""
    argv = ["nbdkit", "-f", "-U", socket_path, "-t", str(threads)]
    if pidfile:
        argv += ["-P", pidfile]
    return argv + plugin


def nbdkit_file_argv(image: str, socket_path: str, *, cache: str = "none", **kw) -> list[str]:
    """nbdkit's own file plugin, as a peer."""
    return nbdkit_peer_argv(["file", image, f"cache={cache}"], socket_path, **kw)


class ServerProcess:
    """A server child process that is ready once its pidfile exists."""

    def __init__(self, argv: list[str], *, socket_path: str, pidfile: str, log: str,
                 env: dict[str, str] | None = None, processes: int = 1) -> None:
        self.argv = argv
        self.processes = processes
        self.socket_path = socket_path
        self.pidfile = Path(pidfile)
        self.log = Path(log)
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def server_pid(self) -> int:
        """The (first) nbdkit process under ``nbdloop serve``, or this
        process itself for peers that run directly."""
        return self.server_pids[0]

    @property
    def server_pids(self) -> list[int]:
        """The nbdkit processes under ``nbdloop serve`` (its children: one
        unless ``--processes``), or this process itself for peers."""
        return process.children(self.pid) or [self.pid]

    @property
    def sockets(self) -> list[str]:
        """Where to connect, spread over the processes of ``--processes``:
        the socket of each, else the one socket."""
        return [str(process_socket(self.socket_path, k)) for k in range(self.processes)] \
            if self.processes > 1 else [self.socket_path]

    @property
    def uris(self) -> list[str]:
        return [f"nbd+unix:///?socket={path}" for path in self.sockets]

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket_path}"

    def start(self, timeout: float = 60) -> ServerProcess:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        self.pidfile.unlink(missing_ok=True)
        # Our own sockets live in our work dir; a previous server (nbdkit and
        # qemu-nbd leave theirs behind) must not block this one.
        sock = Path(self.socket_path)
        if sock.is_socket():
            sock.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> ServerProcess:
        """Wait until the pidfile exists; ServerError if the process ends or
        the timeout passes first (then it is killed)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pidfile.exists() and self.pidfile.read_text().strip():
                return self
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with status {self.proc.returncode}: "
                                  f"{self.log_tail()}")
            time.sleep(0.02)
        self.kill()
        raise ServerError(f"server did not start in {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait; SIGKILL if it does not go.  Returns the exit status."""
        if self.proc is None:
            return 0
        return process.stop(self.proc, timeout)

    def kill(self) -> None:
        if self.proc is not None:
            process.kill(self.proc)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _files(workdir: str | os.PathLike, name: str) -> tuple[str, str, str]:
    """The socket, pidfile and log of the server ``name`` in ``workdir``."""
    return tuple(str(Path(workdir) / f"{name}.{s}") for s in ("sock", "pid", "log"))


def nbdloop_server(image: str, workdir: str | os.PathLike, *, name: str = "nbdloop",
                   **kw) -> ServerProcess:
    """An nbdloop server on a socket in ``workdir``, started with ``nbdloop serve``."""
    sock, pid, log = _files(workdir, name)
    return ServerProcess(nbdloop_serve_argv(image, sock, pidfile=pid, **kw),
                         socket_path=sock, pidfile=pid, log=log,
                         processes=kw.get("processes", 1))


def qemu_nbd_server(image: str, workdir: str | os.PathLike, *, name: str = "qemu-nbd",
                    **kw) -> ServerProcess:
    sock, pid, log = _files(workdir, name)
    return ServerProcess(qemu_nbd_argv(image, sock, pidfile=pid, **kw),
                         socket_path=sock, pidfile=pid, log=log)


def nbdkit_file_server(image: str, workdir: str | os.PathLike, *, name: str = "nbdkit-file",
                       **kw) -> ServerProcess:
    sock, pid, log = _files(workdir, name)
    return ServerProcess(nbdkit_file_argv(image, sock, pidfile=pid, **kw),
                         socket_path=sock, pidfile=pid, log=log)


def nbdkit_null_server(size: int, workdir: str | os.PathLike, *, name: str = "nbdkit-null"
                       ) -> ServerProcess:
    """nbdkit's null plugin, ``size`` bytes: the NBD protocol with no disk."""
    sock, pid, log = _files(workdir, name)
    return ServerProcess(nbdkit_peer_argv(["null", str(size)], sock, pidfile=pid),
                         socket_path=sock, pidfile=pid, log=log)
