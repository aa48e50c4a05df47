"""The table of attachments that come back after a reboot, in the spirit of
nbdtab(5): ``/etc/nbdloop/attachments`` (``paths.attachments_table()``).

One line per image::

    # IMAGE            OPTIONS
    /srv/disk.img      mode=buffered,connections=2,partscan
    "/srv/my disk.img" offset=1M,sizelimit=512M

OPTIONS are ``nbdloop attach``'s long options without their dashes,
comma-separated, ``name=value`` or a bare ``name`` for a flag; ``-`` or
nothing for none.  Lines are split as a shell would (quotes for a path with
spaces); ``#`` starts a comment.  The options are checked by attach's own
parser (``nbdloop attach --all`` turns a line back into arguments), so the
table and the command line cannot disagree.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path


class TableError(Exception):
    """A table that cannot be read (naming the line) or written; one line."""

    exit_status = 2


@dataclasses.dataclass(frozen=True)
class Entry:
    image: str              # as written (made absolute when added)
    options: tuple[str, ...]    # "name=value" or "name"
    line: int               # 1-based, for messages

    def args(self) -> list[str]:
        """The entry as attach's command line: IMAGE --name value ..."""
        argv = [self.image]
        for option in self.options:
            name, sep, value = option.partition("=")
            argv += [f"--{name}", value] if sep else [f"--{name}"]
        return argv


def read(path: Path) -> list[Entry]:
    """Every entry of the table; [] if there is none.  TableError names the
    first line that is not ``IMAGE [OPTIONS]``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise TableError(f"{path}: {e.strerror}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            fields = shlex.split(line, comments=True)
        except ValueError as e:
            raise TableError(f"{path}:{number}: {e}") from None
        if not fields:
            continue
        if len(fields) > 2:
            raise TableError(f"{path}:{number}: expected IMAGE [OPTIONS], found "
                             f"{len(fields)} fields (quote a path with spaces)")
        options = () if len(fields) == 1 or fields[1] == "-" else tuple(fields[1].split(","))
        for option in options:
            name = option.partition("=")[0]
            if not name or name.startswith("-") or not name.replace("-", "").isalnum():
                raise TableError(f"{path}:{number}: {option!r} is not an option "
                                 "(name or name=value)")
        entries.append(Entry(fields[0], options, number))
    return entries


def find(entries: list[Entry], image: str) -> Entry | None:
    real = os.path.realpath(image)
    for entry in entries:
        if os.path.realpath(entry.image) == real:
            return entry
    return None


def format_line(image: str, options: list[str]) -> str:
    return f"{shlex.quote(image)} {','.join(options) or '-'}"


def put(path: Path, image: str, options: list[str]) -> None:
    """Add the line for ``image`` (absolute), or replace the one there is,
    keeping every other line and comment as it was."""
    image = os.path.realpath(image)
    _rewrite(path, image, format_line(image, options))


def remove(path: Path, image: str) -> bool:
    """Remove the line of ``image``; False if it had none."""
    return _rewrite(path, os.path.realpath(image), None)


def _rewrite(path: Path, image: str, new: str | None) -> bool:
    entries = read(path)
    old = find(entries, image)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = ["# nbdloop attach --all attaches these; see nbdloop attach --help.",
                 "# IMAGE OPTIONS (attach's long options: mode=buffered,partscan,...)"]
    if old is not None:
        lines[old.line - 1:old.line] = [new] if new is not None else []
    elif new is not None:
        lines.append(new)
    else:
        return False
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(path)
    except OSError as e:
        raise TableError(f"{path}: cannot write it: {e.strerror}") from None
    return True
