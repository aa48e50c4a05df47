"""What every nbdloop command shares: the one-line error, the size type and
the CPU-list option."""
from __future__ import annotations

import os

import click

from nbdloop.engine.placement import format_cpu_list
from nbdloop.sizes import parse_size


class UsageError(click.ClickException):
    """One line on stderr and exit status 2."""
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"nbdloop: {self.format_message()}", err=True)


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
    """Click callback: ``0-1,3`` -> {0, 1, 3}, each one a CPU this process may use."""
    if value is None:
        return None
    cpus: set[int] = set()
    try:
        for part in value.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a CPU list (like 0, 0-1, 0,2)") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise click.BadParameter(f"{value!r}: usable CPUs are {format_cpu_list(allowed)}")
    return cpus
