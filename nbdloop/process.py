"""Processes: stopping one we own, and what /proc says about one.

Stopping is one policy everywhere: a signal (SIGTERM unless said), a wait,
then SIGKILL if it has not gone.  :func:`terminate` does it for any process
by pid, through a pidfd, so a pid that has been reused is never signalled;
:func:`stop` and :func:`kill` do it for our own children, and reap them.
Policies of their own (the supervisor's orderly stop of nbdkit, the
daemon's orderly stop of a server group) are built where they live.

The /proc readers are the few things psutil does not say the same way: a
process's start in clock ticks (an identity that survives an exec and a
change of the wall clock), its children in the order they were started,
its command line as bytes, its descriptors.

Standard library only: the kernel, serve, bench and VM code all use it (the
engine does not).
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
from collections.abc import Callable

#: pidfd_getfd(2), the same number on every architecture; Python has no wrapper.
SYS_PIDFD_GETFD = 438

#: Seconds a process gets to go after SIGKILL (it may be in uninterruptible
#: I/O) before :func:`terminate` gives up waiting.
KILL_WAIT = 10.0


def terminate(pid: int, ours: Callable[[], bool], timeout: float,
              how: signal.Signals = signal.SIGTERM, *, kill: bool = True) -> None:
    """Signal ``pid`` (SIGTERM, or ``how``) if ``ours()`` says it is still
    the process we mean, and wait up to ``timeout`` seconds for it to exit;
    then SIGKILL it, unless not ``kill``, and wait up to :data:`KILL_WAIT`
    more."""
    if not ours():
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not ours():   # the pid could have been reused before the pidfd pinned it
            return
        signal.pidfd_send_signal(pidfd, how)
        if not wait_exit(pidfd, timeout) and kill:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            wait_exit(pidfd, KILL_WAIT)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def wait_exit(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind ``pidfd`` has exited (a pidfd becomes
    readable then, whether or not anyone has reaped it)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def stop(proc: subprocess.Popen, timeout: float, *, kill: bool = True) -> int | None:
    """:func:`terminate` our child ``proc`` if it still runs, and reap it.
    Returns its exit status; None if it still runs (only when not ``kill``)."""
    # An unreaped child keeps its pid: while poll() says it runs, it is ours.
    terminate(proc.pid, lambda: proc.poll() is None, timeout, kill=kill)
    return proc.wait() if kill else proc.poll()


def kill(proc: subprocess.Popen, *, group: bool = False) -> int:
    """SIGKILL our child ``proc`` if it still runs (``group``: its whole
    process group, which it leads), and reap it.  Returns its exit status."""
    if proc.poll() is None:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.wait()


# ---- /proc ----------------------------------------------------------------------

def process_started(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (/proc/PID/stat), or
    None if no such process runs.  With the pid it names one process for
    good: pids are reused, and an exec (the daemon's restart) changes the
    command line but not this.  Not psutil's create_time(), which adds the
    boot time as the wall clock sees it now, so it moves when the clock is
    set."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):     # dead, not yet reaped
        return None
    return int(fields[19])


def cmdline(pid: int) -> list[bytes] | None:
    """``pid``'s arguments, as bytes; None if no such process runs (a
    zombie has an empty command line: ``[b""]``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The children of ``pid``'s main thread, in the order they were
    started (psutil orders them by pid, which wraps); [] if it has none or
    is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def fds(pid: int) -> dict[int, str]:
    """``pid``'s open descriptors and what each refers to (``socket:[N]``,
    a path, ...).  OSError if they cannot be read (no such process, or not
    ours to look into)."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue        # closed meanwhile (the listing's own, for one)
    return found


def getfd(pidfd: int, fd: int) -> int | None:
    """A copy, close-on-exec, of descriptor ``fd`` of the process behind
    ``pidfd`` (pidfd_getfd: the caller may ptrace it); None if it has none
    such, or has gone."""
    copy = ctypes.CDLL(None).syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    return copy if copy >= 0 else None
