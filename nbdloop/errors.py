"""The errors nbdloop shows as one line, wherever they are shown: on the
command line, or in the daemon's answer to a command.

Standard library only: the CLI and the daemon both use it.
"""
from __future__ import annotations

import sys

#: The errors of the layers below, shown as one line.  The exit status is
#: the error's ``exit_status``: 2 for bad usage or input (the default), 1 for
#: a failure at run time (the server died, the kernel refused).  Named, not
#: imported: an error can only be of a type whose module has been loaded.
KNOWN_ERRORS = (
    ("nbdloop.bench.command", "BenchError"),
    ("nbdloop.daemon.control", "ControlSocketError"),
    ("nbdloop.daemon.control", "DaemonError"),
    ("nbdloop.daemon.servers", "ServerError"),
    ("nbdloop.daemon.users", "UserError"),
    ("nbdloop.engine.backing", "ImageError"),
    ("nbdloop.engine.config", "ConfigError"),
    ("nbdloop.kernel.attach", "AttachError"),
    ("nbdloop.kernel.handshake", "HandshakeError"),
    ("nbdloop.kernel.netlink", "KernelError"),
    ("nbdloop.kernel.table", "TableError"),
    ("nbdloop.kernel.vmcheck", "VmCheckError"),
    ("nbdloop.paths", "PathError"),
    ("nbdloop.serve.cmdline", "ServeError"),
    ("nbdloop.vm.tools", "VmError"),
)


def one_line_error(e: BaseException) -> tuple[int, str] | None:
    """(exit status, message) of an error of ours; None for anything else,
    which is a bug."""
    for module, name in KNOWN_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(e, getattr(loaded, name)):
            return getattr(e, "exit_status", 2), " ".join(str(e).split())
    return None
