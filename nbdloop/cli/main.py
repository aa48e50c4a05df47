"""The ``nbdloop`` command: the click group, and the one place that turns
an error into one line on stderr and an exit status.

One module per command family: image (create), serve, kernel (attach,
detach, list), vm (vm-check), bench.  They hold options and wiring; the
logic lives in the packages beside this one.
"""
from __future__ import annotations

import sys

import click

from nbdloop.cli.bench import bench_command
from nbdloop.cli.common import UsageError
from nbdloop.cli.image import create
from nbdloop.cli.kernel import attach, detach, list_
from nbdloop.cli.serve import serve
from nbdloop.cli.vm import vm_check
from nbdloop.engine.backing import ImageError
from nbdloop.kernel.attach import AttachError
from nbdloop.kernel.vmcheck import VmCheckError
from nbdloop.paths import PathError
from nbdloop.serve.cmdline import ServeError

#: Bad input found by the layers below: one line, exit status 2.
INPUT_ERRORS = (ImageError, AttachError, VmCheckError, PathError, ServeError)


class OneLineErrors(click.Group):
    """Every usage or validation error is one line on stderr, exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None,
             standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except INPUT_ERRORS as e:
            click.echo(f"nbdloop: {e}", err=True)
            sys.exit(2)
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


for command in (create, serve, attach, detach, list_, vm_check):
    main.add_command(command)
main.add_command(bench_command, name="bench")


if __name__ == "__main__":
    main()
