"""``nbdloop create``: make an image."""
from __future__ import annotations

import errno
import fcntl
import os

import click

from nbdloop.cli.common import SIZE, Failure, UsageError
from nbdloop.extents import write_zeros
from nbdloop.sizes import SECTOR, format_size


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("size", type=SIZE)
@click.option("--force", is_flag=True, help="Overwrite IMAGE if it exists.")
@click.option("--preallocate", is_flag=True,
              help="Write the whole image (zeros) instead of leaving it sparse, so that in "
                   "direct mode every write lands where the filesystem already records "
                   "data, and is durable once acknowledged.  fallocate is not enough: it "
                   "leaves unwritten extents, whose conversion on the first write is "
                   "metadata that only a flush makes durable.")
def create(image: str, size: int, force: bool, preallocate: bool) -> None:
    """Make a sparse IMAGE of SIZE bytes: 512M (or 512MiB) is 512 x 1024^2,
    500MB is 500 x 1000^2, as in losetup and fallocate."""
    if size <= 0:
        raise UsageError(f"size must be positive, not {size}")
    if size % SECTOR:
        raise UsageError(f"size {size} is not a multiple of {SECTOR} bytes")
    if os.path.isdir(image):
        raise UsageError(f"{image}: is a directory")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(image, flags, 0o644)
    except FileExistsError:
        raise UsageError(f"{image}: already exists (use --force to overwrite)") from None
    except OSError as e:
        raise UsageError(f"{image}: cannot create: {e.strerror}") from None
    try:
        if force:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"{image}: in use by a running server; not overwriting") from None
            os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        if preallocate:
            write_zeros(fd, 0, size)
    except OSError as e:
        os.close(fd)
        if not force:
            os.unlink(image)
        if e.errno in (errno.EFBIG, errno.EINVAL):
            raise UsageError(f"{image}: size {format_size(size)} does not fit on this "
                             "filesystem (file too large)") from None
        raise Failure(f"{image}: {e.strerror}") from None
    os.close(fd)
    how = "fully written" if preallocate else "sparse"
    click.echo(f"created {image}: {format_size(size)} ({size} bytes), {how}")

