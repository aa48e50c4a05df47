"""``nbdloop attach``, ``detach`` and ``list``: images on kernel NBD devices,
like losetup.  The logic is in :mod:`nbdloop.kernel.attach`."""
from __future__ import annotations

import json
import os

import click

from nbdloop import paths
from nbdloop.cli.common import (SIZE, UsageError, block_size_option, connections_option,
                                mode_option)
from nbdloop.engine import backing
from nbdloop.kernel import attach as attach_mod
from nbdloop.serve.cmdline import image_key, require_permissions, require_slice


def image_geometry(image: str, mode: str, readonly: bool) -> backing.Geometry:
    """Validate IMAGE the way serve will, without locking it."""
    require_permissions(image, readonly)
    fd, geometry = backing.open_image(image, mode=mode, readonly=readonly, lock=False)
    os.close(fd)
    return geometry


@click.command()
@click.argument("image", type=click.Path())
@mode_option("direct: O_DIRECT, no page cache; buffered: through the page cache.")
@click.option("--device", metavar="/dev/nbdN",
              help="The NBD device to use [default: the first free one].")
@connections_option("Connections from the kernel client (nbd-client -C).")
@block_size_option("Logical block size of the device: 512, 1024, 2048 or 4096 "
                   "[default: the image's direct-I/O alignment].")
@click.option("--readonly", "-r", is_flag=True, help="Attach read-only.")
@click.option("--partscan", "-P", is_flag=True,
              help="Read the image's partition table now: its partitions appear as "
                   "/dev/nbdNpM (losetup -P).")
@click.option("--offset", "-o", type=SIZE, default=0, metavar="SIZE",
              help="The device starts at this byte of the image (losetup -o).")
@click.option("--sizelimit", type=SIZE, default=0, metavar="SIZE",
              help="The device is at most this many bytes (losetup --sizelimit) "
                   "[default: to the end of the image].")
@click.option("--mlock", is_flag=True,
              help="Lock the server's memory (serve --mlock), so it never waits on a page-in.")
@click.option("--stats-file", type=click.Path(dir_okay=False),
              help="Where the server writes its engine counters (serve --stats-file).")
@click.option("--timeout", type=click.IntRange(1, 3600), default=attach_mod.DEFAULT_TIMEOUT,
              show_default=True, metavar="SECONDS",
              help="How long the kernel waits for a request's answer before it counts the "
                   "connection as dead (nbd-client -timeout).")
@click.option("--recover-timeout", type=click.IntRange(0, 86400),
              default=attach_mod.DEFAULT_RECOVER_TIMEOUT, show_default=True, metavar="SECONDS",
              help="When the server dies, the kernel holds the device's requests this long "
                   "while a new server is started; 0: fail them at once, as nbd-client's "
                   "devices do.")
def attach(image, mode, device, connections, block_size, readonly, partscan, offset, sizelimit,
           mlock, stats_file, timeout, recover_timeout):
    """Serve IMAGE in the background and attach it to a kernel NBD device
    (like losetup -f --show); prints the device."""
    geometry = image_geometry(image, mode, readonly)
    part = (require_slice(geometry.size, geometry.align, mode, offset, sizelimit)
            if offset or sizelimit else None)
    try:
        if block_size is None:
            block_size = attach_mod.default_block_size(geometry.align)
    except attach_mod.AttachError as e:
        raise UsageError(f"{image}: {e}") from None
    size = part.length if part else geometry.size
    if size % block_size:
        raise UsageError(f"{image}: the device's size, {size}, is not a multiple of its "
                         f"block size, {block_size} (give another --block-size)")
    if device is not None:
        try:
            attach_mod.check_device_name(device)
        except attach_mod.AttachError as e:
            raise click.BadParameter(str(e), param_hint="--device") from None
    problem = attach_mod.nbd_support_problem()
    if problem:
        raise attach_mod.AttachFailed(problem)
    serve_options = (["--mlock"] if mlock else []) + \
        (["--stats-file", os.path.abspath(stats_file)] if stats_file else []) + \
        (["--offset", str(part.offset), "--sizelimit", str(part.length)] if part else [])
    att = attach_mod.attach(paths.state_dir(), image, device=device, mode=mode,
                            readonly=readonly, connections=connections,
                            block_size=block_size, serve_options=serve_options,
                            timeout=timeout, recover_timeout=recover_timeout,
                            offset=part.offset if part else 0,
                            sizelimit=part.length if sizelimit else 0, partscan=partscan)
    click.echo(att.device)


@click.command()
@click.argument("target", metavar="DEVICE|IMAGE")
def detach(target):
    """Disconnect an attached device and stop its server."""
    att, state = attach_mod.detach(paths.state_dir(), target)
    if state == "stale":
        # serve's ready file, which a killed server could not remove.
        (paths.runtime_dir() / f"{image_key(att.image)}.{att.pid}.ready"
         ).unlink(missing_ok=True)
        click.echo(f"nbdloop: {att.device}: removed a stale attachment of {att.image} "
                   f"({attach_mod.stale_reason(att) or 'its server had died'})", err=True)


@click.command()
@click.argument("target", metavar="DEVICE|IMAGE")
@click.option("--timeout", type=click.IntRange(1, 3600), default=120, show_default=True,
              metavar="SECONDS", help="How long to wait for the new server.")
def restart(target, timeout):
    """Replace the server of an attached device, without unmounting: the
    device's agent stops the server, starts again with the nbdloop now
    installed, and hands the kernel new connections.  This is how a mounted
    device moves to a new version of nbdloop."""
    before, after = attach_mod.restart(paths.state_dir(), target, timeout)
    took = (after.last_recovery or {}).get("seconds")
    click.echo(f"{after.device}: server pid {before.server_pid} -> {after.server_pid}"
               + (f" in {took:g} s" if took is not None else ""))


def state_text(row: dict) -> str:
    """``attached``; ``recovering for 3.2 s: why``; ``stale: why``."""
    state = row["state"]
    if state == "recovering" and row["state_seconds"] is not None:
        state += f" for {row['state_seconds']:g} s"
    if row["reason"] and state != "attached":
        state += f": {row['reason']}"
    return state


#: ``list``'s columns: losetup's (NAME ... LOG-SEC, with DIO meaning direct
#: mode), then nbdloop's own.  Name -> (right-aligned, value of a row).
COLUMNS = {
    "NAME": (False, lambda r: r["device"]),
    "SIZELIMIT": (True, lambda r: str(r["sizelimit"])),
    "OFFSET": (True, lambda r: str(r["offset"])),
    "RO": (True, lambda r: str(int(r["readonly"]))),
    "BACK-FILE": (False, lambda r: r["image"]),
    "DIO": (True, lambda r: str(int(r["mode"] == "direct"))),
    "LOG-SEC": (True, lambda r: str(r["block_size"])),
    "MODE": (False, lambda r: r["mode"]),
    "PID": (True, lambda r: str(r["pid"])),
    "CONNS": (True, lambda r: str(r["connections"])),
    "PARTS": (False, lambda r: ",".join(os.path.basename(p) for p in r["partitions"]) or "-"),
    "STATE": (False, state_text),
}
DEFAULT_COLUMNS = ["NAME", "SIZELIMIT", "OFFSET", "RO", "BACK-FILE", "DIO", "LOG-SEC",
                   "MODE", "PID", "CONNS", "PARTS", "STATE"]


def parse_columns(ctx, param, value):
    """``name,STATE`` -> ["NAME", "STATE"]."""
    if value is None:
        return DEFAULT_COLUMNS
    names = [name.strip().upper() for name in value.split(",")]
    for name in names:
        if name not in COLUMNS:
            raise click.BadParameter(f"unknown column {name!r} (the columns are "
                                     f"{','.join(COLUMNS)})")
    return names


def table_lines(rows: list[dict], columns: list[str], headings: bool = True) -> list[str]:
    """A table like losetup's: numbers right-aligned, the last column as it is."""
    cells = ([columns] if headings else []) + [[COLUMNS[c][1](r) for c in columns]
                                               for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for line in cells:
        out = []
        for i, (cell, width, column) in enumerate(zip(line, widths, columns)):
            if i == len(columns) - 1:
                out.append(cell)
            else:
                out.append(cell.rjust(width) if COLUMNS[column][0] else cell.ljust(width))
        lines.append(" ".join(out).rstrip())
    return lines


@click.command("list")
@click.option("--json", "-J", "as_json", is_flag=True,
              help="Print JSON instead: every field of each attachment.")
@click.option("--output", "-O", "columns", metavar="COLUMNS", callback=parse_columns,
              help=f"The columns to show, comma-separated [default: all: "
                   f"{','.join(DEFAULT_COLUMNS)}].")
@click.option("--noheadings", "-n", is_flag=True, help="Print no heading line.")
@click.option("--associated", "-j", metavar="FILE",
              help="Only the attachments of image FILE (losetup -j).")
def list_(as_json, columns, noheadings, associated):
    """List attached images, like losetup -l."""
    rows = [attach_mod.describe(a) for a in attach_mod.load(paths.state_dir())]
    if associated is not None:
        rows = [r for r in rows if r["image"] == os.path.realpath(associated)]
    if as_json:
        click.echo(json.dumps({"attachments": rows}, indent=2))
        return
    if rows:
        for line in table_lines(rows, columns, headings=not noheadings):
            click.echo(line)
