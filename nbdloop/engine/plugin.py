"""nbdkit plugin: ``nbdkit python nbdloop/engine/plugin.py file=IMAGE [key=value...]``,
or ``exports-dir=DIR`` instead of ``file=IMAGE``.

Only callbacks live here, in lifecycle order.  Each connection gets a
:class:`Handle`; the I/O callbacks delegate to it, and it delegates to a
:class:`nbdloop.engine.backing.Backing`.

A server of one export (``file``) has one Backing for all its connections.
A server of an exports directory serves many, which may be added while it
runs: ``DIR/NAME.json`` (:func:`nbdloop.engine.config.export_json`) defines
the export ``NAME`` and is read when a client asks for it.  An export's
Backing is opened, and its image locked, by its first connection, and
closed by its last.

The keys are those of :mod:`nbdloop.engine.config`, which parses them into
the same :class:`~nbdloop.engine.config.Server` that the tooling rendered
them from: ``exports-dir``, ``file`` (the image), ``fd`` (an already
opened and locked descriptor of it, inherited from ``nbdloop serve``),
``mode`` (direct|buffered), ``readonly``, ``segment-size``, ``export-name``,
``placement`` (irq: under load keep the workers off the CPUs that take the
disk's interrupts, the default; off: leave them to the scheduler),
``stats-file`` (the engine's counters are written there as JSON whenever a
connection closes), ``mlock`` (mlockall, default off), ``outlive-parent``
(no death signal when the parent dies: the daemon's servers outlive it)
and ``shared`` (other nbdkit processes serve the same image, ``serve
--processes``: writes that would need a read-modify-write are refused).
"""
import builtins
import errno
import fcntl
import functools
import json
import os
import sys
import threading
import time
import traceback

import nbdkit

from nbdloop.engine import config as cfg
from nbdloop.engine import placement, uring
from nbdloop.engine.backing import Backing, ImageError, adopt_image, inspect_fd

API_VERSION = 2

builtins_open = builtins.open   # this module's open() is nbdkit's callback

# Module state is the configuration, written only by config() and
# config_complete() on the main thread before any connection, and the
# Backings.  A server of one export has one, set once in get_ready().  An
# exports directory's are in _opened, which open() and close() change
# under _opened_lock, from the threads of different connections.  A
# Backing is shared by its connections and is thread safe (see its
# docstring); nothing else is shared.  The one other change to the
# interpreter is made once, at import: the traceback formatter that nbdkit
# logs errors with (_one_line_for_failed_requests).
_pairs = []
_server = None
_backing = None
_opened = {}
_opened_lock = threading.Lock()
#: An export's definition is a few hundred bytes: a larger file is not one.
MAX_DEFINITION = 64 * 1024
#: A worker's ring unused this long is freed (and built again at its next
#: request).
RING_IDLE_SECONDS = 10.0


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
    """One client connection.  The data callbacks are bound methods of the
    Backing, so a request costs no extra Python call, or of a
    :class:`Slice` of it, which adds one.  ``opened``: the
    :class:`Opened` that counts this connection, with an exports directory."""

    def __init__(self, backing, readonly, served=None, opened=None):
        self.backing = backing
        self.readonly = readonly or backing.readonly
        self.opened = opened
        served = backing if served is None else served
        self.size = served.size
        self.pread = served.pread
        self.pwrite = served.pwrite
        self.trim = served.trim
        self.zero = served.zero
        self.prefetch = served.prefetch
        self.extents = served.extents


class Slice:
    """Bytes [offset, offset + size) of a Backing, served as a whole disk:
    each request moves by ``offset``.  nbdkit refuses any request that
    does not fit in ``size`` (get_size), so none leaves the slice."""

    def __init__(self, backing, offset, size):
        self.backing = backing
        self.offset = offset
        self.size = size

    def pread(self, buf, offset):
        self.backing.pread(buf, self.offset + offset)

    def pwrite(self, buf, offset, fua=False):
        self.backing.pwrite(buf, self.offset + offset, fua)

    def trim(self, count, offset, fua=False):
        self.backing.trim(count, self.offset + offset, fua)

    def zero(self, count, offset, may_trim=False, fast=False, fua=False):
        self.backing.zero(count, self.offset + offset, may_trim, fast, fua)

    def prefetch(self, count, offset):
        self.backing.prefetch(count, self.offset + offset)

    def extents(self, count, offset, req_one=False):
        start = self.offset
        return [(at - start, n, kind)
                for at, n, kind in self.backing.extents(count, start + offset, req_one)]


class Opened:
    """An exports directory's Backing and how many connections use it."""

    def __init__(self, key, backing):
        self.key = key
        self.backing = backing
        self.users = 0


# ---- an exports directory's exports ------------------------------------------------

def _fail(err, message):
    """Fail the callback with ``err``: nbdkit logs ``message`` in one line."""
    nbdkit.set_error(err)
    uring.check(-err, message)


def _is_export_name(name):
    try:
        cfg.check_export_name(name)
    except cfg.ConfigError:
        return False
    return True


def _open_export(name, readonly):
    """A connection to the export ``name``: its definition read now, its
    Backing shared with its other connections."""
    # The name becomes part of a path only once it is known to hold no
    # "/" and to be no "..".
    if not _is_export_name(name):
        _fail(errno.ENOENT, f"no export named {name[:80]!r}")
    path = os.path.join(_server.exports_dir, f"{name}.json")
    try:
        with builtins_open(path, "rb") as f:
            text = f.read(MAX_DEFINITION + 1)
    except FileNotFoundError:
        _fail(errno.ENOENT, f"no export named {name!r} (no {path})")
    except OSError as e:
        _fail(e.errno or errno.EIO, f"export {name!r}: reading {path}: {e.strerror}")
    if len(text) > MAX_DEFINITION:
        _fail(errno.EINVAL, f"export {name!r}: {path}: larger than any export definition")
    try:
        export = cfg.export_from_json(text)
    except cfg.ConfigError as e:
        _fail(errno.EINVAL, f"export {name!r}: {path}: {e}")
    opened = _acquire(name, export)
    try:
        served = _slice(name, opened.backing, export) if export.sliced else None
        return Handle(opened.backing, readonly, served, opened)
    except BaseException:
        _release(opened)
        raise


def _acquire(name, export):
    """The Opened of ``export``'s image, opening it for its first
    connection, with this one counted."""
    # Keyed by what the Backing is opened with, so that two exports of one
    # image (two slices of a disk) share it: a Backing of its own would
    # find the image locked by the first.
    # An image given as an inherited descriptor (a user's, which this
    # process may not open by its path) is known by that descriptor.
    where = os.path.realpath(export.image) if export.fd is None else export.fd
    key = (where, export.mode, export.readonly, export.segment_size)
    with _opened_lock:
        opened = _opened.get(key)
        if opened is None:
            shared = _server.shared
            kw = dict(mode=export.mode, readonly=export.readonly,
                      seg_size=export.segment_size, pin=True, shared=shared)
            try:
                if export.fd is not None:
                    backing = _adopt(export, lock=not shared, **kw)
                else:
                    backing = Backing.open(export.image, lock=not shared, **kw)
            except ImageError as e:
                _fail(_image_errno(export.image, e), f"export {name!r}: {e}")
            try:
                if shared:
                    _lock_shared(name, backing)
                _prepare(backing, export.image, f"export {name!r}: ")
            except BaseException:
                _close(backing)
                raise
            opened = _opened[key] = Opened(key, backing)
        opened.users += 1
        return opened


def _adopt(export, lock, **kw):
    """A Backing of the descriptor ``export`` names, through a copy of it:
    the inherited one stays for the next connections once this Backing
    closes."""
    try:
        fd = os.dup(export.fd)
    except OSError as e:
        raise ImageError(f"{export.image}: descriptor {export.fd}: {e.strerror}") from None
    try:
        geometry = adopt_image(fd, export.image, mode=kw["mode"], readonly=kw["readonly"],
                               lock=lock)
        return Backing(fd, export.image, geometry, **kw)
    except BaseException:
        os.close(fd)
        raise


def _lock_shared(name, backing):
    """The lock of an image that the other processes of this server's
    group serve too: each takes a shared lock of its own, which keeps out
    any server that would write it alone, as Backing.open's exclusive lock
    does for one process.  (With one export, the supervisor locks the
    image for all of them instead, and they inherit its descriptor.)"""
    try:
        fcntl.flock(backing.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        _fail(errno.EBUSY, f"export {name!r}: {backing.path}: already in use by another "
                           "nbdloop server (the image is locked)")


def _close(backing):
    # Backing.close leaves a shared image's lock alone, as it belongs to the
    # supervisor with one export; here it is this process's own.  Unlocked
    # first, as Backing.close does, since io_uring may hold the file a
    # moment longer.
    if backing.shared and backing.fd >= 0:
        fcntl.flock(backing.fd, fcntl.LOCK_UN)
    backing.close()


def _image_errno(image, error):
    """The errno for an image that Backing.open refused.  ImageError has
    none; a lock held elsewhere is the one failure a client may retry."""
    if not os.path.lexists(image):
        return errno.ENOENT
    if "locked" in str(error):
        return errno.EBUSY
    return errno.EINVAL


def _release(opened):
    """One connection fewer for ``opened``; the last closes its Backing,
    which unlocks the image for whoever serves it next."""
    with _opened_lock:
        opened.users -= 1
        if opened.users == 0:
            del _opened[opened.key]
            _close(opened.backing)


def _slice(name, backing, export):
    """The :class:`Slice` that ``export`` serves of ``backing``, if it fits
    in the image."""
    if export.offset >= backing.size:
        _fail(errno.EINVAL, f"export {name!r}: the slice's offset {export.offset} is not "
                            f"inside {export.image} ({backing.size} bytes)")
    length = export.length or backing.size - export.offset
    end = export.offset + length
    if end > backing.size:
        _fail(errno.EINVAL, f"export {name!r}: the slice {export.offset}+{length} ends "
                            f"past the end of {export.image} ({backing.size} bytes)")
    # Like nbdloop serve: a read-modify-write of an edge block that is only
    # partly in the slice would write bytes outside it.
    if (export.offset | end) % backing.io_align:
        _fail(errno.EINVAL, f"export {name!r}: the slice {export.offset}+{length} does "
                            f"not start and end on the image's direct-I/O alignment, "
                            f"{backing.io_align} (or use buffered mode)")
    return Slice(backing, export.offset, length)


# ---- nbdkit's callbacks, in lifecycle order ------------------------------------------

def thread_model():
    # Parallel: each nbdkit worker thread runs its requests on its own ring;
    # the Backing's only shared state (the range lock) is locked in C, and
    # an exports directory's table of open Backings by _opened_lock.
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    _pairs.append((key, value))


def config_complete():
    global _server
    _server = cfg.from_plugin_keys(_pairs)
    if _server.exports_dir is not None:
        if not os.path.isdir(_server.exports_dir):
            raise RuntimeError(f"exports-dir {_server.exports_dir}: not a directory")
    elif len(_server.exports) != 1:
        raise ValueError("this plugin serves one export: give file= once")


def get_ready():
    global _backing
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
    threading.Thread(target=_release_idle_rings, name="nbdloop-idle", daemon=True).start()
    if _server.exports_dir is not None:
        return   # each export's Backing is opened by its first connection
    export = _server.export
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
    _prepare(_backing, export.image)


def _prepare(backing, image, who=""):
    """Scheduling and placement of ``backing``'s workers, before any of
    them calls in; ``who`` starts what is logged."""
    backing.engine.set_sched_batch(True)
    if _server.placement == "irq":
        where = placement.choose(image)
        if where is not None:
            backing.engine.set_placement(set(where.busy), set(where.idle))
            busy, idle, irq = map(placement.format_cpu_list,
                                  (where.busy, where.idle, where.irq))
            _log(f"{who}workers run on CPU {busy} under load (CPU {irq} takes the disk's "
                 f"interrupts) and anywhere on CPU {idle} when alone")


def _release_idle_rings():
    """Give back what an idle worker holds: nbdkit's workers live as long
    as their connection (a kernel device's: as long as the device), and a
    ring with its bounce slots, once used, would stay with its worker."""
    while True:
        time.sleep(RING_IDLE_SECONDS / 2)
        uring.release_idle(RING_IDLE_SECONDS)


def _log(message):
    print(f"nbdloop: {message}", file=sys.stderr, flush=True)


def cleanup():
    # Also at exit: a server stopped right after its last client left (as
    # detach does) may never run that connection's close().
    _write_stats()
    if _backing is not None:
        _backing.close()
    with _opened_lock:
        for opened in _opened.values():
            _close(opened.backing)
        _opened.clear()


def default_export(readonly, is_tls):
    # An exports directory has no default: a client names its export.
    return _server.export.name if _server.exports_dir is None else ""


def list_exports(readonly, is_tls):
    if _server.exports_dir is None:
        return [_server.export.name]
    try:
        files = os.listdir(_server.exports_dir)
    except OSError as e:
        _fail(e.errno, f"listing exports-dir {_server.exports_dir}: {e.strerror}")
    return sorted(name for name, ext in map(os.path.splitext, files)
                  if ext == ".json" and _is_export_name(name))


def open(readonly):
    if _server.exports_dir is not None:
        return _open_export(nbdkit.export_name(), readonly)
    name = nbdkit.export_name()
    if name not in ("", _server.export.name):
        # Export names are only compared, never used as paths.
        nbdkit.set_error(errno.ENOENT)
        raise LookupError(f"no export named {name!r}")
    return Handle(_backing, readonly)


def close(h):
    # By now nbdkit has joined this connection's workers, so their rings
    # and thread states are already counted as freed, and none of them
    # uses the Backing that _release may close.
    if h.opened is not None:
        _release(h.opened)
    # Last, so that once the stats are written the Backing is released.
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
    return h.size


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
    h.trim(count, offset, fua=flags & nbdkit.FLAG_FUA != 0)


@_reports_errno
def zero(h, count, offset, flags):
    h.zero(count, offset,
           may_trim=flags & nbdkit.FLAG_MAY_TRIM != 0,
           fast=flags & nbdkit.FLAG_FAST_ZERO != 0,
           fua=flags & nbdkit.FLAG_FUA != 0)


@_reports_errno
def cache(h, count, offset, flags):
    h.prefetch(count, offset)


@_reports_errno
def extents(h, count, offset, flags):
    return h.extents(count, offset, req_one=flags & nbdkit.FLAG_REQ_ONE != 0)
