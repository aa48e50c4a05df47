"""Parse and print sizes the way losetup and qemu-img users write them."""
from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512M"`` -> 536870912.  Accepts bytes and K/M/G/T/P (binary) suffixes,
    with an optional ``B``/``iB``, and fractions that come out to whole bytes
    (``1.5T``).  Raises ValueError with a one-line reason otherwise."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (use bytes or a suffix: 512M, 1G, 1.5T)")
    number, unit = m.groups()
    scale = _UNITS[unit.upper()]
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * scale + int(frac) * scale // 10 ** len(frac)
        if int(frac) * scale % 10 ** len(frac):
            raise ValueError(f"{text!r} is not a whole number of bytes")
    else:
        value = int(number) * scale
    return value


def format_size(n: int) -> str:
    """536870912 -> ``"512M"``; exact when possible, else one decimal."""
    for unit in "PTGMK":
        scale = _UNITS[unit]
        if n >= scale:
            if n % scale == 0:
                return f"{n // scale}{unit}"
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
