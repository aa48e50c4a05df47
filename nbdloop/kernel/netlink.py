"""The kernel's NBD driver, spoken to over generic netlink (family "nbd").

nbdloop configures its devices itself rather than through nbd-client,
because nbd-client 3.24 (Debian 12) sets neither of the two things that
make a device outlive its server: a dead-connection timeout (the kernel
holds requests while no server is connected instead of failing them) and a
backend identifier (the tag that makes the kernel refuse a connection meant
for another device in NBD_CMD_RECONFIGURE).  The messages are built by
pyroute2's generic netlink layer; this module only names the attributes
(linux/nbd-netlink.h) and turns the kernel's errors into one line.

Every call needs CAP_SYS_ADMIN, as nbd-client does.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path


def _skip_pyroute2_umbrella() -> None:
    """Register the pyroute2 package without running its ``__init__``.

    That ``__init__`` imports every API pyroute2 has (iproute, ndb, ipset,
    nl80211, wireguard...): some 400 modules, which on a slow machine is
    seconds that every attach, restart and recovery would wait for.  This
    module uses only the generic netlink layer, whose modules import what
    they need themselves.  If something has imported pyroute2 already, it
    is left as it is."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        return          # the import below says what is missing
    sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)


_skip_pyroute2_umbrella()   # before the imports below

from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.generic import GenericNetlinkSocket  # noqa: E402

FAMILY = "nbd"
VERSION = 1
MCAST_GROUP = "nbd_mc_group"

CMD_CONNECT = 1
CMD_DISCONNECT = 2
CMD_RECONFIGURE = 3
CMD_LINK_DEAD = 4
CMD_STATUS = 5

#: Client flag: the kernel removes the device once it is disconnected (for
#: the devices nbdloop made on demand, beyond the module's ``nbds_max``).
CFLAG_DESTROY_ON_DISCONNECT = 1 << 0

SYS_BLOCK = Path("/sys/block")


class KernelError(Exception):
    """The kernel refused or the family is missing; the message is one line."""

    exit_status = 1

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.errno = code


class DeviceBusy(KernelError):
    """The device asked for is configured already or held open."""

    exit_status = 2


class _NbdMsg(genlmsg):
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sockets"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "device_list"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sockets(nla):
        nla_flags = NLA_F_NESTED
        nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):
            nla_flags = NLA_F_NESTED
            nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_list(nla):
        nla_flags = NLA_F_NESTED
        nla_map = (("NBD_DEVICE_ITEM_UNSPEC", "none"), ("NBD_DEVICE_ITEM", "device_item"))

        class device_item(nla):
            nla_flags = NLA_F_NESTED
            nla_map = (("NBD_DEVICE_UNSPEC", "none"), ("NBD_DEVICE_INDEX", "uint32"),
                       ("NBD_DEVICE_CONNECTED", "uint8"))


def backend_of(index: int, sys_block: Path = SYS_BLOCK) -> str | None:
    """The backend identifier the device was connected with ("" if none),
    or None when the kernel shows none (not connected)."""
    try:
        return (sys_block / f"nbd{index}" / "backend").read_text().rstrip("\n")
    except OSError:
        return None


def _bound() -> GenericNetlinkSocket:
    """A generic netlink socket bound to the NBD family."""
    sock = GenericNetlinkSocket()
    try:
        sock.bind(FAMILY, _NbdMsg)
    except NetlinkError as e:
        sock.close()
        if e.code == errno.ENOENT:
            raise KernelError("the kernel has no NBD netlink family "
                              "(load the driver: `modprobe nbd`)", e.code) from None
        raise KernelError(f"netlink: {os.strerror(e.code)}", e.code) from None
    return sock


class Nbd:
    """One generic netlink socket bound to the NBD family, for requests."""

    def __init__(self) -> None:
        self._sock = _bound()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Nbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, cmd: int, attrs: list, what: str) -> list:
        msg = _NbdMsg()
        msg["cmd"] = cmd
        msg["version"] = VERSION
        msg["attrs"] = attrs
        try:
            return list(self._sock.nlm_request(msg, msg_type=self._sock.prid,
                                               msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        except NetlinkError as e:
            raise KernelError(f"{what}: the kernel said {os.strerror(e.code)} "
                              "(its log has the reason)", e.code) from None

    @staticmethod
    def _sockets(fds: Sequence[int]) -> list:
        return ["NBD_ATTR_SOCKETS",
                {"attrs": [["NBD_SOCK_ITEM", {"attrs": [["NBD_SOCK_FD", fd]]}] for fd in fds]}]

    def connect(self, index: int, fds: Sequence[int], *, size: int, block_size: int,
                server_flags: int, timeout: int, dead_conn_timeout: int,
                identifier: str, destroy_on_disconnect: bool = False) -> int:
        """Configure nbd``index`` on the negotiated sockets ``fds`` (the
        kernel takes its own reference; the caller may close them).  Returns
        the device's index.  A device that is configured already, or held
        open, is refused with EBUSY.  An index the kernel has no device for
        makes one (the driver adds it); ``destroy_on_disconnect`` removes it
        again at disconnect."""
        attrs = [
            ["NBD_ATTR_INDEX", index],
            ["NBD_ATTR_SIZE_BYTES", size],
            ["NBD_ATTR_BLOCK_SIZE_BYTES", block_size],
            ["NBD_ATTR_SERVER_FLAGS", server_flags],
            ["NBD_ATTR_TIMEOUT", timeout],
            ["NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout],
            ["NBD_ATTR_BACKEND_IDENTIFIER", identifier],
            self._sockets(fds),
        ]
        if destroy_on_disconnect:
            attrs.append(["NBD_ATTR_CLIENT_FLAGS", CFLAG_DESTROY_ON_DISCONNECT])
        try:
            replies = self._request(CMD_CONNECT, attrs, f"connecting /dev/nbd{index}")
        except KernelError as e:
            if e.errno == errno.EBUSY:
                raise DeviceBusy(f"/dev/nbd{index} is busy (configured already, or held "
                                 "open by another program)", e.errno) from None
            raise
        for reply in replies:
            got = reply.get_attr("NBD_ATTR_INDEX")
            if got is not None:
                return got
        return index

    def reconfigure(self, index: int, fds: Sequence[int], *, identifier: str,
                    size: int | None = None, sys_block: Path = SYS_BLOCK) -> None:
        """Hand nbd``index`` new sockets in place of its dead connections,
        and a new size in bytes if ``size`` (the ioctl that would set it is
        refused on a device configured over netlink).  A device tagged with
        another identifier is refused here, in one line, before the kernel
        refuses it too."""
        tag = backend_of(index, sys_block)
        if tag is None:
            raise KernelError(f"/dev/nbd{index} is not connected: nothing to reconfigure")
        if tag != identifier:
            raise KernelError(f"/dev/nbd{index} belongs to {tag or 'an untagged client'!r}, "
                              f"not to {identifier!r}: refusing to hand it a connection")
        attrs = [["NBD_ATTR_INDEX", index], ["NBD_ATTR_BACKEND_IDENTIFIER", identifier],
                 self._sockets(fds)]
        if size is not None:
            attrs.append(["NBD_ATTR_SIZE_BYTES", size])
        self._request(CMD_RECONFIGURE, attrs, f"reconfiguring /dev/nbd{index}")

    def disconnect(self, index: int) -> None:
        self._request(CMD_DISCONNECT, [["NBD_ATTR_INDEX", index]],
                      f"disconnecting /dev/nbd{index}")


class LinkEvents:
    """The kernel's NBD_CMD_LINK_DEAD events, on a socket of their own (so
    that an event never lands among a request's replies), read without
    blocking whenever :meth:`fileno` is readable."""

    def __init__(self) -> None:
        self._sock = _bound()
        try:
            self._sock.add_membership(MCAST_GROUP)
        except (OSError, KeyError) as e:
            self._sock.close()
            raise KernelError(f"cannot watch the NBD driver's events: {e}") from None
        self._raw = socket.socket(fileno=os.dup(self._sock.fileno()))

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()
        self._sock.close()

    def dead_links(self) -> list[int]:
        """The device indexes of the link-dead events waiting now."""
        found = []
        while True:
            try:
                data = self._raw.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return found
            offset = 0
            while offset + 16 <= len(data):
                length = int.from_bytes(data[offset:offset + 4], sys.byteorder)
                if length < 16:
                    break
                msg = _NbdMsg(data[offset:offset + length])
                try:
                    msg.decode()
                except Exception:    # noqa: BLE001 - not ours to understand
                    msg = None
                if msg is not None and msg["cmd"] == CMD_LINK_DEAD:
                    index = msg.get_attr("NBD_ATTR_INDEX")
                    if index is not None:
                        found.append(index)
                offset += (length + 3) & ~3
