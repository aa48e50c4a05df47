"""``nbdloop attach``, ``detach``, ``list``, ``restart``, ``resize`` and
``daemon``: images on kernel NBD devices, like losetup.  The commands are
clients of the daemon (:mod:`nbdloop.daemon`), which does the work; the
checks that need no daemon are made here first, in
:mod:`nbdloop.kernel.attach`.  A user's attach opens the image here, with
the user's rights, and sends it open."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from nbdloop import extents, paths
from nbdloop.cli.common import (SIZE, UsageError, block_size_option, connections_option,
                                mode_option, one_line_error)
from nbdloop.daemon import client, control
from nbdloop.daemon import users
from nbdloop.daemon.users import DEFAULT_MAX_PER_USER, user_name
from nbdloop.kernel import attach as attach_mod
from nbdloop.kernel import table
from nbdloop.sizes import SECTOR, format_size


#: attach's own options, which a line of the table cannot hold.
_NOT_IN_TABLE = {"image", "all_", "persist", "foreground", "from_table"}


@click.command()
# Not click's readability check: it would speak for the open that tells why.
@click.argument("image", type=click.Path(readable=False), required=False)
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
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Serve with this many processes (serve --processes); the kernel's "
                   "connections go to them in turn.")
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
@click.option("--ref", metavar="NAME",
              help="Name the device: /dev/nbdloop/by-ref/NAME links to it while it is "
                   "attached, and detach, restart and resize take NAME (losetup --loop-ref).")
@click.option("--all", "all_", is_flag=True,
              help="Attach every image of the table of attachments that is not attached "
                   "yet, each with its line's options.")
@click.option("--persist", is_flag=True,
              help="Also put IMAGE, with the options given here, in the table of "
                   "attachments (replacing its line), so that attach --all attaches it.")
@click.option("--from-table", is_flag=True,
              help="Take IMAGE's options from its line in the table (what the systemd "
                   "unit nbdloop@.service runs); an image attached already is not an error.")
@click.option("--foreground", is_flag=True,
              help="Stay in the foreground until the device is detached, telling systemd "
                   "once it is attached (Type=notify), for a service of your own.  The "
                   "daemon serves the device either way.")
@click.pass_context
def attach(ctx, image, all_, persist, from_table, foreground, **options):
    """Serve IMAGE in the background and attach it to a kernel NBD device
    (like losetup -f --show); prints the device.

    Root, and the members of the group nbdloop: a user attaches their own
    image, opened with their own rights, and the device is theirs (mode
    0600) until it is detached.

    The table of attachments is /etc/nbdloop/attachments ($NBDLOOP_ATTACHMENTS),
    one line per image: IMAGE OPTIONS, the options as attach's long options
    without dashes, comma-separated (mode=buffered,connections=2,partscan)."""
    table_path = paths.attachments_table()
    if os.geteuid() != 0 and (all_ or persist or from_table):
        raise UsageError("the table of attachments is root's: --all, --persist and "
                         "--from-table are root's options")
    if all_:
        if image or persist or from_table or foreground or _given(ctx, options):
            raise click.UsageError("--all takes no IMAGE and no other option")
        sys.exit(attach_all(ctx, table_path))
    if image is None:
        raise click.UsageError("Missing argument 'IMAGE' (or give --all)")
    if from_table:
        if persist or _given(ctx, options):
            raise click.UsageError("--from-table takes its options from the table")
        entry = table.find(table.read(table_path), image)
        if entry is None:
            raise table.TableError(f"{image}: not in {table_path}")
        sub = _entry_context(ctx, entry, table_path)
        options = {k: v for k, v in sub.params.items() if k not in _NOT_IN_TABLE}
        row = _row_of(image)
        if row is not None and not foreground:
            # The daemon attached it from the table at its start.
            click.echo(row["device"])
            return
    if foreground:
        sys.exit(attach_image(image, foreground=True, **options))
    att = attach_image(image, **options)
    click.echo(att.device)
    if persist:
        table.put(table_path, image, _table_options(ctx, options))


def attach_all(ctx: click.Context, table_path: Path) -> int:
    """attach --all: every entry not attached yet."""
    attached = {r["image"] for r in _rows()}

    def attach_entry(entry: table.Entry) -> None:
        sub = _entry_context(ctx, entry, table_path)
        params = {k: v for k, v in sub.params.items() if k not in _NOT_IN_TABLE}
        click.echo(f"{entry.image} {attach_image(entry.image, **params).device}")

    return each([e for e in table.read(table_path)
                 if os.path.realpath(e.image) not in attached],
                lambda e: e.image, attach_entry)


def each(items: list, name, action) -> int:
    """``action(item)`` for every item; a failure is one line on stderr
    naming the item (``name(item)``), and the next one goes on.  Returns 0,
    or the worst exit status of the failures."""
    status = 0
    for item in items:
        try:
            action(item)
        except Exception as e:
            known = one_line_error(e)
            if known is None:
                raise
            click.echo(f"nbdloop: {name(item)}: {known[1]}", err=True)
            status = max(status, known[0])
    return status


def _entry_context(ctx: click.Context, entry: table.Entry, table_path: Path) -> click.Context:
    """A table line parsed by attach's own options."""
    try:
        sub = attach.make_context("attach", entry.args(), parent=ctx.parent)
    except click.ClickException as e:
        raise table.TableError(f"{table_path}:{entry.line}: {e.format_message()}") from None
    wrong = [k for k in _NOT_IN_TABLE - {"image"} if sub.params.get(k)]
    if wrong:
        name = wrong[0].rstrip("_").replace("_", "-")
        raise table.TableError(f"{table_path}:{entry.line}: {name} is attach's own option, "
                               "not one for a line of the table")
    return sub


def _given(ctx: click.Context, options: dict) -> bool:
    return any(ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
               for name in options)


def _table_options(ctx: click.Context, options: dict) -> list[str]:
    """The options given on the command line, as a table line holds them."""
    found = []
    for param in ctx.command.params:
        if param.name in _NOT_IN_TABLE or param.name not in options or \
                ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        name = max(param.opts, key=len).lstrip("-")
        value = options[param.name]
        if param.is_flag:
            if value:
                found.append(name)
        else:
            found.append(f"{name}={os.path.abspath(value) if name == 'stats-file' else value}")
    return found


def attach_image(image, foreground=False, **options):
    """Check IMAGE and the options, then ask the daemon to attach it; the
    attachment (or, foreground, the exit status once it is detached)."""
    own = _open_own(image, options["readonly"]) if os.geteuid() != 0 else None
    try:
        try:
            options, part, regular = attach_mod.check_options(
                image, attach_mod.Options(**options), fd=own)
        except attach_mod.DeviceNameError as e:
            raise click.BadParameter(str(e), param_hint="--device") from None
        att = attach_mod.Attachment.from_dict(client.call("attach", {
            "image": os.path.abspath(image), "options": dataclasses.asdict(options)},
            fds=() if own is None else (own,)))
    finally:
        if own is not None:
            os.close(own)
    if regular and not options.readonly:
        extents.warn_if_unsettled(image, options.mode, part.offset, part.end,
                                  lambda line: click.echo(line, err=True))
    if not foreground:
        return att
    click.echo(f"nbdloop: {image} attached to {att.device}", err=True)
    control.notify("READY=1")
    while _row_of(att.device) is not None:
        time.sleep(1)
    return 0


def _open_own(image: str, readonly: bool) -> int:
    """A user's image, opened with the user's rights, for the daemon: never
    waiting (a fifo), and only a regular file."""
    how = "reading" if readonly else "reading and writing"
    try:
        fd = os.open(image, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NONBLOCK |
                     os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        hint = "; use --readonly to attach it read-only" \
            if not readonly and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        raise attach_mod.AttachError(f"{image}: cannot open it for {how}: "
                                     f"{e.strerror}{hint}") from None
    try:
        users.require_regular(fd, image)
    except users.UserError:
        os.close(fd)
        raise
    return fd


def _rows() -> list[dict]:
    """What ``list --json`` lists; without asking a daemon that is not
    running when there is nothing for it to take over."""
    if not client.needed():
        return []
    return client.call("list")["attachments"]


def _row_of(target: str) -> dict | None:
    device = _target(target)
    rows = _rows()
    for row in rows:
        if row["device"] == device or (row.get("ref") and row["ref"] == target):
            return row
    for row in rows:
        if row["image"] == os.path.realpath(target):
            return row
    return None


def _resolve(target: str) -> str:
    """The device a target names (a device, a reference or an image), as
    the daemon takes it."""
    row = _row_of(target)
    return row["device"] if row is not None else _target(target)


def _target(target: str) -> str:
    """A device as /dev/nbdN, an image as an absolute path (the daemon's
    working directory is not the caller's)."""
    if re.fullmatch(r"nbd\d+", target):
        return f"/dev/{target}"
    return target if target.startswith("/dev/") else os.path.abspath(target)


@click.command()
@click.argument("target", metavar="DEVICE|IMAGE|REF", required=False)
@click.option("--all", "all_", is_flag=True,
              help="Detach every image of the table of attachments that is attached.")
@click.option("--forget", is_flag=True,
              help="Also remove the image's line from the table of attachments.")
def detach(target, all_, forget):
    """Disconnect an attached device and stop its server."""
    table_path = paths.attachments_table()
    if os.geteuid() != 0 and (all_ or forget):
        raise UsageError("the table of attachments is root's: --all and --forget are "
                         "root's options")
    if all_:
        if target or forget:
            raise click.UsageError("--all takes no DEVICE|IMAGE and no --forget")
        sys.exit(detach_all(table_path))
    if target is None:
        raise click.UsageError("Missing argument 'DEVICE|IMAGE' (or give --all)")
    if forget and _row_of(target) is None:
        # Forgetting an image that is not attached is still forgetting it.
        if table.remove(table_path, target):
            click.echo(f"nbdloop: {target}: was not attached; removed from {table_path}",
                       err=True)
            return
    answer = _detach(target)
    if forget:
        table.remove(table_path, answer["attachment"]["image"])


def _detach(target: str) -> dict:
    if not client.needed():
        raise attach_mod.AttachError(f"{target}: not attached (see nbdloop list)")
    answer = client.call("detach", {"target": _resolve(target)})
    att, state = answer["attachment"], answer["state"]
    if state == "stale":
        click.echo(f"nbdloop: {att['device']}: removed a stale attachment of {att['image']} "
                   f"({att['reason'] or 'its server had died'})", err=True)
    return answer


def detach_all(table_path: Path) -> int:
    """detach --all: every attached image that the table names."""
    wanted = {os.path.realpath(e.image) for e in table.read(table_path)}
    return each([r for r in _rows() if r["image"] in wanted],
                lambda r: r["image"], lambda r: _detach(r["device"]))


@click.command()
@click.argument("target", metavar="DEVICE|IMAGE|REF")
@click.option("--timeout", type=click.IntRange(1, 3600), default=120, show_default=True,
              metavar="SECONDS", help="How long to wait for the new server.")
def restart(target, timeout):
    """Replace the server of an attached device, without unmounting: the
    daemon stops the server (every device it serves goes through this too),
    starts again as the nbdloop now installed, and hands the kernel new
    connections.  This is how a mounted device moves to a new version of
    nbdloop."""
    before = _row_of(target)
    if before is None:
        raise attach_mod.AttachError(f"{target}: not attached (see nbdloop list)")
    try:
        client.call("restart", {"target": before["device"]})
    except control.DaemonError as e:
        # The daemon may exec itself before its answer leaves.
        if "without an answer" not in str(e):
            raise
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.2)
        after = _row_of(before["device"])
        if after is None:
            raise attach_mod.AttachFailed(f"{before['device']} was detached during the restart")
        if after["state"] == "stale":
            raise attach_mod.AttachFailed(f"{before['device']}: the restart failed: "
                                          f"{after['reason']}")
        if after["state"] == "attached" and after["server_pid"] != before["server_pid"]:
            break
        if time.monotonic() > deadline:
            raise attach_mod.AttachFailed(f"{before['device']}: no new server within "
                                          f"{timeout:g} s (state {after['state']})")
    took = (after["last_recovery"] or {}).get("seconds")
    click.echo(f"{after['device']}: server pid {before['server_pid']} -> {after['server_pid']}"
               + (f" in {took:g} s" if took is not None else ""))


@click.command()
@click.argument("target", metavar="DEVICE|IMAGE|REF")
@click.argument("size", type=SIZE, required=False)
@click.option("--preallocate", is_flag=True,
              help="Write the image's new bytes with zeros instead of leaving them sparse "
                   "(as create --preallocate).")
@click.option("--shrink", is_flag=True,
              help="Allow a smaller size: what lies past it is dropped.  Refused while the "
                   "device or a partition of it is mounted or held.")
def resize(target, size, preallocate, shrink):
    """Give an attached device its image's current size (losetup -c); with
    SIZE, first make the image that large (for a slice: the slice, which
    keeps its offset).  A filesystem on the device can then be grown while
    mounted (resize2fs, xfs_growfs).  The device's server is restarted for
    it, with every device it serves, as restart does."""
    if preallocate and size is None:
        raise UsageError("--preallocate needs a SIZE")
    if size is not None and (size <= 0 or size % SECTOR):
        raise UsageError(f"size must be a positive multiple of {SECTOR} bytes, not {size}")
    if not client.needed():
        raise attach_mod.AttachError(f"{target}: not attached (see nbdloop list)")
    answer = client.call("resize", {"target": _resolve(target), "size": size,
                                    "preallocate": preallocate, "shrink": shrink})
    click.echo(f"{answer['attachment']['device']}: {format_size(answer['before'])} -> "
               f"{format_size(answer['after'])}")


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
    "SIZE": (True, lambda r: str(r.get("size", 0))),
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
    "REF": (False, lambda r: r.get("ref") or "-"),
    "OWNER": (False, lambda r: user_name(r.get("owner", 0))),
    "STATE": (False, state_text),
}
DEFAULT_COLUMNS = ["NAME", "SIZE", "SIZELIMIT", "OFFSET", "RO", "BACK-FILE", "DIO", "LOG-SEC",
                   "MODE", "PID", "CONNS", "PARTS", "REF", "OWNER", "STATE"]


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
    rows = _rows()
    if associated is not None:
        rows = [r for r in rows if r["image"] == os.path.realpath(associated)]
    if as_json:
        click.echo(json.dumps({"attachments": rows}, indent=2))
        return
    if rows:
        for line in table_lines(rows, columns, headings=not noheadings):
            click.echo(line)


@click.command()
@click.option("--attach-table", is_flag=True,
              help="Once started, attach every image of the table of attachments that is "
                   "not attached (what the systemd service does at boot).")
@click.option("--max-per-user", type=click.IntRange(0, 4096),
              default=DEFAULT_MAX_PER_USER, show_default=True,
              envvar=paths.MAX_PER_USER_ENV, show_envvar=True,
              help="How many devices each user of the group nbdloop may have attached at "
                   "once; 0: users may attach none.")
def daemon(attach_table, max_per_user):
    """Run the daemon that owns every attached device.  systemd starts it
    (nbdloop.socket, nbdloop.service); without systemd the first command
    that needs it does.  Stopping it leaves the devices working: the next
    daemon takes them over."""
    from nbdloop.daemon import main
    try:
        sys.exit(main.run(attach_table, max_per_user))
    except main.AlreadyRunning as e:
        click.echo(f"nbdloop: {e}", err=True)
