"""The daemon's servers: nbdkit processes that each serve many devices.

A server here is one nbdkit process with our plugin in its exports-dir
mode: it serves every image whose export file the daemon has written in
``<state dir>/exports``, under the export's name, so a device is added to a
running server by writing a file, and no process is started for it.  The
servers are grouped by what only a whole process can have:

- ``shared``: every device attached with default options;
- ``mlock``: the devices attached with ``--mlock`` (mlockall is per process);
- ``nbdN``: a device with ``--stats-file`` (the counters are per process)
  or ``--processes N`` (N processes of its own, one socket and CPU each,
  connection k to process k mod N) has a group of its own, and so has a
  user's device (``owned``): its image is a descriptor the group inherits,
  since a server may not open a user's file by its path.

A group's processes are started in a session of their own and without a
death signal, so they outlive the daemon: the next daemon finds them by
the group's record (``<state dir>/servers/NAME.json``: pids and their start
times) and watches them again.  The death of any process of a group is the
death of the group: the daemon kills the rest and starts it again (see
:mod:`nbdloop.daemon.daemon`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from nbdloop import paths, process
from nbdloop.engine.config import Server
from nbdloop.serve import supervise
from nbdloop.serve.children import server_error
from nbdloop.serve.cmdline import (listen_unix, nbdkit_argv, plugin_env, process_socket,
                                   process_stats_file)

SHARED = "shared"
MLOCK = "mlock"
#: nbdkit's workers per connection of a device.  They live as long as
#: their connection, that is as long as the device, and each keeps what it
#: used under load (its ring, its bounce slots, nbdkit's request buffer):
#: after a burst of 1 MiB requests at QD16 a connection held 9.3 MiB with 4
#: workers against 29 MiB with 16 (serve's default), for about 0.93 of the
#: throughput (docs/decisions.md).
THREADS = 4
#: Seconds a new server gets to load Python, the extension and listen.
START_TIMEOUT = 60.0
#: Seconds a server gets to finish what it has read once its connections
#: are closed (an orderly stop, for restart).
DRAIN = supervise.DRAIN


class ServerError(Exception):
    """A server that would not start; one line."""

    exit_status = 1


@dataclasses.dataclass
class Group:
    """One group of server processes, as recorded."""

    name: str
    processes: int = 1
    mlock: bool = False
    stats_file: str = ""
    threads: int = THREADS
    owned: bool = False            # serves a user's image, inherited at start
    pids: list[int] = dataclasses.field(default_factory=list)
    starts: list[int] = dataclasses.field(default_factory=list)   # process_started

    def socket(self, state_dir: Path) -> str:
        """``NAME.sock``: the socket, or what the sockets of several are
        named after."""
        return str(servers_dir(state_dir) / f"{self.name}.sock")

    def sockets(self, state_dir: Path) -> list[str]:
        """Process k's socket: ``NAME.sock``, or ``NAME.sock.K`` for several."""
        base = self.socket(state_dir)
        if self.processes == 1:
            return [base]
        return [str(process_socket(base, k)) for k in range(self.processes)]

    def log(self, state_dir: Path) -> str:
        return str(servers_dir(state_dir) / f"{self.name}.log")

    def ready_files(self, state_dir: Path) -> list[Path]:
        return [servers_dir(state_dir) / f"{self.name}.{k}.pid" for k in range(self.processes)]

    def alive(self) -> bool:
        """True while every recorded process runs (the same processes: a
        pid with its start time)."""
        return bool(self.pids) and all(
            process.process_started(pid) == started
            for pid, started in zip(self.pids, self.starts))

    def same_kind(self, other: Group) -> bool:
        return (self.name, self.processes, self.mlock, self.stats_file, self.owned) == \
            (other.name, other.processes, other.mlock, other.stats_file, other.owned)


def group_for(device_name: str, *, mlock: bool, stats_file: str, processes: int,
              owned: bool = False, threads: int = THREADS) -> Group:
    """The group that serves a device with these options."""
    if stats_file or processes > 1 or owned:
        return Group(name=device_name, processes=processes, mlock=mlock,
                     stats_file=stats_file, owned=owned, threads=threads)
    return Group(name=MLOCK if mlock else SHARED, mlock=mlock, threads=threads)


def servers_dir(state_dir: Path) -> Path:
    d = state_dir / "servers"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def exports_dir(state_dir: Path) -> Path:
    d = state_dir / "exports"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


# ---- records ------------------------------------------------------------------------

def _record(state_dir: Path, name: str) -> Path:
    return servers_dir(state_dir) / f"{name}.json"


def save(state_dir: Path, group: Group) -> None:
    paths.write_whole(_record(state_dir, group.name),
                      json.dumps(dataclasses.asdict(group), indent=2) + "\n")


def load_all(state_dir: Path) -> dict[str, Group]:
    """Every recorded group; a record that does not parse is skipped."""
    found = {}
    for path in servers_dir(state_dir).glob("*.json"):
        try:
            group = Group(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        found[group.name] = group
    return found


def forget(state_dir: Path, group: Group) -> None:
    """The group's record and what its processes leave behind."""
    for path in [_record(state_dir, group.name), Path(group.log(state_dir)),
                 *map(Path, group.sockets(state_dir)), *group.ready_files(state_dir)]:
        path.unlink(missing_ok=True)


# ---- processes ----------------------------------------------------------------------

def start(state_dir: Path, group: Group, timeout: float = START_TIMEOUT,
          fds: tuple[int, ...] = ()) -> Group:
    """Start the group's processes, each inheriting ``fds`` under their own
    numbers, and wait until each listens.  Returns the group with its pids,
    recorded.  On failure nothing is left running and ServerError says why,
    from the log."""
    sockets = group.sockets(state_dir)
    ready = group.ready_files(state_dir)
    cpus = _cpus(group.processes)
    log_path = group.log(state_dir)
    procs = []
    old_umask = os.umask(0o077)
    try:
        with open(log_path, "ab") as log:
            for k, path in enumerate(sockets):
                Path(path).unlink(missing_ok=True)
                ready[k].unlink(missing_ok=True)
                listening = listen_unix(Path(path), 8)
                try:
                    server = Server(exports=(), exports_dir=str(exports_dir(state_dir)),
                                    threads=group.threads, mlock=group.mlock,
                                    stats_file=_stats_file(group, k),
                                    shared=group.processes > 1, outlive_parent=True,
                                    placement="off" if cpus else "irq",
                                    pidfile=str(ready[k]))
                    child = supervise.Child(nbdkit_argv(server, exit_with_parent=False), fds,
                                            listen=(listening.fileno(),),
                                            cpu=cpus[k] if cpus else None)
                    procs.append(supervise.popen(child, plugin_env(), stdout=log,
                                                 stderr=log, stdin=subprocess.DEVNULL,
                                                 start_new_session=True))
                finally:
                    listening.close()
    finally:
        os.umask(old_umask)
    try:
        _wait_ready(procs, ready, timeout, log_path)
    except BaseException:
        for proc in procs:
            process.kill(proc)
        raise
    pids = [proc.pid for proc in procs]
    started = dataclasses.replace(group, pids=pids,
                                  starts=[process.process_started(pid) or 0 for pid in pids])
    save(state_dir, started)
    return started


def _stats_file(group: Group, k: int) -> str | None:
    return process_stats_file(group.stats_file, k) if group.stats_file else None


def _cpus(processes: int) -> list[int]:
    """The CPUs the processes of a group of several are pinned to, one
    each in turn; none for a group of one (the plugin's placement rule
    places its workers)."""
    if processes == 1:
        return []
    on = sorted(os.sched_getaffinity(0))
    return [on[k % len(on)] for k in range(processes)]


def _wait_ready(procs, ready: list[Path], timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise ServerError(f"the server exited at start ({_status(proc.returncode)}): "
                                  f"{server_error(Path(log))}")
        if all(_ready(path) for path in ready):
            return
        if time.monotonic() > deadline:
            raise ServerError(f"the server did not start within {timeout:g} s: "
                              f"{server_error(Path(log))}")
        time.sleep(0.02)


def _ready(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def _status(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def kill(state_dir: Path, group: Group) -> None:
    """SIGKILL every process of the group and wait until they are gone (a
    killed server answers nothing, so the kernel resends what it had
    read).  Their children of ours are reaped."""
    for pid, started in zip(group.pids, group.starts):
        process.terminate(pid, lambda pid=pid, started=started:
                          process.process_started(pid) == started,
                          process.KILL_WAIT, signal.SIGKILL)
        _reap(pid)
    for path in [*map(Path, group.sockets(state_dir)), *group.ready_files(state_dir)]:
        path.unlink(missing_ok=True)


def stop(state_dir: Path, group: Group) -> None:
    """Stop the group in an orderly way: close its connections first (a
    request nbdkit reads after SIGTERM is answered with an error, which the
    kernel would pass on), let it answer what it has read, then SIGTERM;
    SIGKILL what is left after the drain time."""
    alive = [(pid, s) for pid, s in zip(group.pids, group.starts)
             if process.process_started(pid) == s]
    for pid, _ in alive:
        supervise.shutdown_sockets(pid, connected_only=True)
    deadline = time.monotonic() + DRAIN
    while any(supervise.connections(pid) for pid, _ in alive) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, started in alive:
        process.terminate(pid, lambda pid=pid, started=started:
                          process.process_started(pid) == started, 5.0)
        _reap(pid)
    kill(state_dir, group)


def _reap(pid: int) -> None:
    """Reap ``pid`` if it is our child (a server this daemon started)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def reap_children() -> None:
    """Reap every child that has exited (servers started by this daemon)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def pidfds(group: Group) -> dict[int, int]:
    """pidfd -> pid for every process of the group that still runs; the
    caller watches and closes them."""
    found = {}
    for pid, started in zip(group.pids, group.starts):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        if process.process_started(pid) != started:
            os.close(fd)
            continue
        found[fd] = pid
    return found

