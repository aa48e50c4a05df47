"""Write nbdloop's man pages, one for nbdloop and one per command, from the
click definitions themselves (click-man), so that they cannot drift from
--help.  Usage: python scripts/manpages.py DIRECTORY (make install)."""
from __future__ import annotations

import sys
from importlib.metadata import version

import click
from click_man.core import write_man_pages

from nbdloop.cli.main import main


def whole_group() -> click.Group:
    """The command group with every command loaded: nbdloop's own loads a
    command only when it runs, and click-man reads the loaded ones."""
    ctx = click.Context(main)
    commands = {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}
    return click.Group("nbdloop", commands=commands, help=main.help)


if __name__ == "__main__":
    write_man_pages("nbdloop", whole_group(), version=version("nbdloop"), target_dir=sys.argv[1])
