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

from nbdloop.cli.common import one_line_error

#: Command name -> "module:attribute".
COMMANDS = {
    "create": "nbdloop.cli.image:create",
    "serve": "nbdloop.cli.serve:serve",
    "attach": "nbdloop.cli.kernel:attach",
    "detach": "nbdloop.cli.kernel:detach",
    "list": "nbdloop.cli.kernel:list_",
    "restart": "nbdloop.cli.kernel:restart",
    "resize": "nbdloop.cli.kernel:resize",
    "daemon": "nbdloop.cli.kernel:daemon",
    "vm-check": "nbdloop.cli.vm:vm_check",
    "vm-run": "nbdloop.cli.vm:vm_run",
    "bench": "nbdloop.cli.bench:bench_command",
}

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
        except click.Abort:
            click.echo("nbdloop: aborted", err=True)
            sys.exit(1)
        except Exception as e:
            known = one_line_error(e)
            if known is None:
                raise       # a bug: its traceback is what helps
            click.echo(f"nbdloop: {known[1]}", err=True)
            sys.exit(known[0])
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
