"""cffi builder for nbdloop's binding to liburing (API mode).

API mode (``set_source``) because liburing's ``io_uring_prep_*``,
``io_uring_get_sqe`` and ``io_uring_cqe_seen`` are ``static inline``: they
only exist once compiled.  The C half lives beside this file, one ``.c`` per
unit (``SOURCES``); ``CDEF`` is ``nbdl.h`` itself, which declares exactly what
Python calls.  What the units share and Python must not see is in
``nbdl_int.h``, which neither the cdef nor ``set_source`` includes.
"""
from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def cdef_from_header(text: str) -> str:
    """nbdl.h as cffi's cdef wants it: no comments, no include guard or
    includes, and macros that are not plain integers left to the compiler."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        if line.startswith(("#ifndef", "#endif", "#include")) or line == "#define NBDL_H":
            continue
        m = re.match(r"#define (\w+) (.+)", line)
        if m and not m.group(2).strip().isdigit():
            line = f"#define {m.group(1)} ..."
        out.append(line)
    return "\n".join(out)


# The declarations live in one place, nbdl.h; Python sees all of it.
CDEF = cdef_from_header((HERE / "nbdl.h").read_text())

# Sorted; the order does not matter to the build.
SOURCES = ["rangelock.c", "ring.c", "sys.c", "threadstate.c"]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "nbdloop.engine._uring",
    '#include "nbdl.h"',
    sources=[str(HERE / name) for name in SOURCES],
    include_dirs=[str(HERE)],
    libraries=["uring"],
    # Not the limited API: threadstate.c needs PyThreadState_DeleteCurrent.
    py_limited_api=False,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
