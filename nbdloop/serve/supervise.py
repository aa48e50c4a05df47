"""Run nbdkit under a small supervisor that makes SIGINT/SIGTERM mean "stop".

nbdkit 1.32 in the parallel thread model does not stop on SIGTERM while a
client holds an idle connection: its worker threads sit in read() and only
notice the shutdown when the next request arrives (checked on this machine
with nbdkit's own memory plugin).  A kernel NBD client is idle most of the
time, so ``nbdloop serve`` would never stop.  The supervisor forwards the
signal, gives nbdkit a moment, and then shuts down the read side of
nbdkit's sockets (through pidfd_getfd), so each worker sees end-of-file,
finishes the request it is on, and nbdkit exits cleanly.

Under a device's agent (``serve --agent``) the order is the other way round,
because nbdkit answers a request it reads after SIGTERM with an ESHUTDOWN
error, which the kernel passes to the filesystem as an I/O error: the
connections are closed first, and nbdkit is told to go only once they are
gone (or killed, which answers nothing, so the kernel resends).  There
nbdkit is also not restarted after a crash: the agent replaces the whole
server, because it must hand the kernel new connections anyway.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SYS_PIDFD_GETFD = 438
GRACE = 1.0        # seconds nbdkit gets to stop by itself
DRAIN = 60.0       # seconds for in-flight requests after the sockets close


def _sockets(pid: int, connected_only: bool) -> Iterator[socket.socket]:
    """Copies (pidfd_getfd) of process ``pid``'s sockets, each closed after
    the caller's turn; ``connected_only`` leaves out listening sockets."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
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


def stop(proc: subprocess.Popen, handover: bool = False) -> int:
    """Stop nbdkit in an orderly way; returns its exit status."""
    if handover:
        return _hand_over(proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(GRACE)
    except subprocess.TimeoutExpired:
        pass
    shutdown_sockets(proc.pid)
    try:
        return proc.wait(DRAIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _hand_over(proc: subprocess.Popen) -> int:
    """Close nbdkit's connections, let it answer what it has read, and only
    then stop it: SIGTERM once it has no connection left, SIGKILL if the
    drain time runs out."""
    shutdown_sockets(proc.pid, connected_only=True)
    deadline = time.monotonic() + DRAIN
    while proc.poll() is None and connections(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if not connections(proc.pid) else signal.SIGKILL)
    try:
        return proc.wait(GRACE * 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


#: nbdkit deaths that are crashes (not a kill by someone): restarted.
CRASH_SIGNALS = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL,
                 signal.SIGFPE}
MAX_STARTUP_CRASHES = 3    # in a row, before nbdkit ever got ready: give up


def supervise(spawn: Callable[[], tuple[list[str], tuple[int, ...]]], *,
              env: dict[str, str], ready_file: Path, pidfile: Path | None,
              socket_path: Path | None, ready_timeout: float = 120, handover: bool = False,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
              ) -> int:
    """Start nbdkit, write ``pidfile`` (our pid) once it listens, and stop it on
    SIGINT/SIGTERM.  Returns the exit status for ``nbdloop serve``.

    ``spawn()`` opens (and locks) the image and returns nbdkit's argv and the
    descriptors it inherits.  If nbdkit crashes (nbdkit 1.32.5 aborts when a
    client hangs up with replies pending: RHBZ#2173054), it is started again
    on the same socket; its clients lose their connections, not the server.
    A SIGKILL or an ordinary exit is not a crash and ends the supervisor.
    ``handover``: under a device's agent, which restarts the whole server
    itself; stop with :func:`_hand_over` and never restart nbdkit."""
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM,
                                                   signal.SIGHUP)}
    startup_crashes = 0
    proc = None
    status = 1
    try:
        first = True
        while True:
            ready_file.unlink(missing_ok=True)
            if not first and socket_path is not None:
                socket_path.unlink(missing_ok=True)   # the dead server's socket
            argv, fds = spawn()
            proc = subprocess.Popen(argv, env=env, pass_fds=fds)
            for fd in fds:
                os.close(fd)   # nbdkit holds the image (and its lock) now
            ready = _wait(proc, ready_file, socket_path, pidfile, ready_timeout,
                          lambda: stopping)
            got_ready = ready_file.exists()
            if stopping or not ready:
                status = stop(proc, handover)
                if stopping and status == -signal.SIGABRT:
                    # Closing connections with replies pending can trip the
                    # same nbdkit assertion; every request had been answered.
                    log("nbdloop: nbdkit aborted while shutting down (RHBZ#2173054)")
                if stopping and status in (0, -signal.SIGTERM, -signal.SIGABRT) or \
                        handover and status == -signal.SIGKILL:
                    status = 0
                break
            status = proc.returncode
            startup_crashes = 0 if got_ready else startup_crashes + 1
            if handover or -status not in CRASH_SIGNALS or \
                    startup_crashes >= MAX_STARTUP_CRASHES:
                break
            log(f"nbdloop: nbdkit crashed ({signal.Signals(-status).name}); "
                "restarting it on the same image and socket")
            first = False
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for path in (pidfile, ready_file, socket_path):
            if path is not None:
                try:
                    path.unlink()
                except OSError:
                    pass
        for s, h in old.items():
            signal.signal(s, h)
    return status


def _wait(proc: subprocess.Popen, ready_file: Path, socket_path: Path | None,
          pidfile: Path | None, ready_timeout: float, stopping: Callable[[], bool]) -> bool:
    """Run until nbdkit exits or we are asked to stop; False if it never got
    ready in time.  Publishes the socket's mode and our pidfile once ready."""
    deadline = time.monotonic() + ready_timeout
    ready = False
    while proc.poll() is None and not stopping():
        if not ready and ready_file.exists() and ready_file.read_text().strip():
            ready = True
            if socket_path is not None:
                # nbdkit creates its socket 0755 whatever our umask; the
                # runtime directory (0700) covers the moment until now.
                os.chmod(socket_path, 0o600)
            if pidfile is not None and not pidfile.exists():
                tmp = pidfile.with_name(pidfile.name + ".tmp")
                tmp.write_text(f"{os.getpid()}\n")
                tmp.rename(pidfile)
        if not ready and time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
