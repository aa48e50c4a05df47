"""The VM family: ``nbdloop vm-check``, the real kernel NBD client in a VM
against an image served from this host (:mod:`nbdloop.kernel.vmcheck`), and
``nbdloop vm-run``, a script run in a VM that boots this machine's own root
and so runs the whole product on one kernel (:mod:`nbdloop.vm.product`)."""
from __future__ import annotations

import sys

import click

from nbdloop import vm
from nbdloop.cli.common import (SIZE, UsageError, block_size_option, connections_option,
                                mode_option)
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


@click.command("vm-run", context_settings={"ignore_unknown_options": True})
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--memory", type=click.IntRange(256, 65536), default=1024, show_default=True,
              help="The guest's memory, in MiB.")
@click.option("--disk-size", type=SIZE, default="4G", show_default=True,
              help="The guest's data disk (ext4, sparse), mounted at $NBDLOOP_DATA.")
@click.option("--nvme-size", type=SIZE,
              help="Also give the guest a blank emulated NVMe disk of this size (sparse, "
                   "deleted afterwards): /dev/nvme0n1, named in $NBDLOOP_NVME.")
@click.option("--timeout", type=click.IntRange(10, 86400), default=1800, show_default=True,
              help="Seconds before a hung guest is killed.")
@click.option("--quiet", "-q", is_flag=True, help="Do not show the guest's console.")
def vm_run(script, args, memory, disk_size, nvme_size, timeout, quiet):
    """Run SCRIPT ARGS as root in a VM whose kernel has the NBD driver and
    which boots this machine's own root, read-only with a tmpfs on top: the
    same nbdkit, Python, nbdloop and nbd-client, so `nbdloop attach` works
    there.  For machines whose kernel has no NBD driver.

    Exit status 0 if SCRIPT exited 0, 1 if it failed or hung."""
    try:
        result = vm.run_product(script, args=args, memory_mb=memory, disk_size=disk_size,
                                nvme_size=nvme_size, timeout=timeout,
                                echo=None if quiet else _echo_console)
    except ValueError as e:   # a script the guest cannot see, a bad NVMe size
        raise UsageError(str(e)) from None
    if not result.ok:
        click.echo(f"nbdloop: vm-run: {result.verdict}", err=True)
        sys.exit(1)
    click.echo(f"nbdloop: vm-run: the script passed in {result.elapsed:.0f} s", err=True)


def _echo_console(chunk: bytes) -> None:
    sys.stdout.write(chunk.decode(errors="replace").replace("\r\n", "\n"))
    sys.stdout.flush()
