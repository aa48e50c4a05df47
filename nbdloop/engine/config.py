"""What a server serves and how: the one typed configuration.

A :class:`Server` (with its :class:`Export`) is built once, from the command
line, a line of the table of attachments or a device record, and validated
when it is made (:class:`ConfigError`, one line).  The tooling renders it to
nbdkit's command line (``nbdloop.serve.cmdline.nbdkit_argv``); the plugin's
keys are rendered and parsed back here, by :func:`plugin_keys` and
:func:`from_plugin_keys`, so the two directions cannot drift apart.

It lives in the engine because the plugin, which nbdkit's embedded Python
loads, parses its keys into it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from nbdloop.sizes import parse_size

MODES = ("direct", "buffered")
PLACEMENTS = ("irq", "off")
DEFAULT_SEG_SIZE = 128 * 1024
MAX_SEG_SIZE = 16 << 20
DEFAULT_THREADS = 16


class ConfigError(ValueError):
    """A configuration that cannot be served, in one line."""


def check_segment_size(size: int) -> int:
    """The segment size, if it is a multiple of 4K between 4K and 16M: in
    direct mode each segment has a bounce slot of its own, page aligned."""
    if size < 4096 or size % 4096 or size > MAX_SEG_SIZE:
        raise ConfigError(f"segment size {size} is not a multiple of 4K between 4K and 16M")
    return size


@dataclass(frozen=True)
class Export:
    """One image served: the file, how its I/O is done, and which bytes of it."""

    image: str                   # its path (absolute once built by the tooling)
    mode: str = "direct"         # direct (O_DIRECT) | buffered (page cache)
    readonly: bool = False
    segment_size: int = DEFAULT_SEG_SIZE
    name: str = ""               # the export name offered; "" takes any
    offset: int = 0              # a slice (losetup -o, --sizelimit), served by nbdkit's
    length: int = 0              # offset filter, or by the plugin for an exports
                                 # directory's export; length 0: to the image's end
    fd: int | None = None        # the image, already opened and locked, inherited

    def __post_init__(self) -> None:
        if not self.image:
            raise ConfigError("no image given")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be {' or '.join(MODES)}, not {self.mode!r}")
        check_segment_size(self.segment_size)
        if self.offset < 0 or self.length < 0:
            raise ConfigError("a slice's offset and length cannot be negative")

    @property
    def sliced(self) -> bool:
        return self.offset > 0 or self.length > 0


@dataclass(frozen=True)
class Server:
    """One nbdkit process and what it serves: the exports given here, or
    (``exports_dir``) those defined in a directory, one JSON file per export
    (:func:`export_json`), which may be added while the server runs."""

    exports: tuple[Export, ...] = ()
    exports_dir: str | None = None       # DIR/NAME.json defines the export NAME
    threads: int = DEFAULT_THREADS       # nbdkit's workers per connection
    placement: str = "irq"               # irq: off the disk's interrupt CPUs under load
    mlock: bool = False                  # mlockall(MCL_ONFAULT) in the server
    stats_file: str | None = None        # the engine's counters, written as JSON
    shared: bool = False                 # other processes serve the image too
    outlive_parent: bool = False         # no death signal (the daemon's servers)
    # nbdkit's own settings, which the plugin never sees.
    socket: str | None = None            # unix socket to listen on
    port: int | None = None              # or TCP
    bind: str = "127.0.0.1"              # neither: nbdkit inherits its listening sockets
    pidfile: str | None = None
    verbose: bool = False
    tls_psk: str | None = None

    def __post_init__(self) -> None:
        if self.exports_dir is not None and self.exports:
            raise ConfigError("a server serves its exports or an exports directory's, "
                              "not both")
        if self.exports_dir == "":
            raise ConfigError("the exports directory has no name")
        if not self.exports and self.exports_dir is None:
            raise ConfigError("a server needs an export or an exports directory")
        if len({e.name for e in self.exports}) != len(self.exports):
            raise ConfigError("two exports of one server have the same name")
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"threads must be between 1 and 256, not {self.threads}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be {' or '.join(PLACEMENTS)}, "
                              f"not {self.placement!r}")
        if self.socket is not None and self.port is not None:
            raise ConfigError("a server listens on a unix socket or a TCP port, not both")

    @property
    def export(self) -> Export:
        """The export of a server of one."""
        if len(self.exports) != 1:
            raise ConfigError(f"this server has {len(self.exports)} exports, not one")
        return self.exports[0]

    def replace(self, **changes) -> Server:
        return dataclasses.replace(self, **changes)


# ---- the plugin's keys ---------------------------------------------------------------

#: Export field -> plugin key.  ``file`` starts an export: the keys after it
#: are that export's.
_EXPORT_KEYS = {"image": "file", "fd": "fd", "mode": "mode", "readonly": "readonly",
                "segment_size": "segment-size", "name": "export-name"}
#: Server field -> plugin key.
_SERVER_KEYS = {"exports_dir": "exports-dir", "placement": "placement", "mlock": "mlock",
                "stats_file": "stats-file", "shared": "shared",
                "outlive_parent": "outlive-parent"}
_DEFAULT_EXPORT = {f.name: f.default for f in dataclasses.fields(Export)}
_DEFAULT_SERVER = {f.name: f.default for f in dataclasses.fields(Server)
                   if f.default is not dataclasses.MISSING}


def _render(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def plugin_keys(server: Server) -> list[str]:
    """The plugin's ``key=value`` arguments for ``server``: each export's
    (``file`` first), then the server's that differ from the default.  The
    slice of a fixed export is not among them: nbdkit's offset filter
    serves it."""
    keys = []
    for export in server.exports:
        for field, key in _EXPORT_KEYS.items():
            value = getattr(export, field)
            if field in ("image", "mode") or value != _DEFAULT_EXPORT[field]:
                keys.append(f"{key}={_render(value)}")
    for field, key in _SERVER_KEYS.items():
        value = getattr(server, field)
        if value != _DEFAULT_SERVER[field]:
            keys.append(f"{key}={_render(value)}")
    return keys


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: {value!r} is not a boolean")


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not a number") from None


def _size(key: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _text(key: str, value: str) -> str:
    return value


_PARSE = {"fd": _int, "readonly": _bool, "segment_size": _size, "mlock": _bool,
          "shared": _bool, "outlive_parent": _bool}


def from_plugin_keys(pairs: list[tuple[str, str]]) -> Server:
    """The :class:`Server` that :func:`plugin_keys` rendered, from the
    ``(key, value)`` pairs nbdkit hands the plugin, in order."""
    by_key = {key: field for field, key in _EXPORT_KEYS.items()}
    server_by_key = {key: field for field, key in _SERVER_KEYS.items()}
    exports: list[dict] = []
    server: dict = {}
    for key, value in pairs:
        if key in by_key:
            field = by_key[key]
            if field == "image":
                exports.append({})
            elif not exports:
                raise ConfigError(f"{key}= comes before file=")
            exports[-1][field] = _PARSE.get(field, _text)(key, value)
        elif key in server_by_key:
            field = server_by_key[key]
            server[field] = _PARSE.get(field, _text)(key, value)
        else:
            raise ConfigError(f"unknown parameter {key!r}")
    if not exports and "exports_dir" not in server:
        raise ConfigError("the file parameter is required: file=IMAGE (or exports-dir=DIR)")
    return Server(exports=tuple(Export(**e) for e in exports), **server)


# ---- an export of an exports directory ------------------------------------------------

#: What an export's definition holds, with each field's JSON type.  Not its
#: name, which is the file's, nor ``fd``, a descriptor of whoever made it.
_DEFINITION = {"image": str, "mode": str, "readonly": bool, "segment_size": int,
               "offset": int, "length": int, "fd": int}
_JSON_TYPES = {str: "a string", bool: "true or false", int: "an integer"}
EXPORT_NAME_MAX = 64


def check_export_name(name: str) -> str:
    """``name``, if it can name an export of an exports directory: 1 to 64
    of ``A-Z a-z 0-9 _ . : -``, the first a letter or a digit.  Such a name
    is never a path: it holds no ``/`` and cannot be ``.`` or ``..``."""
    if 0 < len(name) <= EXPORT_NAME_MAX and all(
            c.isascii() and (c.isalnum() or (i > 0 and c in "_.:-"))
            for i, c in enumerate(name)):
        return name
    raise ConfigError(f"{name[:EXPORT_NAME_MAX + 1]!r} is not an export name: up to "
                      f"{EXPORT_NAME_MAX} letters, digits and _.:-, the first a letter or digit")


def _absolute(image: str) -> str:
    # The server that reads the definition runs wherever it was started:
    # a relative path would name another file there.
    if not image.startswith("/"):
        raise ConfigError(f"an export's image must be an absolute path, not {image!r}")
    return image


def export_json(export: Export) -> str:
    """The definition of ``export`` in an exports directory, one line of
    JSON, as :func:`export_from_json` reads it back."""
    _absolute(export.image)
    return json.dumps({field: getattr(export, field) for field in _DEFINITION
                       if getattr(export, field) is not None})


def export_from_json(text: str | bytes) -> Export:
    """The :class:`Export` that ``text``, an export's definition,
    describes; ConfigError (one line) for anything that is not one."""
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as e:   # not JSON, not text, or nested too deep
        raise ConfigError(f"not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"an export definition is a JSON object, not {_shown(fields)}")
    for key, value in fields.items():
        kind = _DEFINITION.get(key)
        if kind is None:
            raise ConfigError(f"an export definition has no key {_shown(key)}")
        # type(), not isinstance: JSON's true is no integer, nor 1 a boolean.
        if type(value) is not kind:
            raise ConfigError(f"{key} must be {_JSON_TYPES[kind]}, not {_shown(value)}")
    if "image" not in fields:
        raise ConfigError("an export definition needs its image")
    _absolute(fields["image"])
    return Export(**fields)


def _shown(value: object) -> str:
    """``value`` as JSON writes it, cut short: it comes from a file, and
    may be anything."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
