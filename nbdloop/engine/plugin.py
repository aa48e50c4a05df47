"""nbdkit plugin: ``nbdkit python nbdloop/engine/plugin.py file=IMAGE [key=value...]``.

Only callbacks live here, in lifecycle order.  Each connection gets a
:class:`Handle`; the I/O callbacks delegate to it, and it delegates to the
server's one :class:`nbdloop.engine.backing.Backing`.

The keys are those of :mod:`nbdloop.engine.config`, which parses them into
the same :class:`~nbdloop.engine.config.Server` that the tooling rendered
them from: ``file`` (the image), ``fd`` (an already opened and locked
descriptor of it, inherited from ``nbdloop serve``), ``mode``
(direct|buffered), ``readonly``, ``segment-size``, ``export-name``,
``placement`` (irq: under load keep the workers off the CPUs that take the
disk's interrupts, the default; off: leave them to the scheduler),
``stats-file`` (the engine's counters are written there as JSON whenever a
connection closes), ``mlock`` (mlockall, default off), ``outlive-parent``
(no death signal when the supervisor dies, for a device's agent to decide)
and ``shared`` (other nbdkit processes serve the same image, ``serve
--processes``: writes that would need a read-modify-write are refused).
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

from nbdloop.engine import config as cfg
from nbdloop.engine import placement, uring
from nbdloop.engine.backing import Backing, ImageError, inspect_fd

API_VERSION = 2

builtins_open = builtins.open   # this module's open() is nbdkit's callback

# Module state is the configuration, written only by config() and
# config_complete() on the main thread before any connection, and the
# Backing, set once in get_ready().  The Backing is shared by all
# connections and is thread safe (see its docstring); nothing else is
# shared.  The one other change to the interpreter is made once, at import:
# the traceback formatter that nbdkit logs errors with
# (_one_line_for_failed_requests).
_pairs = []
_server = None
_backing = None


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
    _pairs.append((key, value))


def config_complete():
    global _server
    _server = cfg.from_plugin_keys(_pairs)
    if len(_server.exports) != 1:
        raise ValueError("this plugin serves one export: give file= once")


def get_ready():
    global _backing
    export = _server.export
    # Before any worker thread exists, so that they all inherit it.
    try:
        uring.set_io_flusher()
    except PermissionError:
        # Needs CAP_SYS_RESOURCE, which some containers drop.
        print("nbdloop: warning: PR_SET_IO_FLUSHER not permitted (no CAP_SYS_RESOURCE); "
              "memory reclaim in the server may wait on its own device",
              file=sys.stderr, flush=True)
    if _server.outlive_parent:
        uring.outlive_parent()
    if _server.mlock:
        uring.lock_memory()
    kw = dict(mode=export.mode, readonly=export.readonly, seg_size=export.segment_size,
              pin=True, shared=_server.shared)
    try:
        if export.fd is not None:
            # nbdloop serve opened, checked and locked the image for us.
            geometry = inspect_fd(export.fd, export.image, export.mode)
            _backing = Backing(export.fd, export.image, geometry, **kw)
        else:
            _backing = Backing.open(export.image, **kw)
    except ImageError as e:
        raise RuntimeError(str(e)) from None
    _backing.engine.set_sched_batch(True)
    if _server.placement == "irq":
        where = placement.choose(export.image)
        if where is not None:
            _backing.engine.set_placement(set(where.busy), set(where.idle))
            busy, idle, irq = map(placement.format_cpu_list,
                                  (where.busy, where.idle, where.irq))
            _log(f"workers run on CPU {busy} under load (CPU {irq} takes the disk's "
                 f"interrupts) and anywhere on CPU {idle} when alone")


def _log(message):
    print(f"nbdloop: {message}", file=sys.stderr, flush=True)


def cleanup():
    # Also at exit: a server stopped right after its last client left (as
    # detach does) may never run that connection's close().
    _write_stats()
    if _backing is not None:
        _backing.close()


def default_export(readonly, is_tls):
    return _server.export.name


def list_exports(readonly, is_tls):
    return [_server.export.name]


def open(readonly):
    name = nbdkit.export_name()
    if name not in ("", _server.export.name):
        # Export names are only compared, never used as paths.
        nbdkit.set_error(errno.ENOENT)
        raise LookupError(f"no export named {name!r}")
    return Handle(_backing, readonly)


def close(h):
    # By now nbdkit has joined this connection's workers, so their rings
    # and thread states are already counted as freed.
    _write_stats()


def _write_stats():
    path = _server.stats_file if _server is not None else None
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
