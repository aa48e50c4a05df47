"""The per-device agent: what keeps ``/dev/nbdN`` working when its server dies.

``nbdloop attach`` forks one agent per device (a fork, not a new Python: a
start costs seconds on a slow machine).  The agent runs ``nbdloop serve``
(the supervisor, which runs nbdkit) as its child, negotiates the device's
connections itself (:mod:`nbdloop.kernel.handshake`) and configures the
device over netlink (:mod:`nbdloop.kernel.netlink`) with a dead-connection
timeout, so that while no server is connected the kernel holds requests
instead of failing them.

It is a separate process, not the supervisor, because the supervisor is one
of the things that die: killed, OOM-killed, or replaced by an upgrade.  When
the supervisor or nbdkit ends, or the kernel reports a connection dead, the
agent kills what is left of the server, waits until it is gone, starts a
new one on the same image, and hands the kernel new connections with
NBD_CMD_RECONFIGURE.  The kernel resends what the dead server never
answered.  The new server can open the image only once the old one's I/O
has all finished (the image's lock goes with the last reference to the dead
server's open file, which its in-flight requests hold), so a resent write
never races the one it repeats.

The agent owns its device's record (``<state dir>/nbdN.json``): it writes
the state (``starting``, ``attached``, ``recovering``, ``stale``), why, and
each recovery.  SIGUSR1 makes it disconnect the device and stop, with its
server (detach, which so needs no netlink of its own); SIGTERM stops it
and its server, leaving the device; SIGHUP makes it
stop the server in an orderly way and exec itself anew, then recover: that
is ``nbdloop restart``, which is how a new version of nbdloop takes over a
mounted device.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import psutil

from nbdloop import process
from nbdloop.kernel import handshake
from nbdloop.kernel.attach import (SERVER_STOP_TIMEOUT, Attachment, AttachError, AttachFailed,
                                   now_iso, remove_files, save, server_error, state_file)
from nbdloop.serve import children as srv
from nbdloop.serve.cmdline import ready_files

PR_SET_CHILD_SUBREAPER = 36
#: Seconds the first server gets to accept connections (it loads Python,
#: the extension and the image).
SERVER_START_TIMEOUT = 60.0


class _Stop(Exception):
    """SIGTERM arrived while the agent was busy."""


class Agent:
    """One device's agent; :meth:`run` is its whole life."""

    def __init__(self, state_dir: Path, att: Attachment, *,
                 report: Callable[[str], None] | None = None) -> None:
        self.state_dir = state_dir
        self.att = att
        # Told once whether the device is connected: "ok" or "error N: why".
        self._report = report
        self.index = int(att.name[3:])
        self.server: srv.ServerProcess | None = None
        self.pidfds: dict[int, str] = {}      # pidfd -> what it watches
        self.nl = None
        self.events = None
        self.problem = ""
        self.stopping = False
        self.detaching = False
        self.restarting = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ---- the life of the agent -----------------------------------------------------

    def run(self, resume: bool = False) -> int:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self._stay_out_of_reclaim()
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)   # wakes the poll through the fd
        self.att.agent_pid = os.getpid()
        self.att.agent_started = process.process_started(self.att.agent_pid) or 0
        try:
            if resume:
                self._open_netlink()
                if not self.recover(self.att.reason or "the agent was restarted"):
                    return 1
                self.report("ok")
            else:
                self.connect_first()
            return self.watch()
        except _Stop:
            self._disconnect()
            self.kill_server()
            return 0
        finally:
            for sock in (self.nl, self.events):
                if sock is not None:
                    sock.close()

    def connect_first(self) -> None:
        """Start the server, connect the device, report to attach."""
        self.set_state("starting", "")
        try:
            # pyroute2 takes a while to import: while the server starts.
            self.start_server(SERVER_START_TIMEOUT, meanwhile=self._open_netlink)
            socks, export = self.negotiate()
            try:
                self.nl.connect(self.index, [s.fileno() for s in socks],
                                size=export.size, block_size=self.att.block_size,
                                server_flags=self.server_flags(export),
                                timeout=self.att.timeout,
                                dead_conn_timeout=self.att.recover_timeout,
                                identifier=self.att.identifier)
            finally:
                for s in socks:
                    s.close()
        except BaseException as e:
            self.kill_server()
            remove_files(self.state_dir, self.att)
            # Its exit status too: a busy device is the user's to fix (2),
            # a server that would not start a failure (1).
            self.report(f"error {getattr(e, 'exit_status', 1)}: {one_line(e)}")
            raise SystemExit(1) from None
        self.set_state("attached", "")
        recovery = f"within {self.att.recover_timeout} s" if self.att.recover_timeout else "off"
        self.log(f"{self.att.device} attached to {self.att.image} (recovery {recovery})")
        self.report("ok")

    def watch(self) -> int:
        """Wait for a death, a dead link or a signal, and act on it."""
        while True:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in self.pidfds:
                poller.register(fd, select.POLLIN)
            poller.register(self.events.fileno(), select.POLLIN)
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                self._drain_wakeups()
            if self.stopping:
                self._disconnect()
                self.stop_server()
                return 0
            if self.restarting:
                self.restart()      # does not return unless exec fails
            dead = self.events.dead_links() if self.events.fileno() in ready else []
            if self.index in dead:
                # A server that died is seen by the kernel first, often:
                # give its end a moment to show, to name the right cause.
                ready |= set(_readable(list(self.pidfds), 1.0))
            cause = None
            for fd, what in self.pidfds.items():
                if fd in ready:
                    cause = f"{what} ended ({self.how_it_ended()})"
                    break
            if self.index in dead and cause is None:
                cause = ("the kernel found a connection dead "
                         "(a request timed out or the socket closed)")
            if cause is None:
                continue
            if self.att.recover_timeout == 0:
                self.kill_server()
                self.set_state("stale", f"{cause}; recovery is off (--recover-timeout 0)")
                self.log(f"{self.att.device}: {cause}; recovery is off, so the device fails")
                return 1
            if not self.recover(cause):
                return 1

    def recover(self, cause: str) -> bool:
        """Replace the server and hand the kernel new connections.  False,
        with the record stale and why, if that did not work in time."""
        began = time.monotonic()
        deadline = began + self.att.recover_timeout
        self.set_state("recovering", cause)
        self.log(f"{self.att.device}: {cause}; recovering")
        self.kill_server()
        problem = "no attempt"
        delay = 0.1
        while not self._replace_server(deadline):
            problem = self.problem
            left = deadline - time.monotonic()
            if left <= 0:
                took = time.monotonic() - began
                self.set_state("stale", f"{cause}; no server within "
                                        f"{self.att.recover_timeout} s: {problem}")
                self.log(f"{self.att.device}: gave up after {took:.1f} s: {problem}")
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
        took = time.monotonic() - began
        self.events.dead_links()   # the old connections' deaths, reported late
        self.att.recoveries += 1
        self.att.last_recovery = {"cause": cause, "seconds": round(took, 2), "at": now_iso()}
        self.set_state("attached", "")
        self.log(f"{self.att.device}: recovered in {took:.2f} s ({cause})")
        return True

    def _replace_server(self, deadline: float) -> bool:
        """One attempt: a new server, new connections, handed to the kernel.
        False (and why, in self.problem) if any step failed."""
        from nbdloop.kernel import netlink
        if self.stopping:
            raise _Stop
        try:
            self.start_server(max(1.0, min(SERVER_START_TIMEOUT, deadline - time.monotonic())))
            socks, _ = self.negotiate()
            try:
                self.nl.reconfigure(self.index, [s.fileno() for s in socks],
                                    identifier=self.att.identifier)
            finally:
                for s in socks:
                    s.close()
            return True
        except (srv.ServerError, handshake.HandshakeError, AttachError, OSError,
                netlink.KernelError) as e:
            self.problem = one_line(e)
            self.kill_server()
            return False

    def restart(self) -> None:
        """Stop the server in an orderly way and exec a new agent, which
        recovers: the new code, the new server, the same device."""
        self.restarting = False
        self.set_state("recovering", "restart requested")
        self.log(f"{self.att.device}: restart requested; stopping the server")
        self.stop_server()
        argv = [sys.executable, "-m", "nbdloop.kernel.agent",
                str(state_file(self.state_dir, self.att.device))]
        save(self.state_dir, self.att)
        for sock in (self.nl, self.events):
            if sock is not None:
                sock.close()
        self.nl = self.events = None
        os.execv(argv[0], argv)

    # ---- the server ------------------------------------------------------------

    def start_server(self, timeout: float, meanwhile=None) -> None:
        config = self.att.server()
        argv = srv.serve_argv(config, processes=self.att.processes, agent=True)
        server = srv.ServerProcess(argv, socket_path=self.att.socket, pidfile=config.pidfile,
                                   log=self.att.log, processes=self.att.processes)
        self.server = server
        later = None
        try:
            server.spawn()
            if meanwhile is not None:
                try:
                    meanwhile()
                except Exception as e:   # noqa: BLE001 - the server's own failure comes first
                    later = e
            server.wait_ready(timeout)
        except srv.ServerError:
            raise AttachFailed(f"the server for {self.att.image} did not start: "
                              f"{server_error(Path(self.att.log))}") from None
        self.att.pid = server.pid
        pids = server.server_pids
        self.att.server_pid, self.att.server_pids = pids[0], pids
        for pid, what in [(server.pid, f"the supervisor (pid {server.pid})")] + \
                [(pid, f"nbdkit (pid {pid})") for pid in pids]:
            try:
                self.pidfds[os.pidfd_open(pid)] = what
            except ProcessLookupError:
                raise AttachFailed(f"{what} ended as it started: "
                                  f"{server_error(Path(self.att.log))}") from None
        if later is not None:
            raise later

    def negotiate(self) -> tuple[list, handshake.Export]:
        socks: list = []
        export = None
        try:
            # Connection k to process k of a server of several (serve --processes).
            for path in itertools.islice(itertools.cycle(self.server.sockets),
                                         self.att.connections):
                sock, export = handshake.connect_unix(path)
                socks.append(sock)
        except BaseException:
            for s in socks:
                s.close()
            raise
        assert export is not None
        return socks, export

    def server_flags(self, export: handshake.Export) -> int:
        return export.flags | (handshake.NBD_FLAG_READ_ONLY if self.att.readonly else 0)

    def stop_server(self) -> None:
        """SIGTERM the supervisor (it stops nbdkit cleanly, answering what
        it has read), then make sure nothing of it is left."""
        if self.server is not None and self.server.proc is not None:
            # Not killed alone if it does not go: kill_server kills all of it.
            process.stop(self.server.proc, SERVER_STOP_TIMEOUT, kill=False)
        self.kill_server()

    def kill_server(self) -> None:
        """SIGKILL every process under the agent and reap them all: the
        supervisor, and nbdkit, which comes back to the agent (a child
        subreaper) when its supervisor dies first."""
        for fd in self.pidfds:
            os.close(fd)
        self.pidfds.clear()
        while True:
            pids = [p.pid for p in psutil.Process().children(recursive=True)]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            while True:
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    break
        if self.server is not None:
            # What a killed supervisor could not remove.
            for path in ready_files(self.att.image, self.server.pid, self.att.processes):
                path.unlink(missing_ok=True)
            for path in {self.att.socket, *self.server.sockets}:
                Path(path).unlink(missing_ok=True)
            self.server = None

    def how_it_ended(self) -> str:
        """The supervisor's exit status: its own, or the one it logs for
        nbdkit (given a moment to notice nbdkit's end)."""
        proc = self.server.proc if self.server is not None else None
        if proc is None:
            return "unknown"
        try:
            status = proc.wait(2.0)
        except subprocess.TimeoutExpired:
            return "the supervisor still runs"
        logged = re.findall(r"server exited with status (-?\d+)",
                            _tail(Path(self.att.log)))
        if status == 1 and logged:
            status = int(logged[-1])
            who = "nbdkit "
        else:
            who = ""
        if status < 0:
            try:
                return f"{who}killed by {signal.Signals(-status).name}"
            except ValueError:
                return f"{who}killed by signal {-status}"
        return f"{who}exit status {status}"

    # ---- record, log, signals ------------------------------------------------------

    def set_state(self, state: str, reason: str) -> None:
        self.att.state = state
        self.att.reason = reason
        self.att.since = time.time()
        save(self.state_dir, self.att)

    def _stay_out_of_reclaim(self) -> None:
        """A recovery runs while the kernel holds the device's writes, so the
        agent (and the servers it starts, which inherit it) must never wait
        for memory on its own device: PR_SET_IO_FLUSHER, and with --mlock
        its pages locked, as the server's are."""
        from nbdloop.engine import uring
        try:
            uring.set_io_flusher()
        except PermissionError:
            self.log("warning: PR_SET_IO_FLUSHER not permitted (no CAP_SYS_RESOURCE)")
        if self.att.mlock:
            uring.lock_memory()

    def log(self, message: str) -> None:
        print(f"nbdloop agent: {message}", file=sys.stderr, flush=True)

    def report(self, message: str) -> None:
        report, self._report = self._report, None
        if report is not None:
            report(message)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            self.restarting = True
        else:
            self.stopping = True
            self.detaching = self.detaching or signum == signal.SIGUSR1

    def _disconnect(self) -> None:
        """For detach (SIGUSR1): disconnect the kernel device first, so that
        it never sees its server go."""
        if not self.detaching or self.nl is None:
            return
        try:
            self.nl.disconnect(self.index)
        except Exception as e:    # noqa: BLE001 - detach reports a device left connected
            self.log(f"{self.att.device}: disconnect failed: {one_line(e)}")

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _open_netlink(self) -> None:
        from nbdloop.kernel import netlink   # pyroute2 is slow to import: only here
        self.nl = netlink.Nbd()
        self.events = netlink.LinkEvents()


def _readable(fds: list[int], timeout: float) -> list[int]:
    if not fds:
        return []
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout * 1000)]


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def _pipe_writer(fd: int) -> Callable[[str], None]:
    def write(message: str) -> None:
        try:
            os.write(fd, message.encode() + b"\n")
        finally:
            os.close(fd)
    return write


def _reported_error(message: str) -> AttachError:
    m = re.fullmatch(r"error ([12]): (.+)", message, re.DOTALL)
    if m is None:
        return AttachFailed(message or "the agent ended before the device was connected")
    return (AttachError if m[1] == "2" else AttachFailed)(m[2])


def notify(socket_path: str, message: str) -> None:
    """sd_notify(3): one datagram to systemd's notification socket.  Our own
    because that is all it is; python3-systemd would need libsystemd built
    in."""
    address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(message.encode(), address)


def spawn(state_dir: Path, att: Attachment) -> AttachError | None:
    """Fork the agent for ``att`` and wait until it has connected the device
    (None) or given up (why, as the error attach raises).  The agent leaves this
    process's session and terminal, and keeps none of its descriptors."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the agent
        status = 1
        try:
            os.close(r)
            os.setsid()
            _detach_stdio(att.log)
            keep = {0, 1, 2, w}
            for fd in _open_fds():
                if fd not in keep:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            status = Agent(state_dir, att,
                           report=_pipe_writer(w)).run()
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace").strip()
    if message == "ok":
        return None
    return _reported_error(message)


def run_here(state_dir: Path, att: Attachment,
             on_ready: Callable[[], None], resume: bool = False) -> int:
    """Be ``att``'s agent in this process, in the foreground (``attach
    --foreground``: the main process of a systemd service, which supervises
    it and logs what it says).  ``on_ready()`` once the device is connected;
    then watch until detach.  Returns the agent's exit status; raises the
    error attach would if the device was never connected.  ``resume``:
    take over a device whose agent died (its record is ``att``)."""
    told: list[str] = []
    # Ours alone: the servers the agent starts must not inherit it.
    notify_socket = os.environ.pop("NOTIFY_SOCKET", None)

    def report(message: str) -> None:
        told.append(message)
        if message == "ok":
            on_ready()
            if notify_socket:
                notify(notify_socket, f"READY=1\nSTATUS={att.device}: {att.image}")

    try:
        status = Agent(state_dir, att, report=report).run(resume)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    if not told:
        raise AttachFailed(f"{att.device}: the agent could not take the device over: "
                           f"{att.reason or 'no reason given'}")
    if told[0] != "ok":
        raise _reported_error(told[0])
    return status


def _detach_stdio(log: str) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def _open_fds() -> list[int]:
    return list(process.fds(os.getpid()))


def main(argv: list[str]) -> int:
    """``python -m nbdloop.kernel.agent RECORD``: the agent after exec."""
    record = Path(argv[0])
    from nbdloop.kernel.attach import read_record
    try:
        att = read_record(record)
    except (OSError, ValueError, TypeError) as e:
        # A record this version cannot read (a hand-edited one, or one
        # naming an option it does not know): one line in the log.
        print(f"nbdloop agent: {record}: cannot take the device over: {one_line(e)}",
              file=sys.stderr, flush=True)
        return 1
    return Agent(record.parent, att).run(resume=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
