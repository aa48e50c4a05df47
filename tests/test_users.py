"""A user's image as the daemon handles it (nbdloop.daemon.users): what a
user sent is checked, and every file the daemon makes of it is opened with
the user's rights, never root's.  Real credentials: a forked child becomes
``nobody`` with the kernel's own setresuid."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from nbdloop.daemon import users

NOBODY = users.Owner(65534, 65534)


@pytest.fixture
def files():
    """A directory anyone may enter (pytest's own are root's alone, so a
    path in them would be refused whatever the file): nobody's image in
    it, and root's."""
    top = Path(tempfile.mkdtemp(prefix="nbdloop-users-", dir="/tmp"))
    top.chmod(0o755)
    yield top / "mine.img", top / "root.img"
    shutil.rmtree(top)


@pytest.fixture(autouse=True)
def _made(files):
    mine, roots = files
    mine.write_bytes(b"\0" * 4096)
    mine.write_bytes(b"\0" * 4096)
    os.chown(mine, NOBODY.uid, NOBODY.gid)
    mine.chmod(0o600)
    roots.write_bytes(b"\0" * 4096)
    roots.chmod(0o600)


def test_a_users_file_is_reopened_as_a_file_of_its_own(files):
    mine, _ = files
    sent = os.open(mine, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert users.check_sent(sent, str(mine), readonly=False) == str(mine)
        fd = users.reopen(NOBODY, writable=True, fd=sent)
        try:
            assert users.identity(fd) == users.identity(sent)
            # Its own open file: a flag set on it is not the sent one's.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            assert not fcntl.fcntl(sent, fcntl.F_GETFL) & os.O_APPEND
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        finally:
            os.close(fd)
    finally:
        os.close(sent)


def test_root_rights_never_reach_a_users_open(files):
    _, roots = files
    # Root's file, sent by root (as a user could not): reopened as nobody, refused.
    sent = os.open(roots, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(users.UserError, match="cannot open it for reading: Permission"):
            users.reopen(NOBODY, writable=False, fd=sent)
    finally:
        os.close(sent)
    with pytest.raises(users.UserError, match="Permission denied"):
        users.reopen(NOBODY, writable=False, path=str(roots))
    # By its path, nobody's own file opens; a link to it is not followed
    # at all (a link could be swapped for one to root's file).
    mine = roots.with_name("mine.img")
    fd = users.reopen(NOBODY, writable=True, path=str(mine))
    os.close(fd)
    link = roots.with_name("link.img")
    link.symlink_to(mine)
    with pytest.raises(users.UserError, match="Too many levels of symbolic links"):
        users.reopen(NOBODY, writable=False, path=str(link))


def test_a_file_sent_for_less_than_was_asked_is_refused(files, tmp_path):
    mine, _ = files
    sent = os.open(mine, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(users.UserError, match="not for reading and writing"):
            users.check_sent(sent, str(mine), readonly=False)
        assert users.check_sent(sent, str(mine), readonly=True) == str(mine)
    finally:
        os.close(sent)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, what in ((tmp_path, "a directory"), (fifo, "a fifo")):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with pytest.raises(users.UserError, match=what):
                users.check_sent(fd, str(path), readonly=True)
        finally:
            os.close(fd)
