"""The daemon's state and what it does with it: attach, detach, list,
restart, resize, and keep every device served.

Root may ask anything; a member of the group ``nbdloop`` attaches images
it sends open, which the daemon opens again only with that user's rights
(:mod:`nbdloop.daemon.users`), and detaches, restarts and resizes only
its own devices.

One :class:`Daemon` owns every attachment of the host: its record, the
export its server serves, the kernel's device (over netlink) and the watch
on its server.  Requests come from the control socket's threads
(:mod:`nbdloop.daemon.control`); deaths come to :meth:`Daemon.watch`, the
main thread, as pidfds that become readable and the kernel's link-dead
events.  One lock serialises every change; ``list`` reads without it, so
that it answers at once even during a recovery.

Recovery is per server group (:mod:`nbdloop.daemon.servers`): when a
process of a group ends, or the kernel finds a connection to it dead, the
daemon kills what is left of the group, waits until it is gone (a killed
server answers nothing, so the kernel resends what it had read; and a new
server can open an image only once the old one's I/O has finished, since
the image's lock goes with the last reference to its open file), starts it
again and hands each of its devices new connections with
NBD_CMD_RECONFIGURE.  Meanwhile the kernel holds the devices' requests for
up to their ``--recover-timeout``.

A daemon that starts takes over what the one before left (:meth:`take_over`):
the records say which devices and groups there are, the kernel and /proc
say which are still alive; what was half done is finished or undone, so
that there is never a server without a device, nor a device without a
record.
"""
from __future__ import annotations

import dataclasses
import os
import select
import signal
import threading
import time
from pathlib import Path

from nbdloop import paths, process
from nbdloop.daemon import servers, users
from nbdloop.daemon.control import Refusal, Request
from nbdloop.engine.backing import discover_alignment
from nbdloop.engine.config import ConfigError, Export, export_from_json, export_json
from nbdloop.errors import one_line_error
from nbdloop.kernel import attach as A
from nbdloop.kernel import handshake, nodes, table

CRASH_AT_ENV = "NBDLOOP_DAEMON_CRASH_AT"
#: Across an exec: the users' images the daemon keeps, ``nbd3:7,nbd5:9``.
KEPT_FDS_ENV = "NBDLOOP_DAEMON_KEPT_FDS"
#: Seconds detach waits for the kernel to let a device go (and to remove
#: one it made).
DISCONNECT_TIMEOUT = 30.0
#: Seconds an agent of an nbdloop before the daemon gets to stop (its
#: server's drain time, and a moment for itself).
AGENT_STOP_TIMEOUT = servers.DRAIN + 10.0


class Daemon:
    """Every attachment of the host, and the servers that serve them."""

    def __init__(self, state_dir: Path, log=None, sys_block: Path = A.SYS_BLOCK,
                 max_per_user: int = users.DEFAULT_MAX_PER_USER) -> None:
        self.state_dir = state_dir
        self.max_per_user = max_per_user
        self.sys_block = sys_block      # where the kernel shows its devices
        self.log = log or (lambda message: None)
        self.lock = threading.RLock()
        self.devices: dict[str, A.Attachment] = {a.device: a for a in A.load(state_dir)}
        self.groups: dict[str, servers.Group] = servers.load_all(state_dir)
        self.watched: dict[int, tuple[str, int]] = {}    # pidfd -> (group, pid)
        self.nl = None
        self.events = None
        self.late_dead: set[int] = set()    # link-dead events read during a recovery
        self.restart_requested = False
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A user's device: the file the user sent, kept as the source of its
        # servers' files (nbdloop.daemon.users).
        self.kept: dict[str, int] = _inherited_kept()

    # ---- the control socket's requests ------------------------------------------------

    def methods(self) -> dict:
        return {name: _answering(getattr(self, name)) for name in
                ("attach", "detach", "list", "restart", "resize")}

    def attach(self, request: Request) -> dict:
        """Serve an image and connect a kernel device to it; the record.
        A user sends the image open, and may attach nothing else."""
        image, options = _attach_params(request.params)
        owner = _owner(request)
        sent = request.fds.pop(0) if owner and request.fds else None
        if owner and sent is None:
            raise Refusal(f"{image}: a user's attach sends the image, open")
        try:
            with self.lock:
                return self._attach(image, options, owner, sent).as_dict()
        finally:
            if sent is not None:
                os.close(sent)

    def _attach(self, image: str, options: A.Options, owner: users.Owner | None,
                sent: int | None) -> A.Attachment:
        if owner:
            self._check_user(owner, options)
            real = users.check_sent(sent, image, options.readonly)
            fd = users.reopen(owner, writable=not options.readonly, fd=sent)
            try:
                options, _, _ = A.check_options(image, options, fd=fd)
                image_id = list(users.identity(fd))
            finally:
                os.close(fd)
        else:
            options, _, _ = A.check_options(image, options)
            real = os.path.realpath(image)
            image_id = []
        if options.ref:
            self._check_ref(options.ref, owner)
        for other in self.devices.values():
            if other.image == real:
                hint = (f" (it is stale: `nbdloop detach {other.device}` cleans up)"
                        if A.state_of(other, self.sys_block) == "stale" else "")
                raise A.AttachError(f"{image}: already attached to {other.device}{hint}")
        device, made = A.choose_device(set(self.devices), options.device,
                                       self.sys_block)
        name = os.path.basename(device)
        spec = servers.group_for(name, mlock=options.mlock,
                                 stats_file=options.stats_file or "",
                                 processes=options.processes, owned=owner is not None)
        att = A.Attachment(
            device=device, image=real, mode=options.mode, readonly=options.readonly,
            socket=spec.socket(self.state_dir), pid=0, server_pid=0,
            connections=options.connections, block_size=options.block_size,
            log=spec.log(self.state_dir), started=A.now_iso(), timeout=options.timeout,
            recover_timeout=options.recover_timeout, identifier=A.new_identifier(real),
            mlock=options.mlock, stats_file=options.stats_file or "",
            offset=options.offset, sizelimit=options.sizelimit, partscan=options.partscan,
            processes=options.processes, group=spec.name, export=name, made=made,
            since=time.time(), ref=options.ref or "",
            owner=owner.uid if owner else 0, owner_gid=owner.gid if owner else 0,
            owner_groups=list(owner.groups) if owner else [], image_id=image_id)
        if owner:
            self.kept[device] = os.dup(sent)
        else:
            self._write_export(att)     # a user's: as its server starts, with its file
        self.devices[device] = att
        A.save(self.state_dir, att)
        _crash_point("attach-recorded")
        try:
            nodes.announce(att)
            group = self._running_group(spec)
            _crash_point("attach-served")
            self._connect(att, group)
        except BaseException:
            self._forget(att)
            raise
        _crash_point("attach-connected")
        self._set_state(att, "attached", "")
        nodes.claim(att, self.sys_block)
        self.log(f"{device} attached to {real}"
                 + (f" for {owner.name}" if owner else ""))
        if options.partscan:
            try:
                A.read_partitions(device)
            except A.AttachFailed:
                self._detach(att, A.state_of(att, self.sys_block))
                raise
            nodes.claim(att, self.sys_block)
        return att

    def detach(self, request: Request) -> dict:
        """Disconnect a device and forget it; the record and its state before."""
        target = _text_param(request.params, "target")
        with self.lock:
            att = self._find(target)
            _may_change(att, request, "detach")
            state = A.state_of(att, self.sys_block)
            if A.device_connected(att.device, self.sys_block):
                why = A.in_use(att.device)
                if why:
                    raise A.AttachError(f"{att.device} is {why}: unmount it first")
            before = att.as_dict()
            self._detach(att, state)
            return {"attachment": before, "state": state}

    def list(self, request: Request) -> dict:
        """Every attachment, as ``list --json`` shows it."""
        now = time.time()
        return {"attachments": [A.describe(a, self.sys_block, now=now) for a in
                                sorted(list(self.devices.values()), key=lambda a: a.index)]}

    def restart(self, request: Request) -> dict:
        """Stop the server of a device in an orderly way and start the
        daemon again, with the nbdloop now installed: it takes the devices
        over with a new server.  Every device of that server goes through
        it (they share it).  Answers before the daemon starts again."""
        target = _text_param(request.params, "target")
        with self.lock:
            att = self._find(target)
            _may_change(att, request, "restart")
            if att.state == "stale":
                raise A.AttachError(f"{att.device} is stale ({att.reason}): "
                                    "detach it and attach again")
            before = att.as_dict()
            group = self.groups.get(att.group)
            for other in self._devices_of(att.group):
                self._set_state(other, "recovering", "restart requested")
            if group is not None:
                self._unwatch(group.name)
                self.log(f"restart requested for {att.device}: stopping server "
                         f"{group.name} (pids {', '.join(map(str, group.pids))})")
                servers.stop(self.state_dir, group)
            self.restart_requested = True
            self.wake()
            return {"attachment": before}

    def resize(self, request: Request) -> dict:
        """Give a device its image's size now (``losetup -c``), first making
        the image ``size`` bytes from the device's offset if asked.  The
        device's connections are renewed (the server fixes a connection's
        size at its handshake): every device of its server goes through a
        restart of it, as for ``restart``.  Returns the record and the
        sizes before and after."""
        target = _text_param(request.params, "target")
        size = request.params.get("size")
        if size is not None and (type(size) is not int or size <= 0):
            raise Refusal("size must be a positive number of bytes")
        preallocate = request.params.get("preallocate") is True
        shrink = request.params.get("shrink") is True
        with self.lock:
            att = self._find(target)
            _may_change(att, request, "resize")
            before, after = self._resize(att, size, preallocate, shrink)
            return {"attachment": att.as_dict(), "before": before, "after": after}

    def _resize(self, att: A.Attachment, size: int | None, preallocate: bool,
                shrink: bool) -> tuple[int, int]:
        state = A.state_of(att, self.sys_block)
        if state != "attached":
            raise A.AttachError(f"{att.device} is {state}"
                                + (f" ({att.reason})" if att.reason else "")
                                + ": it can be resized only while attached")
        if size is not None and att.readonly:
            raise A.AttachError(f"{att.device} is read-only: its image is not made larger")
        renewed = self._devices_of(att.group)
        off = [a.device for a in renewed if a.recover_timeout == 0]
        if off:
            raise A.AttachError(f"resizing {att.device} renews the connections of "
                                f"{', '.join(a.device for a in renewed)}, and "
                                f"{', '.join(off)} has recovery off (--recover-timeout 0)")
        before = A.device_size(att.device, self.sys_block)
        fd = self._image_file(att, writable=size is not None)
        try:
            st = os.fstat(fd)
            have = st.st_size
            after = size if size is not None else (att.sizelimit or have - att.offset)
            end = att.offset + after
            A.check_resize(att, after, discover_alignment(fd, st)[0])
            if size is None and end > have:
                raise A.AttachError(f"{att.device}: its slice ends at {end}, past the end of "
                                    f"{att.image} ({have} bytes)")
            if after < before:
                if not shrink:
                    raise A.AttachError(f"{att.device}: {after} bytes is smaller than its "
                                        f"{before}: give --shrink to drop the rest")
                why = A.in_use(att.device)
                if why:
                    raise A.AttachError(f"{att.device} is {why}: it is not made smaller")
            if end > have:
                A.grow_image(fd, att.image, end, preallocate)
            if att.sizelimit:
                att.sizelimit = after
                if not att.owner:       # a user's: written as its new server starts
                    self._write_export(att)
            A.save(self.state_dir, att)
            if after != before:
                self._renew(att, after)
            if size is not None and end < have and not att.sizelimit:
                # Only once the device no longer reaches past the new end.
                os.ftruncate(fd, end)
        finally:
            os.close(fd)
        self.log(f"{att.device} resized from {before} to {after} bytes")
        return before, after

    def _renew(self, att: A.Attachment, size: int) -> None:
        """New connections for every device of ``att``'s group, from a new
        server, and ``size`` for ``att``'s."""
        group = self.groups.get(att.group)
        if group is not None:
            self._unwatch(group.name)
            servers.stop(self.state_dir, group)
        self.recover(att.group, f"resize of {att.device}", sizes={att.device: size})
        if att.state != "attached":
            raise A.AttachFailed(f"{att.device}: the resize failed: {att.reason}")

    def _image_file(self, att: A.Attachment, writable: bool) -> int:
        """The device's image, open: root's by its path, a user's as the user."""
        if att.owner:
            return users.reopen(_owner_of(att), writable=writable, fd=self._kept(att))
        try:
            return os.open(att.image, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            raise A.AttachError(f"{att.image}: cannot open it: {e.strerror}") from None

    def _check_user(self, owner: users.Owner, options: A.Options) -> None:
        """What a user may not attach, or no more of."""
        for name, value in (("stats-file", options.stats_file), ("mlock", options.mlock),
                            ("processes", options.processes > 1)):
            if value:
                raise Refusal(f"--{name} is root's option")
        have = sum(1 for a in self.devices.values() if a.owner == owner.uid)
        if have >= self.max_per_user:
            raise Refusal(f"{owner.name} has {have} devices attached, as many as a user "
                          f"may (nbdloop daemon --max-per-user)")

    def _check_ref(self, ref: str, owner: users.Owner | None) -> None:
        for other in self.devices.values():
            if other.ref == ref:
                raise A.AttachError(f"reference {ref!r} is taken by {other.device}")
        if owner:
            try:
                entries = table.read(paths.attachments_table())
            except table.TableError:
                entries = []
            for entry in entries:
                if f"ref={ref}" in entry.options:
                    raise A.AttachError(f"reference {ref!r} is root's: the table of "
                                        f"attachments gives it to {entry.image}")

    # ---- a user's image -------------------------------------------------------------

    def _kept(self, att: A.Attachment) -> int:
        """The file of a user's image that the daemon keeps: the one the user
        sent; after a daemon that ended, the one its server has; else the
        file at the image's path, opened as the user, if it is still the
        same file."""
        fd = self.kept.get(att.device)
        if fd is not None:
            return fd
        fd = self._from_server(att)
        if fd is None:
            fd = users.reopen(_owner_of(att), writable=not att.readonly, path=att.image)
            if list(users.identity(fd)) != att.image_id:
                os.close(fd)
                raise users.UserError(f"{att.image} is not the file that was attached "
                                      "(it was moved or replaced)")
        self.kept[att.device] = fd
        return fd

    def _from_server(self, att: A.Attachment) -> int | None:
        """The server's copy of a user's image, if its server still runs."""
        group = self.groups.get(att.group)
        try:
            export = export_from_json(A.export_file(self.state_dir, att).read_bytes())
        except (OSError, ConfigError):
            return None
        if group is None or export.fd is None or not group.alive():
            return None
        try:
            pidfd = os.pidfd_open(group.pids[0])
        except OSError:
            return None
        try:
            return process.getfd(pidfd, export.fd)
        finally:
            os.close(pidfd)

    def kept_env(self) -> str:
        """The kept files, inheritable, as an exec passes them on."""
        for fd in self.kept.values():
            os.set_inheritable(fd, True)
        return ",".join(f"{os.path.basename(d)}:{fd}" for d, fd in self.kept.items())

    # ---- attach and detach, inside ------------------------------------------------

    def _find(self, target: str) -> A.Attachment:
        att = A.find(list(self.devices.values()), target)
        if att is None:
            raise A.AttachError(f"{target}: not attached (see nbdloop list)")
        return att

    def _devices_of(self, group: str) -> list[A.Attachment]:
        return [a for a in self.devices.values() if a.group == group]

    def _write_export(self, att: A.Attachment, fd: int | None = None) -> None:
        servers.exports_dir(self.state_dir)
        paths.write_whole(A.export_file(self.state_dir, att),
                          export_json(Export(image=att.image, mode=att.mode,
                                             readonly=att.readonly, name=att.export,
                                             offset=att.offset, length=att.sizelimit,
                                             fd=fd)) + "\n")

    def _running_group(self, spec: servers.Group) -> servers.Group:
        """The group ``spec`` names, started if it does not run."""
        group = self.groups.get(spec.name)
        if group is not None and group.same_kind(spec) and group.alive():
            return group
        if group is not None:
            self._unwatch(group.name)
            servers.kill(self.state_dir, group)
        group = self._start(spec)
        self.groups[group.name] = group
        self._watch(group)
        return group

    def _start(self, spec: servers.Group) -> servers.Group:
        """Start a group; a user's device's gets a file of its own, opened as
        the user, so that its lock and flags are that server's alone."""
        if not spec.owned:
            return servers.start(self.state_dir, spec)
        att = self._devices_of(spec.name)[0]
        fd = users.reopen(_owner_of(att), writable=not att.readonly, fd=self._kept(att))
        try:
            self._write_export(att, fd)
            return servers.start(self.state_dir, spec, fds=(fd,))
        finally:
            os.close(fd)

    def _connections(self, att: A.Attachment, group: servers.Group):
        """The device's connections, negotiated: connection k to process
        k mod n of its group."""
        paths = group.sockets(self.state_dir)
        socks = []
        export = None
        try:
            for k in range(att.connections):
                sock, export = handshake.connect_unix(paths[k % len(paths)],
                                                      export_name=att.export)
                socks.append(sock)
        except BaseException:
            for s in socks:
                s.close()
            raise
        att.pid = att.server_pid = group.pids[0]
        att.server_pids = list(group.pids)
        return socks, export

    def _connect(self, att: A.Attachment, group: servers.Group) -> None:
        nl = self._kernel()
        socks, export = self._connections(att, group)
        try:
            flags = export.flags | (handshake.NBD_FLAG_READ_ONLY if att.readonly else 0)
            nl.connect(att.index, [s.fileno() for s in socks], size=export.size,
                       block_size=att.block_size, server_flags=flags, timeout=att.timeout,
                       dead_conn_timeout=att.recover_timeout, identifier=att.identifier,
                       destroy_on_disconnect=att.made)
        finally:
            for s in socks:
                s.close()

    def _reconnect(self, att: A.Attachment, group: servers.Group,
                   size: int | None = None) -> None:
        nl = self._kernel()
        socks, _ = self._connections(att, group)
        try:
            nl.reconfigure(att.index, [s.fileno() for s in socks], identifier=att.identifier,
                           size=size)
        finally:
            for s in socks:
                s.close()

    def _detach(self, att: A.Attachment, state: str) -> None:
        from nbdloop.kernel import netlink
        self._set_state(att, "detaching", "")
        _crash_point("detach-marked")
        if A.device_connected(att.device, self.sys_block):
            try:
                self._kernel().disconnect(att.index)
            except netlink.KernelError as e:
                if state != "stale":
                    self._set_state(att, state, att.reason)
                    raise A.AttachFailed(f"{att.device}: {e}") from None
            _wait_until(lambda: not A.device_connected(att.device, self.sys_block),
                        DISCONNECT_TIMEOUT)
        if att.made:
            # The kernel removes a device it made at disconnect, a moment later.
            _wait_until(lambda: not (self.sys_block / att.name).exists(), DISCONNECT_TIMEOUT)
        _crash_point("detach-disconnected")
        self._forget(att)
        self.log(f"{att.device} detached from {att.image}")

    def _forget(self, att: A.Attachment) -> None:
        """The attachment's record and export, its udev properties, and its
        group if it was the group's last device."""
        nodes.release(att, self.sys_block)
        A.remove(self.state_dir, att)
        self.devices.pop(att.device, None)
        group = self.groups.get(att.group)
        if group is not None and not self._devices_of(group.name):
            self._unwatch(group.name)
            servers.stop(self.state_dir, group)
            servers.forget(self.state_dir, group)
            del self.groups[group.name]
        kept = self.kept.pop(att.device, None)
        if kept is not None:
            os.close(kept)

    def _set_state(self, att: A.Attachment, state: str, reason: str) -> None:
        att.state = state
        att.reason = reason
        att.since = time.time()
        A.save(self.state_dir, att)

    # ---- watching ----------------------------------------------------------------

    def _kernel(self):
        """The netlink sockets, opened at first use: pyroute2 is slow to
        import, and a daemon with no device needs none."""
        if self.nl is None:
            from nbdloop.kernel import netlink
            self.nl = netlink.Nbd()
            self.events = netlink.LinkEvents()
            self.wake()
        return self.nl

    def _watch(self, group: servers.Group) -> None:
        for fd, pid in servers.pidfds(group).items():
            self.watched[fd] = (group.name, pid)
        self.wake()

    def _unwatch(self, name: str) -> None:
        for fd in [fd for fd, (g, _) in self.watched.items() if g == name]:
            os.close(fd)
            del self.watched[fd]

    def wake(self) -> None:
        """Make watch() look again: at new pidfds, or the flags a signal set."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def watch(self) -> None:
        """Until :attr:`stopping` or :attr:`restart_requested`: wait for a
        server's death or a dead link, and recover."""
        while not (self.stopping or self.restart_requested):
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in list(self.watched):
                poller.register(fd, select.POLLIN)
            if self.events is not None:
                poller.register(self.events.fileno(), select.POLLIN)
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            servers.reap_children()
            with self.lock:
                if self.stopping or self.restart_requested:
                    return
                self._handle(ready)

    def _handle(self, ready: set[int]) -> None:
        causes: dict[str, str] = {}
        for fd in ready & set(self.watched):
            name, pid = self.watched[fd]
            causes.setdefault(name, f"nbdkit (pid {pid}) ended")
        dead = set(self.late_dead)
        self.late_dead.clear()
        if self.events is not None and self.events.fileno() in ready:
            dead |= set(self.events.dead_links())
        if dead and not causes:
            # A server that died is often seen by the kernel first: give its
            # end a moment to show, to name the right cause.
            for fd in _readable(list(self.watched), 1.0):
                name, pid = self.watched[fd]
                causes.setdefault(name, f"nbdkit (pid {pid}) ended")
        for att in list(self.devices.values()):
            if att.index in dead and att.state == "attached" and att.group not in causes:
                causes[att.group] = (f"the kernel found a connection of {att.device} dead "
                                     "(a request timed out or the socket closed)")
        for name, cause in causes.items():
            self.recover(name, cause)

    # ---- recovery ------------------------------------------------------------------

    def recover(self, name: str, cause: str, sizes: dict[str, int] | None = None) -> None:
        """Replace group ``name`` and hand each of its devices new
        connections (and the device a size if ``sizes`` has one for it); a
        device whose recovery time runs out goes stale."""
        self._unwatch(name)
        group = self.groups.get(name)
        if group is not None:
            servers.kill(self.state_dir, group)
        devices = [a for a in self._devices_of(name) if a.state in ("attached", "recovering")]
        if not devices:
            if group is not None:
                servers.forget(self.state_dir, group)
                self.groups.pop(name, None)
            return
        began = time.monotonic()
        pending = []
        for att in devices:
            if att.recover_timeout == 0:
                self._set_state(att, "stale", f"{cause}; recovery is off (--recover-timeout 0)")
                self.log(f"{att.device}: {cause}; recovery is off, so the device fails")
            else:
                self._set_state(att, "recovering", cause)
                pending.append(att)
        if not pending:
            return
        self.log(f"{cause}; recovering {', '.join(a.device for a in pending)}")
        spec = group or self._spec_of(pending[0])
        problem = "no attempt"
        delay = 0.1
        while pending:
            try:
                group = self._running_group(spec)
            except (servers.ServerError, users.UserError) as e:
                # A user's image the user may no longer open is a server
                # that cannot start: the device waits, then goes stale.
                problem = str(e)
                group = None
            for att in list(pending) if group is not None else []:
                try:
                    self._reconnect(att, group, (sizes or {}).get(att.device))
                except Exception as e:    # noqa: BLE001 - each device tries again
                    known = one_line_error(e)
                    if known is None and not isinstance(e, OSError):
                        raise
                    problem = known[1] if known else str(e)
                    continue
                took = time.monotonic() - began
                att.recoveries += 1
                att.last_recovery = {"cause": cause, "seconds": round(took, 2),
                                     "at": A.now_iso()}
                self._set_state(att, "attached", "")
                self.log(f"{att.device}: recovered in {took:.2f} s ({cause})")
                pending.remove(att)
            for att in list(pending):
                if time.monotonic() - began >= att.recover_timeout:
                    self._set_state(att, "stale", f"{cause}; no server within "
                                                  f"{att.recover_timeout} s: {problem}")
                    self.log(f"{att.device}: gave up: {problem}")
                    pending.remove(att)
            if pending:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        if self.events is not None:
            # The old connections' deaths, reported late; another device's stay.
            recovered = {a.index for a in devices}
            self.late_dead |= set(self.events.dead_links()) - recovered

    def _spec_of(self, att: A.Attachment) -> servers.Group:
        return servers.group_for(att.name, mlock=att.mlock, stats_file=att.stats_file,
                                 processes=att.processes, owned=att.owner != 0)

    # ---- a new daemon ----------------------------------------------------------------

    def take_over(self) -> None:
        """Make the records, the kernel and the servers agree again after
        the daemon before this one ended, however it ended."""
        from nbdloop.kernel import netlink
        to_recover: dict[str, str] = {}
        with self.lock:
            for att in sorted(list(self.devices.values()), key=lambda a: a.index):
                cause = self._take_over_device(att)
                if cause is not None:
                    to_recover.setdefault(att.group, cause)
            for name, group in list(self.groups.items()):
                if not self._devices_of(name):
                    # Started for a device whose attach did not finish.
                    servers.kill(self.state_dir, group)
                    servers.forget(self.state_dir, group)
                    del self.groups[name]
                elif name not in to_recover:
                    if group.alive():
                        self._watch(group)
                    else:
                        to_recover[name] = "its server died while no daemon ran"
            for att in self.devices.values():
                if att.owner and att.device not in self.kept:
                    # While its server still has it: that server may die next.
                    fd = self._from_server(att)
                    if fd is not None:
                        self.kept[att.device] = fd
            known = {a.index for a in self.devices.values()}
            for device in A.nbd_devices(self.sys_block):
                index = int(device[8:])
                tag = netlink.backend_of(index, self.sys_block)
                if index not in known and tag and tag.startswith("nbdloop:"):
                    # Connected by an attach that died before its record said so.
                    self.log(f"{device}: connected with no record; disconnecting it")
                    try:
                        self._kernel().disconnect(index)
                    except netlink.KernelError as e:
                        self.log(f"{device}: {e}")
            exports = servers.exports_dir(self.state_dir)
            wanted = {A.export_file(self.state_dir, a).name for a in self.devices.values()}
            for path in exports.glob("*.json"):
                if path.name not in wanted:
                    path.unlink(missing_ok=True)
            for name, cause in to_recover.items():
                if self._devices_of(name):
                    self.recover(name, cause)

    def _take_over_device(self, att: A.Attachment) -> str | None:
        """One record: finished, undone or kept.  Returns why its group
        must be recovered, if it must."""
        from nbdloop.kernel import netlink
        cause = None
        if att.agent_pid:
            cause = self._take_from_agent(att)
        if att.state == "detaching":
            self._detach(att, "stale")
            return None
        connected = (A.device_connected(att.device, self.sys_block)
                     and netlink.backend_of(att.index, self.sys_block) == att.identifier)
        if not connected:
            if att.state == "starting":
                # The attach ended before the kernel connected the device.
                self._forget(att)
            elif att.state != "stale":
                self._set_state(att, "stale", "the device was disconnected while no daemon "
                                              "ran (its recovery time ran out, or nbd-client "
                                              "-d)")
            return None
        if att.state == "starting":
            self._set_state(att, "attached", "")
        if att.state == "recovering" and cause is None:
            cause = att.reason or "the daemon was restarted"
        return cause

    def _take_from_agent(self, att: A.Attachment) -> str:
        """A device of an nbdloop before the daemon: its agent stops (SIGTERM
        stops it and its server, and leaves the device connected), and the
        device joins a group of ours."""
        if att.agent_alive():
            self.log(f"{att.device}: taking it over from its agent (pid {att.agent_pid})")
            process.terminate(att.agent_pid, att.agent_alive, AGENT_STOP_TIMEOUT)
        marks = (att.socket.encode(), f"file={att.image}".encode())
        for pid in [att.pid, *(att.server_pids or [att.server_pid])]:
            # What a killed agent left: its supervisor and nbdkit, known by
            # the socket or the image their command line names.
            def serves(pid=pid) -> bool:
                return any(mark in arg for arg in process.cmdline(pid) or [] for mark in marks)
            if pid > 0:
                process.terminate(pid, serves, 10.0, signal.SIGKILL)
        spec = self._spec_of(att)
        att.group, att.export, att.agent_pid, att.agent_started = spec.name, att.name, 0, 0
        att.socket, att.log = spec.socket(self.state_dir), spec.log(self.state_dir)
        self._write_export(att)
        if att.state not in ("starting", "detaching", "stale"):
            att.state = "recovering"
        A.save(self.state_dir, att)
        return "taken over from the agent of an nbdloop before the daemon"


def _crash_point(step: str) -> None:
    """Fault injection for the tests that kill the daemon in the middle of
    an attach or a detach: SIGKILL here when $NBDLOOP_DAEMON_CRASH_AT names
    this step (attach-recorded, attach-served, attach-connected,
    detach-marked, detach-disconnected)."""
    if os.environ.get(CRASH_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _readable(fds: list[int], timeout: float) -> list[int]:
    if not fds:
        return []
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout * 1000)]


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _answering(method):
    """A request handler whose errors of ours are refusals in one line,
    with the exit status the command should end with."""
    def handler(request: Request):
        try:
            return method(request)
        except Refusal:
            raise
        except Exception as e:
            known = one_line_error(e)
            if known is None:
                raise
            raise Refusal(known[1], known[0]) from None
    handler.__name__ = method.__name__
    return handler


def _owner(request: Request) -> users.Owner | None:
    """The user who asks, if not root."""
    if request.uid == 0:
        return None
    return users.Owner(request.uid, request.gid, tuple(request.groups))


def _owner_of(att: A.Attachment) -> users.Owner:
    return users.Owner(att.owner, att.owner_gid, tuple(att.owner_groups))


def _may_change(att: A.Attachment, request: Request, what: str) -> None:
    """Root may change any device; a user, their own."""
    if request.uid != 0 and att.owner != request.uid:
        whose = f"{users.user_name(att.owner)}'s" if att.owner else "root's"
        raise Refusal(f"{att.device} is {whose}: only its owner and root may {what} it")


def _inherited_kept() -> dict[str, int]:
    """The kept files the daemon before an exec passed on."""
    kept = {}
    for item in filter(None, os.environ.pop(KEPT_FDS_ENV, "").split(",")):
        name, _, fd = item.partition(":")
        os.set_inheritable(int(fd), False)
        kept[f"/dev/{name}"] = int(fd)
    return kept


def _text_param(params: dict, name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise Refusal(f"{name} must be a non-empty string")
    return value


def _attach_params(params: dict) -> tuple[str, A.Options]:
    image = _text_param(params, "image")
    if not os.path.isabs(image):
        raise Refusal(f"{image}: the image's path must be absolute")
    options = params.get("options", {})
    if not isinstance(options, dict):
        raise Refusal("options must be an object")
    fields = {f.name: f for f in dataclasses.fields(A.Options)}
    for name, value in options.items():
        if name not in fields:
            raise Refusal(f"unknown option {name!r}")
        kind = _OPTIONAL.get(name, type(fields[name].default))
        if value is None and name in _OPTIONAL:
            continue
        if type(value) is not kind:
            raise Refusal(f"option {name!r} must be {kind.__name__}, not {value!r}")
        if kind is int and not _RANGES.get(name, (0, 1 << 62))[0] <= value <= \
                _RANGES.get(name, (0, 1 << 62))[1]:
            raise Refusal(f"option {name!r}: {value} is out of range")
    return image, A.Options(**options)


#: Options that may be None (attach chooses), and their type otherwise.
_OPTIONAL = {"device": str, "block_size": int, "stats_file": str, "ref": str}
#: The ranges the command line's options have.
_RANGES = {"connections": (1, 16), "processes": (1, 64), "timeout": (1, 3600),
           "recover_timeout": (0, 86400), "block_size": (512, 4096)}
