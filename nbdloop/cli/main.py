"""The ``nbdloop`` command: the click group, and the one place that turns
an error into one line on stderr and an exit status.

One module per command family: image (create), serve, kernel (attach,
detach, list), vm (vm-check, vm-run), bench.  They hold options and wiring;
the logic lives in the packages beside this one.  A command's module is
imported only when that command runs (click's lazy group), because every
``nbdloop`` call pays for its imports, and under a VM that is seconds.
"""
from __future__ import annotations

import importlib
import sys

import click

from nbdloop.cli.common import UsageError

#: Command name -> "module:attribute".
COMMANDS = {
    "create": "nbdloop.cli.image:create",
    "serve": "nbdloop.cli.serve:serve",
    "attach": "nbdloop.cli.kernel:attach",
    "detach": "nbdloop.cli.kernel:detach",
    "list": "nbdloop.cli.kernel:list_",
    "restart": "nbdloop.cli.kernel:restart",
    "vm-check": "nbdloop.cli.vm:vm_check",
    "vm-run": "nbdloop.cli.vm:vm_run",
    "bench": "nbdloop.cli.bench:bench_command",
}

#: The errors of the layers below, shown as one line.  The exit status is
#: the error's ``exit_status``: 2 for bad usage or input (the default), 1 for
#: a failure at run time (the server died, the kernel refused).  Named, not
#: imported: an error can only be of a type whose module has been loaded.
KNOWN_ERRORS = (
    ("nbdloop.engine.backing", "ImageError"),
    ("nbdloop.kernel.attach", "AttachError"),
    ("nbdloop.kernel.netlink", "KernelError"),
    ("nbdloop.kernel.vmcheck", "VmCheckError"),
    ("nbdloop.paths", "PathError"),
    ("nbdloop.serve.cmdline", "ServeError"),
    ("nbdloop.vm.tools", "VmError"),
)


def is_known_error(e: BaseException) -> bool:
    for module, name in KNOWN_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(e, getattr(loaded, name)):
            return True
    return False


class NbdloopGroup(click.Group):
    """Commands loaded when used; every error is one line on stderr, with
    exit status 2 for bad usage or input and 1 for a failure at run time."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def main(self, args=None, prog_name=None, complete_var=None,
             standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            if isinstance(e, UsageError):
                e.show()
                sys.exit(e.exit_code)
            click.echo(f"nbdloop: {e.format_message()}", err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        except click.Abort:
            click.echo("nbdloop: aborted", err=True)
            sys.exit(1)
        except Exception as e:
            if not is_known_error(e):
                raise
            click.echo(f"nbdloop: {e}", err=True)
            sys.exit(getattr(e, "exit_status", 2))
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=NbdloopGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbdloop")
def main() -> None:
    """nbdloop: a userspace loop device.  Serve a file over NBD through
    io_uring, in direct (O_DIRECT) or buffered (page cache) mode."""


if __name__ == "__main__":
    main()
