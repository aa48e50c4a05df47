"""``nbdloop daemon``: the daemon's life, from its start to its end or its
exec (``nbdloop restart``).

At most one daemon runs per runtime directory (a lock file).  It listens on
the control socket that systemd passed (socket activation), or that the
daemon before it passed across an exec, or on one it makes; takes over the
devices it finds; with ``--attach-table`` attaches the table of attachments
(through its own socket, as ``nbdloop attach --all``); tells systemd it is
ready; and then watches until SIGTERM or a restart.  Ending never touches
the devices: their servers run in sessions of their own and the next
daemon takes them over.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading

from nbdloop import paths
from nbdloop.daemon import control
from nbdloop.daemon.daemon import KEPT_FDS_ENV, Daemon
from nbdloop.daemon.users import DEFAULT_MAX_PER_USER

#: Across an exec: the descriptor that holds the daemon's lock.
LOCK_FD_ENV = "NBDLOOP_DAEMON_LOCK_FD"


class AlreadyRunning(Exception):
    """Another daemon holds the lock: not a failure, since one runs."""


def log(message: str) -> None:
    print(f"nbdloop daemon: {message}", file=sys.stderr, flush=True)


def _lock() -> int:
    """The daemon's lock, held as long as it runs (and across its exec)."""
    inherited = os.environ.pop(LOCK_FD_ENV, None)
    if inherited is not None:
        return int(inherited)
    fd = os.open(paths.runtime_dir() / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning("another nbdloop daemon runs") from None
    return fd


def _control_socket():
    """The socket systemd (or the daemon before the exec) passed, and
    whether it is ours to remove at the end: one we made is."""
    passed = control.from_systemd()
    if passed is not None:
        return passed, False
    return control.listen(paths.control_socket()), True


def run(attach_table: bool = False, max_per_user: int = DEFAULT_MAX_PER_USER) -> int:
    lock = _lock()
    listening, ours = _control_socket()
    _stay_out_of_reclaim()
    daemon = Daemon(paths.state_dir(), log=log, max_per_user=max_per_user)

    def on_signal(signum, frame):
        if signum == signal.SIGHUP:
            daemon.restart_requested = True
        else:
            daemon.stopping = True
        daemon.wake()

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    daemon.take_over()
    server = control.ControlServer(listening, daemon.methods())
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    if attach_table:
        _attach_table()
    control.notify("READY=1")
    log(f"ready: {len(daemon.devices)} device(s), pid {os.getpid()}")
    daemon.watch()
    if daemon.restart_requested and not daemon.stopping:
        _exec_again(lock, listening, daemon.kept_env(), daemon.max_per_user)
    log("stopping; the devices and their servers stay")
    server.close()
    if ours:
        # So that a command knows no daemon runs without asking one.
        paths.control_socket().unlink(missing_ok=True)
    return 0


def _attach_table() -> None:
    """The table's images, attached as ``nbdloop attach --all`` does it (a
    client of this daemon: the table's lines are attach's options)."""
    p = subprocess.run([sys.executable, "-m", "nbdloop.cli.main", "attach", "--all"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    for line in (p.stdout + p.stderr).splitlines():
        log(f"table: {line}")


def _stay_out_of_reclaim() -> None:
    """A recovery runs while the kernel holds the devices' writes: the
    daemon must never wait for memory on its own devices."""
    from nbdloop.engine import uring
    try:
        uring.set_io_flusher()
    except PermissionError:
        log("warning: PR_SET_IO_FLUSHER not permitted (no CAP_SYS_RESOURCE)")


def _exec_again(lock: int, listening, kept: str, max_per_user: int) -> None:
    """Start again as the nbdloop now installed, keeping the lock, the
    control socket (passed as systemd passes it: descriptor 3) and the
    users' images (``kept``: Daemon.kept_env)."""
    log("restarting")
    sys.stdout.flush()
    sys.stderr.flush()
    if lock == 3:
        lock = os.dup(lock)
    os.set_inheritable(lock, True)
    fd = listening.fileno()
    if fd != 3:
        os.dup2(fd, 3)          # inheritable
    else:
        os.set_inheritable(3, True)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()),
               **{LOCK_FD_ENV: str(lock), KEPT_FDS_ENV: kept,
                  paths.MAX_PER_USER_ENV: str(max_per_user)})
    argv = [sys.executable, "-m", "nbdloop.cli.main", "daemon"]
    os.execve(argv[0], argv, env)

