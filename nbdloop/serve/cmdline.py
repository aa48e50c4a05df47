"""nbdkit's command line for serving an image with nbdloop's plugin, and
the checks ``nbdloop serve`` makes before it starts nbdkit.

Every check raises :class:`ServeError` with one line; the CLI shows it.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import socket
import stat
from pathlib import Path

from nbdloop import paths
from nbdloop.engine.config import Server, plugin_keys
from nbdloop.sizes import SECTOR, format_size


class ServeError(Exception):
    """Bad input for a server: one line, nothing was started."""


def image_key(image: str) -> str:
    """A short, stable name for an image: its basename and a hash of its path."""
    real = os.path.realpath(image)
    digest = hashlib.sha256(real.encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(real).name)
    return f"{stem}-{digest}"


def default_socket(image: str) -> Path:
    return paths.runtime_dir() / f"{image_key(image)}.sock"


def ready_files(image: str, supervisor: int, processes: int) -> list[Path]:
    """Where each nbdkit process of the supervisor ``supervisor`` says it is
    ready (its pidfile)."""
    key = f"{image_key(image)}.{supervisor}"
    return [paths.runtime_dir() / (f"{key}.{k}.ready" if processes > 1 else f"{key}.ready")
            for k in range(processes)]


def process_socket(path: Path | str, k: int) -> Path:
    """The socket of its own that process ``k`` of a server with
    ``--processes`` listens on (process 0 also on ``path``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{k}")


def process_stats_file(path: str, k: int) -> str:
    """Where process ``k`` of several writes its engine counters: process
    0 to the stats file itself, the others beside it."""
    return f"{path}.{k}" if k else path


def listen_unix(path: Path, above: int) -> socket.socket:
    """A listening unix socket at ``path`` (mode 0600) whose descriptor is
    above ``above``, for nbdkit to inherit (see supervise.Child).  Never
    one socket for several processes: all would wake for a connection, and
    the losers would sleep in accept (a blocking socket) or retry it at once
    until the next one (nbdkit 1.32, a non-blocking socket), deaf to their
    other socket and to SIGTERM."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen(128)
        return socket.socket(fileno=fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, above + 1))
    except OSError as e:
        raise ServeError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        s.close()


def require_free_socket(path: Path) -> None:
    """Refuse a socket path that a live server owns; clear a stale one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ServeError(f"socket directory {path.parent} does not exist") from None
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # a dead server's leftover
        return
    except OSError as e:
        raise ServeError(f"socket {path}: {e.strerror}") from None
    finally:
        s.close()
    raise ServeError(f"socket {path} is already in use by a running server")


def require_free_port(bind: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((bind, port))
    except OSError as e:
        raise ServeError(f"cannot listen on {bind}:{port}: {e.strerror}") from None
    finally:
        s.close()


@dataclasses.dataclass(frozen=True)
class Slice:
    """The byte range of an image that is served (losetup's --offset and
    --sizelimit), as nbdkit's offset filter takes it.  ``filtered``: the
    options were given, so the filter serves it; else it is the whole
    image, served as it is."""

    offset: int
    length: int
    filtered: bool = True

    @property
    def end(self) -> int:
        return self.offset + self.length


def require_slice(size: int, align: int, mode: str, offset: int, sizelimit: int) -> Slice:
    """The slice of an image of ``size`` bytes that ``--offset`` and
    ``--sizelimit`` name (0: to the end; past the end: to the end, as
    losetup does); neither: the whole image.  Its length must be whole
    sectors (a device's size is).  In direct mode it must start and end on
    the direct-I/O alignment: a read-modify-write of an edge block would
    rewrite bytes outside it."""
    if not offset and not sizelimit:
        return Slice(0, size, filtered=False)
    if offset >= size:
        raise ServeError(f"--offset {offset} is not inside the image ({format_size(size)}, "
                         f"{size} bytes)")
    length = size - offset if sizelimit == 0 else min(sizelimit, size - offset)
    if mode == "direct":
        for what, value in (("--offset", offset), ("the slice's end", offset + length)):
            if value % align:
                raise ServeError(f"{what} {value} is not a multiple of the image's direct-I/O "
                                 f"alignment, {align} (or use --mode buffered)")
    if length % SECTOR:
        raise ServeError(f"the slice's length {length} is not a multiple of {SECTOR} bytes")
    return Slice(offset, length)


def require_permissions(image: str, readonly: bool) -> None:
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
        raise ServeError(f"{image}: is not readable (mode {mode:04o})")
    if not readonly and not mode & 0o222:
        raise ServeError(f"{image}: is read-only (mode {mode:04o}); "
                         "use --readonly to serve it read-only")


def nbdkit_argv(server: Server, *, exit_with_parent: bool = True) -> list[str]:
    """The nbdkit command line that serves ``server`` with our plugin.
    ``exit_with_parent``: nbdkit gets SIGTERM when the supervisor dies (not
    the daemon's servers, which outlive the daemon).  A slice of a fixed
    export is served through nbdkit's offset filter."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise ServeError("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    # An exports directory's exports each have their own slice and readonly
    # flag, which the plugin applies: the offset filter and --readonly would
    # apply to all of them alike.
    export = server.export if server.exports_dir is None else None
    readonly = export is not None and export.readonly
    sliced = export is not None and export.sliced
    argv = [nbdkit, "--foreground", "--threads", str(server.threads)]
    if exit_with_parent:
        argv.append("--exit-with-parent")
    if server.socket is not None:
        argv += ["--unix", server.socket]
    elif server.port is not None:
        argv += ["--port", str(server.port), "--ipaddr", server.bind]
    # else nbdkit inherits its listening sockets (supervise.Child).
    if readonly:
        argv.append("--readonly")
    if server.pidfile:
        argv += ["--pidfile", server.pidfile]
    if server.verbose:
        argv.append("--verbose")
    if server.tls_psk:
        # require: a client that does not do TLS with a key from the file is refused.
        argv += ["--tls=require", f"--tls-psk={os.path.abspath(server.tls_psk)}"]
    if sliced:
        argv.append("--filter=offset")
    argv += ["python", str(paths.PLUGIN), *plugin_keys(server)]
    if sliced:
        argv += [f"offset={export.offset}", f"range={export.length}"]
    return argv


def require_psk_file(path: str) -> None:
    """A PSK file as nbdkit (GnuTLS) reads it: ``username:hexkey`` lines."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ServeError(f"TLS PSK file {path}: {e.strerror}") from None
    entries = [ln for ln in text.splitlines() if ln.strip()]
    for ln in entries:
        user, sep, key = ln.partition(":")
        if not sep or not user or not key or len(key) % 2 or \
                any(c not in "0123456789abcdefABCDEF" for c in key):
            raise ServeError(f"TLS PSK file {path}: lines must be username:hexkey")
    if not entries:
        raise ServeError(f"TLS PSK file {path}: no keys in it")


def plugin_env() -> dict[str, str]:
    """nbdkit embeds Debian's python3: point it at this package.

    The embedded interpreter finds its standard library from the first
    ``python3`` on PATH unless told otherwise; with another Python first on
    PATH (pyenv, a venv) it would load a foreign stdlib and miss Debian's
    dist-packages (where _cffi_backend lives).  PYTHONHOME pins it to /usr.

    nbdkit gets tcmalloc in place of glibc's allocator where it is
    installed: the request buffers nbdkit reallocs then sit on 512-byte
    boundaries (page boundaries from 4 KiB up), where glibc puts them 16
    bytes past one, so direct mode does its I/O on them with no bounce
    copy.  The engine checks every address anyway.  Aggressive decommit
    gives a closed connection's buffers back to the system, as glibc does.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONHOME", paths.EMBEDDED_PYTHON_HOME)
    search = [str(paths.PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(search)
    if os.path.exists(paths.ALLOCATOR):
        env["LD_PRELOAD"] = " ".join(filter(None, [paths.ALLOCATOR, env.get("LD_PRELOAD")]))
        env.setdefault("TCMALLOC_AGGRESSIVE_DECOMMIT", "true")
    return env
