/* nbdloop's I/O engine: the C half of the binding to liburing.
 *
 * Python plans each request (nbdloop/engine/plan.py) as a scatter list of segments;
 * this code executes the list on the calling thread's own ring, with the GIL
 * released (cffi drops it around every call), and writes one result per
 * segment back into the list.  It decides nothing about alignment or
 * resubmission: that logic lives, and is tested, in the pure Python module.
 *
 * Every declaration here is mirrored in cffi_build/build_uring.py's CDEF.
 * What the C units share beyond it is in nbdl_int.h, which Python never sees.
 */
#ifndef NBDL_H
#define NBDL_H

#include <stdint.h>

/* Operations for nbdl_rw. */
#define NBDL_OP_READ 0
#define NBDL_OP_WRITE 1
#define NBDL_OP_WRITE_ZEROES 2 /* write zeroes where the request's data would go */

/* Segment flags. */
#define NBDL_SEG_PREREAD 1 /* read the segment before writing it (RMW edge) */

/* Range-lock modes. */
#define NBDL_LOCK_NONE 0
#define NBDL_LOCK_SHARED 1    /* plain writes, zeroes and trims */
#define NBDL_LOCK_EXCLUSIVE 2 /* read-modify-write of edge blocks */

/* A segment that was never submitted, because an earlier wave failed. */
#define NBDL_NOT_RUN (-1000000000LL)

/* One bio_vec-like segment of a request.
 *
 * The segment covers [file_off, file_off + len) of the backing file.  Bytes
 * [skip, skip + copy_len) of it belong to the request and sit at user_off in
 * the caller's buffer.  In buffered mode skip is 0 and copy_len == len: the
 * I/O goes straight to the caller's buffer.  In direct mode so does a
 * segment that is all window (no preread) whose place in the caller's
 * buffer meets the image's memory alignment; any other goes through an
 * aligned bounce slot owned by the ring.
 */
struct nbdl_seg {
  uint64_t file_off;
  uint64_t user_off;
  uint32_t len;
  uint32_t skip;
  uint32_t copy_len;
  uint32_t flags;
  int64_t res;    /* out: bytes transferred, or -errno, or NBDL_NOT_RUN */
  uint32_t order; /* out: position of this completion among the request's */
  uint32_t pad;
};

/* Counters, summed over all threads; read with nbdl_stats. */
struct nbdl_stats {
  uint64_t requests;   /* calls that did I/O */
  uint64_t sqes;       /* submissions */
  uint64_t waves;      /* submit-and-wait rounds */
  uint64_t prereads;   /* RMW edge reads */
  uint64_t copied;     /* bytes copied between bounce and caller */
  uint64_t zero_copy;  /* direct-mode requests done with no copy at all */
  uint64_t zero_copy_bytes; /* bytes of segments done on the caller's buffer */
  uint64_t lock_waits; /* range-lock acquisitions that had to wait */
  uint64_t rings;      /* rings created */
  uint64_t rings_freed;
  uint64_t pinned;     /* Python thread states pinned */
  uint64_t unpinned;   /* ... and released at thread exit */
  uint64_t fixed_bufs; /* rings whose bounce buffers are registered */
  uint64_t moves;      /* workers moved between the busy and idle CPUs */
  uint64_t batched;    /* workers switched to SCHED_BATCH */
  uint64_t unplaced;   /* requests too long to move their worker */
  uint64_t threads;    /* threads that called into the engine */
  uint64_t io_flushers; /* ... of which PR_GET_IO_FLUSHER said 1 */
  uint64_t wait_slices; /* waits for completions that timed out with none */
  uint64_t rings_idle_freed; /* rings freed by nbdl_release_idle */
};

struct nbdl_image;

/* Make an engine for fd.  direct: fd has O_DIRECT.  mem_align (direct
 * only, a power of two, 0 for never): the memory alignment O_DIRECT asks
 * of a buffer (stx_dio_mem_align); a segment whose place in the caller's
 * buffer meets it is done there, any other through a bounce slot.
 * seg_size: largest segment (a multiple of the offset alignment).
 * entries: ring entries = bounce slots per thread = segments per wave.
 * pin: keep each calling pthread's Python thread state alive (nbdkit workers).
 * Returns NULL with errno set on failure. */
struct nbdl_image *nbdl_image_new (int fd, int direct, uint32_t mem_align,
                                   uint32_t seg_size, uint32_t entries, int pin);
void nbdl_image_free (struct nbdl_image *img);

/* Move each worker to the `busy` CPUs while busy_at or more requests are in
 * progress, and to the `idle` CPUs when its request is the only one (see
 * nbdloop/engine/placement.py).  A request longer than NBDL_PLACE_MAX_LEN leaves
 * its worker where it is: its cost is the bytes it moves, not the wake-ups
 * that placement saves.  Called once, before any worker calls in.
 * Returns 0 or -EINVAL. */
#define NBDL_PLACE_MAX_LEN (256 * 1024)
int nbdl_image_set_placement (struct nbdl_image *img, const int *busy, int nbusy,
                              const int *idle, int nidle, uint32_t busy_at);

/* on != 0: each thread that calls into the engine for the first time
 * switches itself to SCHED_BATCH (same nice value, no privilege needed), so
 * that a worker woken up does not preempt the worker that is running one
 * request to its submission: in nbdkit the worker that reads a request
 * hands the socket to the next one, which would otherwise preempt it on
 * its own CPU. */
void nbdl_image_set_sched_batch (struct nbdl_image *img, int on);

/* Run nsegs segments.  Returns the number of segments whose res is not
 * their full length (0: all done), or -errno if no ring could be set up.
 * With lock_mode != NBDL_LOCK_NONE, [lock_off, lock_off + lock_len) is held
 * in that mode for the whole call. */
int nbdl_rw (struct nbdl_image *img, int op, int fua, char *user,
             struct nbdl_seg *segs, uint32_t nsegs, uint64_t lock_off,
             uint64_t lock_len, int lock_mode);

/* The one-segment fast path of nbdl_rw, for a request that is a single
 * full-window segment.  Returns bytes transferred or -errno. */
int64_t nbdl_rw1 (struct nbdl_image *img, int op, int fua, char *user,
                  uint64_t file_off, uint32_t len, int lock_mode);

/* fdatasync (datasync = 1) or fsync through the ring. */
int nbdl_fsync (struct nbdl_image *img, int datasync);

/* fallocate(mode, off, len) through the ring, under a range lock. */
int nbdl_fallocate (struct nbdl_image *img, int mode, uint64_t off,
                    uint64_t len, int lock_mode);

/* posix_fadvise through the ring. */
int nbdl_fadvise (struct nbdl_image *img, uint64_t off, uint32_t len,
                  int advice);

/* Direct-I/O alignment of fd from statx(STATX_DIOALIGN).  Returns 0 and
 * fills *mem_align and *off_align (both 0 if the kernel does not say),
 * or -errno. */
int nbdl_dio_align (int fd, uint32_t *mem_align, uint32_t *off_align);

void nbdl_stats (struct nbdl_stats *out);

/* prctl(PR_SET_IO_FLUSHER) for the calling thread and the threads it
 * creates afterwards; returns 1, or -errno. */
int nbdl_set_io_flusher (void);

/* No death signal from the parent (prctl PR_SET_PDEATHSIG 0); 0 or -errno. */
int nbdl_outlive_parent (void);

/* mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT); 0 or -errno. */
int nbdl_mlockall (void);

/* Free the calling thread's ring now (it is freed at thread exit anyway). */
void nbdl_thread_release (void);

/* Free the ring (and its bounce slots) of every thread that has not used
 * it for idle_ms milliseconds, from any thread: nbdkit's workers live as
 * long as their connection, and an idle one never calls in to free its
 * own.  The thread builds a new ring at its next request.  Then gives
 * free heap memory back to the system.  Returns how many were freed. */
int nbdl_release_idle (uint32_t idle_ms);

#endif
