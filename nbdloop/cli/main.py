"""The ``nbdloop`` command line."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

import click

from nbdloop.engine import backing
from nbdloop.sizes import format_size
from nbdloop.cli.common import SIZE, SizeType, UsageError, parse_cpus  # noqa: F401 (re-exported)
from nbdloop.serve.supervise import supervise

PLUGIN = Path(__file__).resolve().parent.parent / "engine" / "plugin.py"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_THREADS = 16
EMBEDDED_PYTHON_HOME = "/usr"   # Debian's libpython3.11, which nbdkit embeds




def runtime_dir() -> Path:
    """Where sockets and state live: /run/nbdloop for root, else
    $XDG_RUNTIME_DIR/nbdloop.  Created 0700 so only its owner can use it."""
    override = os.environ.get("NBDLOOP_RUNTIME_DIR")
    if override:
        base = Path(override)
    elif os.geteuid() == 0:
        base = Path("/run/nbdloop")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "nbdloop"
    else:
        base = Path(f"/tmp/nbdloop-{os.geteuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o022:
        raise UsageError(f"runtime directory {base} is not private to this user")
    return base


def image_key(image: str) -> str:
    """A short, stable name for an image: its basename and a hash of its path."""
    real = os.path.realpath(image)
    digest = hashlib.sha256(real.encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(real).name)
    return f"{stem}-{digest}"


def default_socket(image: str) -> Path:
    return runtime_dir() / f"{image_key(image)}.sock"


def check_socket_free(path: Path) -> None:
    """Refuse a socket path that a live server owns; clear a stale one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise UsageError(f"socket directory {path.parent} does not exist") from None
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # a dead server's leftover
        return
    except OSError as e:
        raise UsageError(f"socket {path}: {e.strerror}") from None
    finally:
        s.close()
    raise UsageError(f"socket {path} is already in use by a running server")


def check_port_free(bind: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((bind, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {bind}:{port}: {e.strerror}") from None
    finally:
        s.close()


def check_permissions(image: str, readonly: bool) -> None:
    """Root ignores permission bits, but a file that nobody may write is a
    read-only image, and one nobody may read is not ours to serve."""
    try:
        st = os.stat(image)
    except OSError:
        return  # open_image reports it
    if not stat.S_ISREG(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o444:
        raise UsageError(f"{image}: is not readable (mode {mode:04o})")
    if not readonly and not mode & 0o222:
        raise UsageError(f"{image}: is read-only (mode {mode:04o}); "
                         "use --readonly to serve it read-only")


def nbdkit_argv(image: str, *, fd: int | None, mode: str, readonly: bool,
                socket_path: str | None, port: int | None, bind: str, threads: int,
                segment_size: int, export_name: str, pidfile: str | None,
                verbose: bool = False, stats_file: str | None = None,
                tls_psk: str | None = None, mlock: bool = False,
                placement: bool = True, sched: str = "batch") -> list[str]:
    """The nbdkit command line that serves ``image`` with our plugin."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise UsageError("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    argv = [nbdkit, "--foreground", "--exit-with-parent", "--threads", str(threads)]
    if socket_path is not None:
        argv += ["--unix", socket_path]
    else:
        argv += ["--port", str(port), "--ipaddr", bind]
    if readonly:
        argv.append("--readonly")
    if pidfile:
        argv += ["--pidfile", pidfile]
    if verbose:
        argv.append("--verbose")
    if tls_psk:
        # require: a client that does not do TLS with a key from the file is refused.
        argv += ["--tls=require", f"--tls-psk={os.path.abspath(tls_psk)}"]
    argv += ["python", str(PLUGIN), f"file={os.path.abspath(image)}", f"mode={mode}",
             f"readonly={int(readonly)}", f"segment-size={segment_size}"]
    if fd is not None:
        argv.append(f"fd={fd}")
    if export_name:
        argv.append(f"export-name={export_name}")
    if stats_file:
        argv.append(f"stats-file={os.path.abspath(stats_file)}")
    if mlock:
        argv.append("mlock=1")
    if not placement:
        argv.append("placement=0")
    if sched != "batch":
        argv.append(f"sched={sched}")
    return argv


def check_psk_file(path: str) -> None:
    """A PSK file as nbdkit (GnuTLS) reads it: ``username:hexkey`` lines."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"TLS PSK file {path}: {e.strerror}") from None
    entries = [ln for ln in text.splitlines() if ln.strip()]
    for ln in entries:
        user, sep, key = ln.partition(":")
        if not sep or not user or not key or len(key) % 2 or \
                any(c not in "0123456789abcdefABCDEF" for c in key):
            raise UsageError(f"TLS PSK file {path}: lines must be username:hexkey")
    if not entries:
        raise UsageError(f"TLS PSK file {path}: no keys in it")


def plugin_env() -> dict[str, str]:
    """nbdkit embeds Debian's python3: point it at this package.

    The embedded interpreter finds its standard library from the first
    ``python3`` on PATH unless told otherwise; with another Python first on
    PATH (pyenv, a venv) it would load a foreign stdlib and miss Debian's
    dist-packages (where _cffi_backend lives).  PYTHONHOME pins it to /usr.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONHOME", EMBEDDED_PYTHON_HOME)
    paths = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(paths)
    return env


# ---- commands -------------------------------------------------------------------

class OneLineErrors(click.Group):
    """Every usage or validation error is one line on stderr, exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None,
             standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            if isinstance(e, UsageError):
                e.show()
            else:
                click.echo(f"nbdloop: {e.format_message()}", err=True)
            sys.exit(2 if isinstance(e, (click.UsageError, UsageError)) else e.exit_code)
        except click.Abort:
            click.echo("nbdloop: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbdloop")
def main() -> None:
    """nbdloop: a userspace loop device.  Serve a file over NBD through
    io_uring, in direct (O_DIRECT) or buffered (page cache) mode."""


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("size", type=SIZE)
@click.option("--force", is_flag=True, help="Overwrite IMAGE if it exists.")
def create(image: str, size: int, force: bool) -> None:
    """Make a sparse IMAGE of SIZE bytes (512M, 1G, 1.5T or bytes)."""
    if size <= 0:
        raise UsageError(f"size must be positive, not {size}")
    if size % backing.SECTOR:
        raise UsageError(f"size {size} is not a multiple of {backing.SECTOR} bytes")
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
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"{image}: in use by a running server; not overwriting") from None
            os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        if not force:
            os.unlink(image)
        if e.errno in (errno.EFBIG, errno.EINVAL):
            raise UsageError(f"{image}: size {format_size(size)} does not fit on this "
                             "filesystem (file too large)") from None
        raise UsageError(f"{image}: {e.strerror}") from None
    os.close(fd)
    click.echo(f"created {image}: {format_size(size)} ({size} bytes), sparse")


def serve_options(f):
    for opt in reversed([
        click.option("--mode", type=click.Choice(backing.MODES), default="direct",
                      show_default=True, help="direct: O_DIRECT, no page cache; "
                      "buffered: through the page cache like the classic loop device."),
        click.option("--readonly", "-r", is_flag=True, help="Serve read-only."),
        click.option("--threads", type=click.IntRange(1, 256), default=DEFAULT_THREADS,
                     show_default=True, help="nbdkit worker threads per connection."),
        click.option("--segment-size", type=SIZE, default=backing.DEFAULT_SEG_SIZE,
                     show_default="128K", help="Largest I/O segment (multiple of 4K)."),
        click.option("--export-name", default="", help="Export name to offer (default: any)."),
    ]):
        f = opt(f)
    return f


def validate_serve(image, mode, readonly, segment_size):
    if segment_size < 4096 or segment_size % 4096 or segment_size > 16 << 20:
        raise click.BadParameter("must be a multiple of 4K between 4K and 16M",
                                 param_hint="--segment-size")
    check_permissions(image, readonly)


@main.command()
@click.argument("image", type=click.Path())
@serve_options
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Unix socket to listen on [default: under the runtime dir].")
@click.option("--port", type=click.IntRange(1, 65535), help="Listen on TCP instead.")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address for --port.")
@click.option("--pidfile", type=click.Path(dir_okay=False),
              help="Write the server pid here once it accepts connections.")
@click.option("--verbose", "-v", is_flag=True, help="nbdkit debug messages.")
@click.option("--stats-file", type=click.Path(dir_okay=False),
              help="Write the I/O engine's counters here (JSON) as connections close.")
@click.option("--tls-psk", type=click.Path(dir_okay=False),
              help="Require TLS with a pre-shared key from this file (username:hexkey "
                   "lines, as psktool writes them).")
@click.option("--mlock", is_flag=True,
              help="Lock the server's memory (mlockall), so it never waits on a page-in.")
@click.option("--placement", type=click.Choice(["auto", "off"]), default="auto",
              show_default=True,
              help="auto: under load run the workers on CPUs that do not take the disk's "
                   "interrupts, and alone on the one that does (see README).")
@click.option("--cpus", callback=parse_cpus, metavar="LIST",
              help="Run the server on these CPUs only (like taskset: 0, 0-1, 0,2). "
                   "See README: on small VMs, one CPU away from the disk's interrupts "
                   "helps throughput and hurts QD1 latency.")
@click.option("--sched", type=click.Choice(["batch", "normal"]), default="batch",
              show_default=True,
              help="batch: the workers run under SCHED_BATCH, so a worker woken up does not "
                   "preempt one that is running a request (see README); normal: leave them.")
def serve(image, mode, readonly, threads, segment_size, export_name, socket_path,
          port, bind, pidfile, verbose, stats_file, tls_psk, mlock, placement, cpus, sched):
    """Serve IMAGE over NBD in the foreground until SIGINT or SIGTERM."""
    validate_serve(image, mode, readonly, segment_size)
    if tls_psk:
        check_psk_file(tls_psk)
    if socket_path and port:
        raise click.BadParameter("use --socket or --port, not both", param_hint="--socket")
    sock = None
    if port is None:
        sock = Path(socket_path) if socket_path else default_socket(image)
        check_socket_free(sock)
    else:
        check_port_free(bind, port)
    try:
        fd, geometry = backing.open_image(image, mode=mode, readonly=readonly)
    except backing.ImageError as e:
        raise UsageError(str(e)) from None
    ready = runtime_dir() / f"{image_key(image)}.{os.getpid()}.ready"
    first_fd = [fd]

    def spawn() -> tuple[list[str], tuple[int, ...]]:
        # nbdkit inherits the opened, locked descriptor: no window in which a
        # second server could take the image.  After a crash, open it again.
        if first_fd:
            f = first_fd.pop()
        else:
            # The dead nbdkit's rings are torn down by the kernel a moment
            # later, and they hold the image (and so its lock) until then.
            deadline = time.monotonic() + 10
            while True:
                try:
                    f, _ = backing.open_image(image, mode=mode, readonly=readonly)
                    break
                except backing.ImageError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        os.set_inheritable(f, True)
        argv = nbdkit_argv(image, fd=f, mode=mode, readonly=readonly,
                           socket_path=str(sock) if sock else None, port=port, bind=bind,
                           threads=threads, segment_size=segment_size,
                           export_name=export_name, pidfile=str(ready), verbose=verbose,
                           stats_file=stats_file, tls_psk=tls_psk, mlock=mlock,
                           placement=placement == "auto" and not cpus, sched=sched)
        return argv, (f,)

    where = (f"unix:{sock}" if sock else f"nbd://{bind}:{port}") + (" with TLS" if tls_psk
                                                                     else "")
    click.echo(f"nbdloop: serving {image} ({format_size(geometry.size)}, {mode}, "
               f"alignment {geometry.align}) on {where}", err=True)
    os.umask(0o077)  # the socket is 0600
    if cpus:
        os.sched_setaffinity(0, cpus)   # nbdkit and all its threads inherit it
    try:
        status = supervise(spawn, env=plugin_env(), ready_file=ready,
                           pidfile=Path(pidfile).absolute() if pidfile else None,
                           socket_path=sock)
    except backing.ImageError as e:   # reopening after a crash failed
        click.echo(f"nbdloop: cannot restart the server: {e}", err=True)
        status = 1
    if status != 0:
        click.echo(f"nbdloop: server exited with status {status}", err=True)
    sys.exit(0 if status == 0 else 1)


# ---- attach, detach, list, vm-check ----------------------------------------------------
# (imported here so that this block stays self-contained)
import json  # noqa: E402

from nbdloop.kernel import attach as attach_mod  # noqa: E402
from nbdloop.vm import check as vmcheck  # noqa: E402


def state_dir() -> Path:
    """Where attachments are recorded: <runtime dir>/attached (private)."""
    d = runtime_dir() / "attached"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def check_block_size(ctx, param, value):
    if value is not None and value not in attach_mod.BLOCK_SIZES:
        raise click.BadParameter(f"{value} is not one of 512, 1024, 2048, 4096")
    return value


def open_for_check(image: str, mode: str, readonly: bool) -> backing.Geometry:
    """Validate IMAGE the way serve will, without locking it."""
    check_permissions(image, readonly)
    try:
        fd, geometry = backing.open_image(image, mode=mode, readonly=readonly, lock=False)
    except backing.ImageError as e:
        raise UsageError(str(e)) from None
    os.close(fd)
    return geometry


@main.command()
@click.argument("image", type=click.Path())
@click.option("--mode", type=click.Choice(backing.MODES), default="direct", show_default=True,
              help="direct: O_DIRECT, no page cache; buffered: through the page cache.")
@click.option("--device", metavar="/dev/nbdN",
              help="The NBD device to use [default: the first free one].")
@click.option("--connections", "-C", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Connections from the kernel client (nbd-client -C).")
@click.option("--block-size", "-b", type=int, callback=check_block_size,
              help="Logical block size of the device: 512, 1024, 2048 or 4096 "
                   "[default: the image's direct-I/O alignment].")
@click.option("--readonly", "-r", is_flag=True, help="Attach read-only.")
def attach(image, mode, device, connections, block_size, readonly):
    """Serve IMAGE in the background and attach it to a kernel NBD device
    (like losetup -f --show); prints the device."""
    geometry = open_for_check(image, mode, readonly)
    try:
        if block_size is None:
            block_size = attach_mod.default_block_size(geometry.align)
    except attach_mod.AttachError as e:
        raise UsageError(f"{image}: {e}") from None
    if device is not None:
        try:
            attach_mod.check_device_name(device)
        except attach_mod.AttachError as e:
            raise click.BadParameter(str(e), param_hint="--device") from None
    nbd_client = attach_mod.find_nbd_client()
    problem = attach_mod.nbd_support_problem(nbd_client=nbd_client)
    if problem:
        raise UsageError(problem)
    try:
        att = attach_mod.attach(state_dir(), image, nbd_client=nbd_client, device=device,
                                mode=mode, readonly=readonly, connections=connections,
                                block_size=block_size)
    except attach_mod.AttachError as e:
        raise UsageError(str(e)) from None
    click.echo(att.device)


@main.command()
@click.argument("target", metavar="DEVICE|IMAGE")
def detach(target):
    """Disconnect an attached device and stop its server."""
    try:
        att, state = attach_mod.detach(state_dir(), target,
                                       nbd_client=attach_mod.find_nbd_client())
    except attach_mod.AttachError as e:
        raise UsageError(str(e)) from None
    if state == "stale":
        # serve's ready file, which a killed server could not remove.
        (runtime_dir() / f"{image_key(att.image)}.{att.pid}.ready").unlink(missing_ok=True)
        click.echo(f"nbdloop: {att.device}: removed a stale attachment of {att.image} "
                   "(its server had died)", err=True)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_(as_json):
    """List attached images, like losetup -l."""
    rows = [attach_mod.describe(a) for a in attach_mod.load(state_dir())]
    if as_json:
        click.echo(json.dumps({"attachments": rows}, indent=2))
        return
    if not rows:
        return
    table = [("DEVICE", "IMAGE", "MODE", "PID", "CONNS", "STATE")]
    table += [(r["device"], r["image"], r["mode"] + (",ro" if r["readonly"] else ""),
               str(r["pid"]), str(r["connections"]), r["state"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo(" ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " " + row[-1])


@main.command("vm-check")
@click.argument("image", type=click.Path())
@click.option("--mode", type=click.Choice(backing.MODES), default="direct", show_default=True,
              help="How the server does its I/O.")
@click.option("--fstype", type=click.Choice(vmcheck.FSTYPES), default="ext4",
              show_default=True, help="The filesystem the guest makes.")
@click.option("--connections", "-C", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Connections from the guest's nbd-client (-C).")
@click.option("--block-size", "-b", type=int, callback=check_block_size,
              help="nbd-client -b [default: the image's direct-I/O alignment, as attach].")
@click.option("--timeout", type=click.IntRange(1, 3600), default=vmcheck.DEFAULT_TIMEOUT,
              show_default=True, help="Seconds before a hung guest is killed.")
@click.option("--seed", type=int, help="Seed for the files' content [default: random].")
@click.option("--force", is_flag=True,
              help="Make the filesystem even if IMAGE already holds data.")
def vm_check(image, mode, fstype, connections, block_size, timeout, seed, force):
    """Check IMAGE through the real kernel NBD client, in a VM: for machines
    without an NBD driver.  Overwrites IMAGE with a new filesystem.

    Exit status 0 if the guest and the host checks all passed, 1 if one
    failed, 2 for bad input."""
    check_permissions(image, False)
    try:
        report = vmcheck.run_vm_check(image, mode=mode, fstype=fstype,
                                      connections=connections, block_size=block_size,
                                      timeout=timeout, seed=seed, force=force,
                                      progress=lambda line: click.echo(f"vm-check: {line}"))
    except vmcheck.VmCheckError as e:
        raise UsageError(str(e)) from None
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.ok else 1)



# ---- bench ---------------------------------------------------------------------------------
from nbdloop.cli.bench import bench_command  # noqa: E402

main.add_command(bench_command, name="bench")


if __name__ == "__main__":
    main()
