"""Run nbdkit under a small supervisor that makes SIGINT/SIGTERM mean "stop".

nbdkit 1.32 in the parallel thread model does not stop on SIGTERM while a
client holds an idle connection: its worker threads sit in read() and only
notice the shutdown when the next request arrives (checked on this machine
with nbdkit's own memory plugin).  A kernel NBD client is idle most of the
time, so ``nbdloop serve`` would never stop.  The supervisor forwards the
signal, gives nbdkit a moment, and then shuts down the read side of
nbdkit's sockets (through pidfd_getfd), so each worker sees end-of-file,
finishes the request it is on, and nbdkit exits cleanly.

The daemon's servers are stopped the other way round (connections first:
see nbdloop.daemon.servers.stop), with the helpers here.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from nbdloop import process

GRACE = 1.0        # seconds nbdkit gets to stop by itself
DRAIN = 60.0       # seconds for in-flight requests after the sockets close


def _sockets(pid: int, connected_only: bool) -> Iterator[socket.socket]:
    """Copies (pidfd_getfd) of process ``pid``'s sockets, each closed after
    the caller's turn; ``connected_only`` leaves out listening sockets."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        for theirs, target in process.fds(pid).items():
            if not target.startswith("socket:"):
                continue
            fd = process.getfd(pidfd, theirs)
            if fd is None:
                continue
            s = socket.socket(fileno=fd)
            try:
                if connected_only and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue
                yield s
            except OSError:
                continue
            finally:
                s.close()
    except OSError:
        return
    finally:
        os.close(pidfd)


def shutdown_sockets(pid: int, connected_only: bool = False) -> int:
    """shutdown(SHUT_RD) every socket of process ``pid``; returns how many."""
    n = 0
    for s in _sockets(pid, connected_only):
        try:
            s.shutdown(socket.SHUT_RD)
            n += 1
        except OSError:
            pass
    return n


def connections(pid: int) -> int:
    """How many connected sockets process ``pid`` holds."""
    return sum(1 for _ in _sockets(pid, True))


def stop(procs: list[subprocess.Popen]) -> list[int]:
    """Stop nbdkit (every process of it) in an orderly way; returns their
    exit statuses."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    if not _wait_all(procs, GRACE):
        for proc in procs:
            if proc.poll() is None:
                shutdown_sockets(proc.pid)
        _wait_all(procs, DRAIN)
    return [process.kill(proc) for proc in procs]


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait until every process has exited; False if the time ran out."""
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


#: nbdkit deaths that are crashes (not a kill by someone): restarted.
CRASH_SIGNALS = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL,
                 signal.SIGFPE}
MAX_STARTUP_CRASHES = 3    # in a row, before nbdkit ever got ready: give up


@dataclasses.dataclass
class Child:
    """How to start one nbdkit process."""

    argv: list[str]
    fds: tuple[int, ...]           # inherited; closed here once it has started
    # Listening sockets it inherits as descriptors 3, 4, ... (systemd's socket
    # activation, which nbdkit supports), so that the supervisor makes each
    # process's sockets, and one that crashes is restarted without its
    # sockets ever going away.  Empty: nbdkit makes its own socket.
    listen: tuple[int, ...] = ()
    cpu: int | None = None         # pinned to it, with every thread it makes


def popen(child: Child, env: dict[str, str], **popen_args) -> subprocess.Popen:
    """Start ``child``; its ``fds`` reach nbdkit under their own numbers.
    ``popen_args`` go to Popen (the daemon's servers: a session of their
    own and a log file)."""
    if not child.listen:
        return subprocess.Popen(child.argv, env=env, pass_fds=child.fds, **popen_args)
    base = 3
    # dup2 below must not overwrite a descriptor it has yet to copy, nor
    # the image's (whose number is in argv): the caller keeps them all above.
    assert min(child.listen + child.fds) >= base + len(child.listen)

    def in_child():
        for i, fd in enumerate(child.listen):
            os.dup2(fd, base + i)      # inheritable, unlike the original
        if child.cpu is not None:
            os.sched_setaffinity(0, {child.cpu})
    # pass_fds would close the descriptors dup2 made: inherit them all.
    for fd in child.fds:
        os.set_inheritable(fd, True)
    env = dict(env, LISTEN_FDS=str(len(child.listen)))
    # LISTEN_PID must be nbdkit's own pid: a shell knows it and execs nbdkit.
    argv = ["/bin/sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh"] + child.argv
    return subprocess.Popen(argv, env=env, close_fds=False, preexec_fn=in_child, **popen_args)


def supervise(spawn: Callable[[int], Child], *, env: dict[str, str],
              ready_files: list[Path], pidfile: Path | None, sockets: list[Path],
              ready_timeout: float = 120,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
              ) -> int:
    """Start nbdkit, one process per ready file, write ``pidfile`` (our pid)
    once they all listen, and stop them on SIGINT/SIGTERM.  Returns the
    exit status for ``nbdloop serve``.  ``sockets``: the unix sockets served
    (the first is the one nbdkit makes itself when not given any), removed
    at the end.

    ``spawn(k)`` says how to start process ``k``; the first call also
    opens (and locks) the image.  If a process crashes (nbdkit 1.32.5
    aborts when a client hangs up with replies pending: RHBZ#2173054), it
    is started again on the same socket; its clients lose their
    connections, not the server.  A SIGKILL or an ordinary exit is not a
    crash and ends the supervisor (and the other processes).
    """
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM,
                                                   signal.SIGHUP)}
    n = len(ready_files)
    procs: list[subprocess.Popen] = []
    started = [0.0] * n
    startup_crashes = [0] * n
    seen_ready = [False] * n
    published = False

    def start(k: int) -> None:
        nonlocal published
        ready_files[k].unlink(missing_ok=True)
        seen_ready[k] = False
        child = spawn(k)
        if k < len(procs) and not child.listen and sockets:
            # A restart of an nbdkit that makes its own socket: the dead
            # one's goes first, and the new one's mode is set once it listens.
            sockets[0].unlink(missing_ok=True)
            published = False
        proc = popen(child, env)
        for fd in child.fds:
            os.close(fd)   # nbdkit holds the image (and its lock) now
        started[k] = time.monotonic()
        if k < len(procs):
            procs[k] = proc
        else:
            procs.append(proc)

    def ready(k: int) -> bool:
        # Read until it says so, not at every turn of the loop for good.
        if not seen_ready[k]:
            try:
                seen_ready[k] = bool(ready_files[k].read_text().strip())
            except OSError:
                pass
        return seen_ready[k]

    status = 1
    try:
        for k in range(n):
            start(k)
        while True:
            if stopping:
                status = _stopped_status(stop(procs), log)
                break
            dead = [k for k, proc in enumerate(procs) if proc.poll() is not None]
            if dead:
                k = dead[0]
                status = procs[k].returncode
                startup_crashes[k] = 0 if ready(k) else startup_crashes[k] + 1
                if -status not in CRASH_SIGNALS or \
                        startup_crashes[k] >= MAX_STARTUP_CRASHES:
                    stop(procs)
                    break
                log(f"nbdloop: nbdkit crashed ({signal.Signals(-status).name}); "
                    "restarting it on the same image and socket")
                start(k)
                continue
            if not published and all(ready(k) for k in range(n)):
                published = True
                _publish(sockets, pidfile)
            late = [k for k in range(n) if not ready(k) and
                    time.monotonic() > started[k] + ready_timeout]
            if late:
                # Never got ready: stopped, and a failure whatever it says.
                status = _stopped_status(stop(procs), log) or 1
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            process.kill(proc)
        for path in [pidfile] + sockets + ready_files:
            if path is not None:
                try:
                    path.unlink()
                except OSError:
                    pass
        for s, h in old.items():
            signal.signal(s, h)
    return status


def _stopped_status(statuses: list[int], log: Callable[[str], None]) -> int:
    """The exit status of a server stopped on request: 0 if every process
    ended as a stop ends, else the first that did not."""
    for status in statuses:
        if status == -signal.SIGABRT:
            # Closing connections with replies pending can trip the same
            # nbdkit assertion; every request had been answered.
            log("nbdloop: nbdkit aborted while shutting down (RHBZ#2173054)")
        if status not in (0, -signal.SIGTERM, -signal.SIGABRT):
            return status
    return 0


def _publish(sockets: list[Path], pidfile: Path | None) -> None:
    """Once nbdkit listens: the sockets' mode, and our pidfile."""
    for path in sockets:
        # nbdkit creates its socket 0755 whatever our umask; the runtime
        # directory (0700) covers the moment until now.
        os.chmod(path, 0o600)
    if pidfile is not None and not pidfile.exists():
        tmp = pidfile.with_name(pidfile.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.rename(pidfile)
