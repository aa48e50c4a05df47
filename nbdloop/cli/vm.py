"""``nbdloop vm-check``: the real kernel NBD client, in a VM, against an image
served from this host.  The logic is in :mod:`nbdloop.kernel.vmcheck`."""
from __future__ import annotations

import sys

import click

from nbdloop.cli.common import block_size_option, connections_option, mode_option
from nbdloop.kernel import vmcheck
from nbdloop.serve.cmdline import require_permissions


@click.command("vm-check")
@click.argument("image", type=click.Path())
@mode_option("How the server does its I/O.")
@click.option("--fstype", type=click.Choice(vmcheck.FSTYPES), default="ext4",
              show_default=True, help="The filesystem the guest makes.")
@connections_option("Connections from the guest's nbd-client (-C).")
@block_size_option("nbd-client -b [default: the image's direct-I/O alignment, as attach].")
@click.option("--timeout", type=click.IntRange(1, 3600), default=vmcheck.DEFAULT_TIMEOUT,
              show_default=True, help="Seconds before a hung guest is killed.")
@click.option("--seed", type=int, help="Seed for the files' content [default: random].")
@click.option("--force", is_flag=True,
              help="Make the filesystem even if IMAGE already holds data.")
def vm_check(image, mode, fstype, connections, block_size, timeout, seed, force):
    """Check IMAGE through the real kernel NBD client, in a VM: for machines
    without an NBD driver.  Overwrites IMAGE with a new filesystem.

    Exit status 0 if the guest and the host checks all passed, 1 if one
    failed, 2 for bad input."""
    require_permissions(image, False)
    report = vmcheck.run_vm_check(image, mode=mode, fstype=fstype,
                                  connections=connections, block_size=block_size,
                                  timeout=timeout, seed=seed, force=force,
                                  progress=lambda line: click.echo(f"vm-check: {line}"))
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.ok else 1)
