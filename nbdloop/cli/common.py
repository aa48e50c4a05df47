"""What every nbdloop command shares: the one-line error, the parameter
types and the options that several commands take."""
from __future__ import annotations

import os

import click

from nbdloop import errors
from nbdloop.engine.config import MODES, ConfigError, check_segment_size
from nbdloop.kernel.nbdclient import BLOCK_SIZES
from nbdloop.sizes import parse_size


class UsageError(click.ClickException):
    """Bad usage or input: one line on stderr (nbdloop.cli.main prints it)
    and exit status 2."""
    exit_code = 2


class Failure(UsageError):
    """A failure at run time (a tool missing, the disk full): one line on
    stderr and exit status 1."""
    exit_code = 1


def one_line_error(e: BaseException) -> tuple[int, str] | None:
    """(exit status, message) of an error that nbdloop shows as one line:
    click's usage errors (2) and ours (nbdloop.errors).  None for anything
    else, which is a bug."""
    if isinstance(e, click.ClickException):
        return e.exit_code, e.format_message()     # 2 for click's usage errors
    return errors.one_line_error(e)


# ---- parameter types ----------------------------------------------------------

class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def parse_cpus(ctx, param, value):
    """Click callback: ``0-1,3`` or ``0-7:2`` -> a set of CPUs, each one this
    process may use."""
    if value is None:
        return None
    # Here, not at the top: the placement rule and its statistics would
    # cost every command their imports, and seconds on a slow machine.
    from nbdloop.engine.placement import format_cpu_list, parse_cpu_list
    try:
        cpus = parse_cpu_list(value)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a CPU list: {e}") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise click.BadParameter(f"{value!r}: usable CPUs are {format_cpu_list(allowed)}")
    return cpus


def segment_size(ctx, param, value):
    """Click callback: a segment size the engine can use."""
    try:
        return check_segment_size(value)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


def _block_size(ctx, param, value):
    if value is not None and value not in BLOCK_SIZES:
        raise click.BadParameter(f"{value} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    return value


# ---- options that several commands take ------------------------------------------

def mode_option(help: str = "direct: O_DIRECT, no page cache; buffered: through the page "
                            "cache like the classic loop device."):
    return click.option("--mode", type=click.Choice(MODES), default="direct",
                        show_default=True, help=help)


def block_size_option(help: str):
    return click.option("--block-size", "-b", type=int, callback=_block_size, help=help)


def connections_option(help: str):
    return click.option("--connections", "-C", type=click.IntRange(1, 16), default=1,
                        show_default=True, help=help)
