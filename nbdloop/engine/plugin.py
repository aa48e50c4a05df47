"""nbdkit plugin: ``nbdkit python nbdloop/engine/plugin.py file=IMAGE [key=value...]``.

Only callbacks live here, in lifecycle order.  Each connection gets a
:class:`Handle`; the I/O callbacks delegate to it, and it delegates to the
server's one :class:`nbdloop.backing.Backing`.

Keys: ``file`` (the image), ``fd`` (an already opened and locked descriptor
of it, inherited from ``nbdloop serve``), ``mode`` (direct|buffered),
``readonly``, ``segment-size``, ``entries``, ``export-name``, ``pin``, and
``stats-file`` (the engine's counters are written there as JSON whenever a
connection closes), ``io-flusher`` (PR_SET_IO_FLUSHER, default on) and
``mlock`` (mlockall, default off), ``placement`` (auto: under load keep
workers off the CPUs that take the disk's interrupts, and move them to the
others (or spread them) when other work crowds theirs, the default; irq: only the first;
off: neither), ``sched``
(batch: workers run under SCHED_BATCH, the default; normal: left as they are),
``outlive-parent`` (no death signal when the supervisor dies, for a device's
agent to decide; default off), ``shared`` (other nbdkit processes serve the
same image, ``serve --processes``: writes that would need a read-modify-write
are refused; default off).
"""
import builtins
import errno
import functools
import json
import os
import sys
import threading
import traceback

import nbdkit

from nbdloop.engine import placement, uring
from nbdloop.engine.backing import (DEFAULT_ENTRIES, DEFAULT_SEG_SIZE, Backing, ImageError,
                                    inspect_fd)
from nbdloop.sizes import parse_size

API_VERSION = 2

builtins_open = builtins.open   # this module's open() is nbdkit's callback

# Module state is the configuration, written only by config() on the main
# thread before any connection, and the Backing and the adaptive placement
# (a thread of its own), each set once in get_ready().  The Backing is
# shared by all connections and is thread safe (see its docstring);
# nothing else is shared.  The one other change to the interpreter is made
# once, at import: the traceback formatter that nbdkit logs errors with
# (_one_line_for_failed_requests).
_config = {
    "file": None,
    "fd": None,
    "mode": "direct",
    "readonly": False,
    "segment-size": DEFAULT_SEG_SIZE,
    "entries": DEFAULT_ENTRIES,
    "export-name": "",
    "pin": True,
    "stats-file": None,
    "io-flusher": True,
    "outlive-parent": False,
    "mlock": False,
    "placement": "auto",
    "sched": "batch",
    "shared": False,
}
_backing = None
_adaptive = None
# Keys whose value is one of a few words.
_CHOICES = {"mode": ("direct", "buffered"), "sched": ("batch", "normal"),
            "placement": ("auto", "irq", "off")}


def _bool(value):
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean")


def _reports_errno(callback):
    """The one place a request's OSError becomes the errno the client sees
    (ENOSPC stays ENOSPC, not EIO).  The exception still propagates, so
    that nbdkit fails the request and logs it."""
    @functools.wraps(callback)
    def wrapper(*args):
        try:
            return callback(*args)
        except OSError as e:
            nbdkit.set_error(e.errno or errno.EIO)
            raise
    return wrapper


_format_exception = traceback.format_exception


def _one_line_for_failed_requests(exc, value=None, tb=None, *args, **kw):
    """nbdkit logs a callback's exception with traceback.format_exception.
    A failed request (an OSError with an errno, from uring.check) is one line,
    what, where and why: ``pwrite at 4096+512 on disk.img: No space left on
    device``.  Anything else is a bug and keeps its traceback."""
    err = exc if value is None else value
    if isinstance(err, OSError) and err.errno and err.strerror:
        return [err.strerror]
    return _format_exception(exc, value, tb, *args, **kw)


traceback.format_exception = _one_line_for_failed_requests


class Handle:
    """One client connection.  The data callbacks are the Backing's own
    bound methods, so a request costs no extra Python call."""

    def __init__(self, backing, readonly):
        self.backing = backing
        self.readonly = readonly or backing.readonly
        self.pread = backing.pread
        self.pwrite = backing.pwrite


def thread_model():
    # Parallel: each nbdkit worker thread runs its requests on its own ring;
    # the Backing's only shared state (the range lock) is locked in C.
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    if key not in _config:
        raise ValueError(f"unknown parameter {key!r}")
    if key in ("readonly", "pin", "io-flusher", "mlock", "outlive-parent", "shared"):
        _config[key] = _bool(value)
    elif key == "segment-size":
        _config[key] = parse_size(value)
    elif key in ("entries", "fd"):
        _config[key] = int(value)
    elif key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ValueError(f"{key} must be {' or '.join(_CHOICES[key])}, not {value!r}")
        _config[key] = value
    else:
        _config[key] = value


def config_complete():
    if _config["file"] is None:
        raise ValueError("the file parameter is required: file=IMAGE")


def get_ready():
    global _backing, _adaptive
    # Before any worker thread exists, so that they all inherit it.
    if _config["io-flusher"]:
        try:
            uring.set_io_flusher()
        except PermissionError:
            # Needs CAP_SYS_RESOURCE, which some containers drop.
            print("nbdloop: warning: PR_SET_IO_FLUSHER not permitted (no CAP_SYS_RESOURCE); "
                  "memory reclaim in the server may wait on its own device",
                  file=sys.stderr, flush=True)
    if _config["outlive-parent"]:
        uring.outlive_parent()
    if _config["mlock"]:
        uring.lock_memory()
    kw = dict(mode=_config["mode"], readonly=_config["readonly"],
              seg_size=_config["segment-size"], entries=_config["entries"],
              pin=_config["pin"], shared=_config["shared"])
    try:
        if _config["fd"] is not None:
            # nbdloop serve opened, checked and locked the image for us.
            fd = _config["fd"]
            geometry = inspect_fd(fd, _config["file"], _config["mode"])
            _backing = Backing(fd, _config["file"], geometry, **kw)
        else:
            _backing = Backing.open(_config["file"], **kw)
    except ImageError as e:
        raise RuntimeError(str(e)) from None
    _backing.engine.set_sched_batch(_config["sched"] == "batch")
    if _config["placement"] != "off":
        where = placement.choose(_config["file"])
        if where is not None:
            _backing.engine.set_placement(set(where.busy), set(where.idle))
            busy, idle, irq = map(placement.format_cpu_list,
                                  (where.busy, where.idle, where.irq))
            _log(f"workers run on CPU {busy} under load (CPU {irq} takes the disk's "
                 f"interrupts) and anywhere on CPU {idle} when alone")
            if _config["placement"] == "auto":
                _adaptive = placement.Adaptive(where, _backing.engine.set_placement, _log,
                                               lambda: uring.stats()["requests"])
                _adaptive.start()


def _log(message):
    print(f"nbdloop: {message}", file=sys.stderr, flush=True)


def cleanup():
    # Also at exit: a server stopped right after its last client left (as
    # detach does) may never run that connection's close().
    _write_stats()
    if _adaptive is not None:
        _adaptive.stop()
    if _backing is not None:
        _backing.close()


def default_export(readonly, is_tls):
    return _config["export-name"]


def list_exports(readonly, is_tls):
    return [_config["export-name"]]


def open(readonly):
    name = nbdkit.export_name()
    if name not in ("", _config["export-name"]):
        # Export names are only compared, never used as paths.
        nbdkit.set_error(errno.ENOENT)
        raise LookupError(f"no export named {name!r}")
    return Handle(_backing, readonly)


def close(h):
    # By now nbdkit has joined this connection's workers, so their rings
    # and thread states are already counted as freed.
    _write_stats()


def _write_stats():
    path = _config["stats-file"]
    if path:
        # One temp file per call: connections close concurrently.
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with builtins_open(tmp, "w") as f:
            json.dump(uring.stats(), f)
        os.replace(tmp, path)


def get_size(h):
    return h.backing.size


def block_size(h):
    return h.backing.block_size()


def is_rotational(h):
    return False


def can_write(h):
    return not h.readonly


def can_flush(h):
    return True


def can_trim(h):
    return not h.readonly


def can_zero(h):
    return not h.readonly


def can_fast_zero(h):
    return not h.readonly


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    # No server-side cache: every connection sees the same file, and a flush
    # on one makes all completed writes durable.
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE if h.backing.direct else nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


@_reports_errno
def pread(h, buf, offset, flags):
    h.pread(buf, offset)


@_reports_errno
def pwrite(h, buf, offset, flags):
    h.pwrite(buf, offset, flags & nbdkit.FLAG_FUA != 0)


@_reports_errno
def flush(h, flags):
    h.backing.flush()


@_reports_errno
def trim(h, count, offset, flags):
    h.backing.trim(count, offset, fua=flags & nbdkit.FLAG_FUA != 0)


@_reports_errno
def zero(h, count, offset, flags):
    h.backing.zero(count, offset,
                   may_trim=flags & nbdkit.FLAG_MAY_TRIM != 0,
                   fast=flags & nbdkit.FLAG_FAST_ZERO != 0,
                   fua=flags & nbdkit.FLAG_FUA != 0)


@_reports_errno
def cache(h, count, offset, flags):
    h.backing.prefetch(count, offset)


@_reports_errno
def extents(h, count, offset, flags):
    return h.backing.extents(count, offset, req_one=flags & nbdkit.FLAG_REQ_ONE != 0)
