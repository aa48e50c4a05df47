"""A command's side of the daemon: ask it, and start it first where nothing
else has (systemd's socket starts it where its units are installed).

A daemon started here runs in a session of its own, logging to
``<runtime dir>/daemon.log``; two commands that start one at once are
fine, since only one daemon gets the lock.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from nbdloop import paths
from nbdloop.daemon import control

#: Seconds a command waits for a daemon it started (it imports and takes
#: over the devices it finds; seconds under a slow CPU).
START_TIMEOUT = 120.0


def call(method: str, params: dict | None = None, *, fds=()) -> object:
    """The daemon's answer to ``method``; the daemon is started if none runs
    (by root: a user's command only asks root's)."""
    path = paths.control_socket()
    try:
        return control.call(path, method, params, fds=fds)
    except control.DaemonUnavailable as e:
        if os.geteuid() != 0:
            raise control.DaemonError(f"{e}: root starts it (systemctl start "
                                      "nbdloop.socket, or any nbdloop attach as root)") \
                from None
        start()
    return control.call(path, method, params, fds=fds)


def needed() -> bool:
    """Whether a command that only looks at or removes attachments needs
    the daemon: there are records for one to take over, or one runs.  A
    command that would find nothing starts no daemon."""
    if os.geteuid() == 0 and any(paths.state_dir().glob("nbd*.json")):
        return True
    try:
        control.call(paths.control_socket(), "list")
    except control.DaemonUnavailable:
        return False
    return True


def start() -> None:
    """Start a daemon and wait until it answers."""
    path = paths.control_socket()
    # Root's alone: it names every image attached.
    fd = os.open(paths.runtime_dir() / "daemon.log",
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with open(fd, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nbdloop.cli.main", "daemon"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, env=_env())
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            control.call(path, "list")
            return
        except control.DaemonUnavailable:
            pass
        # Exit status 0: another daemon had the lock, and will answer.
        status = proc.poll()
        if status not in (None, 0) or time.monotonic() > deadline:
            why = f"exit status {status}" if status else f"no answer in {START_TIMEOUT:g} s"
            raise control.DaemonError(f"the nbdloop daemon did not start ({why}; its log "
                                      f"is {paths.runtime_dir() / 'daemon.log'})")
        time.sleep(0.05)


def _env() -> dict[str, str]:
    """The daemon finds this nbdloop, whatever the caller's directory."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)      # the daemon is no service's main process here
    root = str(paths.PACKAGE_ROOT)
    env["PYTHONPATH"] = ":".join([root] + [p for p in env.get("PYTHONPATH", "").split(":") if p])
    return env
