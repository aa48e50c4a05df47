"""A user's own image: what the daemon, running as root, does with a file
that a member of the group ``nbdloop`` opened and sent it.

The rule is that the daemon never opens with root's rights a path that a
user named.  It gets the user's open file (SCM_RIGHTS), checks that it is
a regular file open for what the user asked, and from then on opens the
file only as the user: a process forked for it takes the user's uid, gid
and groups and reopens the file through its own ``/proc/self/fd`` link (or
by its path, when nothing of it is left open), so the kernel checks the
user's rights, never root's.

Each server gets a file of its own that way, not the one the user sent:
the user may still hold that one (its flags, such as O_DIRECT, and its
flock belong to the open file, which they share), and a server's lock
must go with that server's last I/O (see nbdloop.daemon.daemon).  The
daemon keeps the file the user sent, as the source of the next server's.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import pwd
import socket
import stat

#: How many devices one user may have attached at once, unless the daemon
#: is told otherwise (``nbdloop daemon --max-per-user``).
DEFAULT_MAX_PER_USER = 8


class UserError(Exception):
    """A user's image that cannot be served as asked; one line."""

    exit_status = 2


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who a device belongs to, with the rights its image is opened with."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return user_name(self.uid)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_sent(fd: int, image: str, readonly: bool) -> str:
    """The real path of the file a user sent for ``image``; UserError unless
    it is a regular file open for reading, and for writing too unless
    ``readonly``."""
    require_regular(fd, image)
    access = _access_mode(fd)
    if access == os.O_WRONLY or (not readonly and access != os.O_RDWR):
        raise UserError(f"{image}: sent open for {_ACCESS[access]}, not for "
                        f"{'reading' if readonly else 'reading and writing'}")
    return real_path(fd)


def require_regular(fd: int, image: str) -> None:
    """UserError, naming what it is, unless ``fd`` is a regular file."""
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else
                "a fifo" if stat.S_ISFIFO(mode) else
                "a device node" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else
                "a socket")
        raise UserError(f"{image}: is {kind}; a user attaches regular files only")


_ACCESS = {os.O_RDONLY: "reading only", os.O_WRONLY: "writing only",
           os.O_RDWR: "reading and writing"}


def _access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def real_path(fd: int) -> str:
    """Where the open file is, as the kernel says (`` (deleted)`` and all)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def reopen(owner: Owner, *, writable: bool, fd: int | None = None,
           path: str | None = None) -> int:
    """A new open file, close-on-exec, of the file open as ``fd`` (or at
    ``path``), opened with ``owner``'s rights: for reading, and writing too
    if ``writable``.  UserError, naming the errno, if the user may not."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY
    target = f"/proc/self/fd/{fd}" if fd is not None else path
    if target is None:
        raise ValueError("reopen needs fd or path")
    if path is not None:
        # Not a link the user could have put there since, and no fifo.
        flags |= os.O_NOFOLLOW | os.O_NONBLOCK
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # A forked child, not a program: it does four system calls and
        # exits, so the daemon's threads are no concern, and it costs a
        # fork instead of an interpreter's start.
        pid = os.fork()
        if pid == 0:
            _as_owner(owner, target, flags, theirs)
        theirs.close()
        data, fds, _, _ = socket.recv_fds(ours, 64, 1)
        os.waitpid(pid, 0)
    finally:
        ours.close()
        theirs.close()
    if not fds:
        err = int(data or b"0") or errno.EIO
        raise UserError(f"{path or 'the image'}: {owner.name} cannot open it for "
                        f"{'reading and writing' if writable else 'reading'}: "
                        f"{os.strerror(err)}")
    return fds[0]


def _as_owner(owner: Owner, target: str, flags: int, channel: socket.socket) -> None:
    """In the forked child: become ``owner`` and send back the open file,
    or the errno; never returns."""
    status = 0
    try:
        try:
            os.setgroups(list(owner.groups))
            os.setresgid(owner.gid, owner.gid, owner.gid)
            os.setresuid(owner.uid, owner.uid, owner.uid)
            fd = os.open(target, flags)
            os.set_blocking(fd, True)
            socket.send_fds(channel, [b"ok"], [fd])
        except OSError as e:
            channel.send(str(e.errno or errno.EIO).encode())
    except BaseException:
        status = 1
    finally:
        os._exit(status)
