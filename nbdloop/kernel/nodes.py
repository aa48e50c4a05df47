"""A device's node in /dev: whose it is and what udev knows of it.

A device that a user attached belongs to that user, mode 0600, it and its
partitions, while it is attached; at detach it goes back to root:disk
0660, as udev leaves block devices.  The daemon sets that itself, for a
machine without udev, and leaves the same in a property file that the
udev rule make install puts in place reads at every event of the device
or a partition of it, so that udev's next event does not undo it:
``<runtime dir>/devices/nbdN``, KEY=value lines:

- ``NBDLOOP_OWNER=UID``: a user's device; the rule also keeps the host's
  automatic machinery away from it (links by UUID or label, LVM, md,
  systemd, udisks), since its content is the user's to choose;
- ``NBDLOOP_REF=NAME``: ``/dev/nbdloop/by-ref/NAME`` links to it.

The file is written before the device is connected and removed after it
is disconnected; once the kernel has the device's backend identifier, a
``change`` event makes udev read it again (``trigger``).
"""
from __future__ import annotations

import grp
import os
from pathlib import Path

from nbdloop import paths
from nbdloop.kernel.attach import DEV, SYS_BLOCK, Attachment, partitions

#: What udev makes of a block device's node (Debian's 50-udev-default.rules).
ROOT_MODE = 0o660
USER_MODE = 0o600


def properties_file(att: Attachment) -> Path:
    return paths.device_properties_dir() / att.name


def announce(att: Attachment) -> None:
    """The device's udev properties, before it is connected; none for a
    root device without a reference."""
    lines = []
    if att.owner:
        lines.append(f"NBDLOOP_OWNER={att.owner}")
    if att.ref:
        lines.append(f"NBDLOOP_REF={att.ref}")
    path = properties_file(att)
    if lines:
        paths.write_whole(path, "\n".join(lines) + "\n")
    else:
        path.unlink(missing_ok=True)


def claim(att: Attachment, sys_block: Path = SYS_BLOCK, dev: Path = DEV) -> None:
    """The device and its partitions are the owner's now; udev is told."""
    if att.owner:
        for node in _nodes(att, sys_block, dev):
            _chown(node, att.owner, 0, USER_MODE)
    trigger(att, sys_block)


def release(att: Attachment, sys_block: Path = SYS_BLOCK, dev: Path = DEV) -> None:
    """After the device is disconnected: its properties go, and a node the
    kernel keeps is root's again."""
    properties_file(att).unlink(missing_ok=True)
    if att.owner:
        for node in _nodes(att, sys_block, dev):
            _chown(node, 0, _disk_gid(), ROOT_MODE)
    trigger(att, sys_block)


def trigger(att: Attachment, sys_block: Path = SYS_BLOCK) -> None:
    """A ``change`` event of the device, so that udev applies its rules
    with what the kernel and the property file say now."""
    try:
        (sys_block / att.name / "uevent").write_text("change")
    except OSError:
        pass    # the device is gone (made for the attachment, and removed)


def _nodes(att: Attachment, sys_block: Path, dev: Path) -> list[Path]:
    return [dev / att.name] + [dev / os.path.basename(p)
                               for p in partitions(att.device, sys_block)]


def _chown(node: Path, uid: int, gid: int, mode: int) -> None:
    try:
        fd = os.open(node, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return      # no node: no udev and no devtmpfs, or it just went
    try:
        # Through the descriptor: never a link, never a node that replaced it.
        os.chown(f"/proc/self/fd/{fd}", uid, gid)
        os.chmod(f"/proc/self/fd/{fd}", mode)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_gid() -> int:
    try:
        return grp.getgrnam("disk").gr_gid
    except KeyError:
        return 0
