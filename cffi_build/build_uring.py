"""cffi builder for nbdloop's binding to liburing (API mode).

API mode (``set_source``) because liburing's ``io_uring_prep_*``,
``io_uring_get_sqe`` and ``io_uring_cqe_seen`` are ``static inline``: they
only exist once compiled.  The C half lives in ``nbdl.c`` beside this file;
``CDEF`` declares exactly what Python calls, mirroring ``nbdl.h``.
"""
from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
#define NBDL_OP_READ 0
#define NBDL_OP_WRITE 1
#define NBDL_OP_WRITE_ZEROES 2
#define NBDL_SEG_PREREAD 1
#define NBDL_LOCK_NONE 0
#define NBDL_LOCK_SHARED 1
#define NBDL_LOCK_EXCLUSIVE 2
#define NBDL_NOT_RUN ...

struct nbdl_seg {
  uint64_t file_off;
  uint64_t user_off;
  uint32_t len;
  uint32_t skip;
  uint32_t copy_len;
  uint32_t flags;
  int64_t res;
  uint32_t order;
  uint32_t pad;
};

struct nbdl_stats {
  uint64_t requests;
  uint64_t sqes;
  uint64_t waves;
  uint64_t prereads;
  uint64_t copied;
  uint64_t lock_waits;
  uint64_t rings;
  uint64_t rings_freed;
  uint64_t pinned;
  uint64_t unpinned;
  uint64_t fixed_bufs;
  uint64_t moves;
};

struct nbdl_image;

struct nbdl_image *nbdl_image_new(int fd, int direct, uint32_t seg_size,
                                  uint32_t entries, int pin);
void nbdl_image_free(struct nbdl_image *img);
int nbdl_image_set_placement(struct nbdl_image *img, const int *busy, int nbusy,
                             const int *idle, int nidle, uint32_t busy_at);
int nbdl_rw(struct nbdl_image *img, int op, int fua, char *user,
            struct nbdl_seg *segs, uint32_t nsegs, uint64_t lock_off,
            uint64_t lock_len, int lock_mode);
int64_t nbdl_rw1(struct nbdl_image *img, int op, int fua, char *user,
                 uint64_t file_off, uint32_t len, int lock_mode);
int nbdl_fsync(struct nbdl_image *img, int datasync);
int nbdl_fallocate(struct nbdl_image *img, int mode, uint64_t off,
                   uint64_t len, int lock_mode);
int nbdl_fadvise(struct nbdl_image *img, uint64_t off, uint32_t len,
                 int advice);
int nbdl_dio_align(int fd, uint32_t *mem_align, uint32_t *off_align);
void nbdl_stats(struct nbdl_stats *out);
int nbdl_set_io_flusher(void);
int nbdl_mlockall(void);
int nbdl_pin_thread(struct nbdl_image *img);
void nbdl_thread_release(void);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "nbdloop._uring",
    '#include "nbdl.h"',
    sources=[str(HERE / "nbdl.c")],
    include_dirs=[str(HERE)],
    libraries=["uring"],
    # Not the limited API: the thread-state helpers need PyThreadState_DeleteCurrent.
    py_limited_api=False,
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
