"""What every nbdloop command shares: the one-line error and the size type."""
from __future__ import annotations

import click

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
