"""Parse and print sizes the way losetup and qemu-img users write them."""
from __future__ import annotations

import re

#: A sector: what every image's and every device's size is a multiple of.
SECTOR = 512

_POWERS = "KMGTPE"
_UNITS = {u: 1 << (10 * (i + 1)) for i, u in enumerate(_POWERS)}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTPE])(IB|B)?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512M"`` -> 536870912.  Suffixes as util-linux reads them (losetup,
    fallocate): ``K``/``KiB`` ... ``E``/``EiB`` are powers of 1024, ``KB`` ...
    ``EB`` powers of 1000; no suffix or ``B`` is bytes.  Fractions are
    accepted when they come out to whole bytes (``1.5T``).  Raises
    ValueError with a one-line reason otherwise."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (bytes, or a suffix: 512M, 1GiB, 1.5T, 100MB)")
    number, letter, tail = m.groups()
    if letter is None:
        scale = 1
    else:
        power = _POWERS.index(letter.upper()) + 1
        scale = 1000 ** power if tail and tail.upper() == "B" else 1024 ** power
    whole, _, frac = number.partition(".")
    value = int(whole) * scale + int(frac or 0) * scale // 10 ** len(frac)
    if frac and int(frac) * scale % 10 ** len(frac):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return value


def format_size(n: int) -> str:
    """536870912 -> ``"512M"``; exact when possible, else one decimal."""
    for unit in reversed(_POWERS):
        scale = _UNITS[unit]
        if n >= scale:
            if n % scale == 0:
                return f"{n // scale}{unit}"
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
