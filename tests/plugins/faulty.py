"""An nbdkit python plugin for tests/test_plugin_log.py: it loads nbdloop's
plugin module (and with it the log formatter nbdkit's errors go through),
then serves a 1 MiB disk whose reads fail: at offset 0 with a bug (a
ValueError), elsewhere with ENOSPC through the engine's one error path."""
import errno

import nbdkit

import nbdloop.engine.plugin  # noqa: F401 (installs the formatter)
from nbdloop.engine import uring

API_VERSION = 2


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return 1


def get_size(h):
    return 1 << 20


def pread(h, buf, offset, flags):
    if offset == 0:
        raise ValueError("a bug in the plugin")
    nbdkit.set_error(errno.ENOSPC)
    uring.check(-errno.ENOSPC, f"pread at {offset}+{len(buf)} on faulty")
