/* What the engine's C units share and Python must not see: build_uring.py
 * makes the cdef from nbdl.h alone, so nothing here reaches cffi.  Include
 * it before any system header (threadstate.c: right after Python.h). */
#ifndef NBDL_INT_H
#define NBDL_INT_H

/* cpu_set_t, sched_setaffinity, statx and AT_EMPTY_PATH are GNU names,
 * which the system headers only declare if asked before the first one. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#if defined _FEATURES_H && !defined __USE_GNU
#error "nbdl_int.h must be included before any system header"
#endif

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/prctl.h>

#include "nbdl.h"

/* Older headers lack them; the kernel has had them since 5.6. */
#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#define PR_GET_IO_FLUSHER 58
#endif

/* Hidden, as when all of this was static in one file: the extension still
 * exports only nbdl.h's functions, and no name here can clash with one in
 * nbdkit or another library. */
#pragma GCC visibility push(hidden)

/* The counters nbdl_stats reads; defined beside it in sys.c. */
extern struct nbdl_stats nbdl_global_stats;

#define STAT_ADD(field, n) \
  __atomic_fetch_add (&nbdl_global_stats.field, (n), __ATOMIC_RELAXED)

/* ---- the image and its range lock ------------------------------------ */

struct nbdl_range {
  uint64_t start, end;
  int mode;
  int fast;            /* a shared hold taken on the lock-free path */
  struct nbdl_range *prev, *next;
};

struct nbdl_image {
  uint64_t id; /* rings remember which image they were built for */
  int fd;
  int direct;
  uint32_t mem_align; /* 0: every direct segment goes through a bounce slot */
  int pin;
  uint32_t seg_size;
  uint32_t entries;
  char *zeros; /* buffered mode's source for NBDL_OP_WRITE_ZEROES */
  /* Placement (nbdl_image_set_placement): with busy_at or more requests in
   * progress a worker runs on `busy`, alone it runs on `idle`. */
  int placement;
  uint32_t busy_at;
  cpu_set_t busy, idle;
  uint32_t inflight;         /* atomic: nbdl_rw calls in progress */
  int sched_batch;           /* new worker threads switch to SCHED_BATCH */
  /* The range lock.  Shared holds (every aligned write) normally take a
   * lock-free path: they only count themselves in fast_shared, as long as
   * no exclusive hold (a read-modify-write) exists or waits.  Otherwise
   * holds are entries in the `ranges` list under `lock`. */
  uint64_t fast_shared;      /* atomic */
  uint32_t exclusive;        /* atomic: exclusive holders and waiters */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct nbdl_range *ranges; /* held ranges, a doubly linked list */
  unsigned waiters;
};

/* rangelock.c.  Hold [off, off + len) in mode (NBDL_LOCK_SHARED or
 * NBDL_LOCK_EXCLUSIVE) until range_unlock; r lives on the caller's stack. */
void range_lock (struct nbdl_image *img, struct nbdl_range *r, uint64_t off,
                 uint64_t len, int mode);
void range_unlock (struct nbdl_image *img, struct nbdl_range *r);

/* ---- per-thread state ------------------------------------------------- */

struct nbdl_ring; /* ring.c's */

enum { PLACED_NOWHERE, PLACED_IDLE, PLACED_BUSY };

struct nbdl_thread {
  void *pinned;          /* PyThreadState *, kept alive across nbdkit
                          * callbacks; void so that only threadstate.c
                          * needs Python.h */
  struct nbdl_ring *ring;
  int placed;            /* PLACED_*, for the image placed_img */
  uint64_t placed_img;
  /* nbdl_release_idle may take the ring from another thread, only while
   * it is RING_IDLE; the thread holds it RING_BUSY for a whole call. */
  int ring_state;
  uint64_t last_used;    /* CLOCK_MONOTONIC ns at the end of its last call */
  struct nbdl_thread *prev, *next;   /* every thread's, under threads_lock */
};

enum { RING_IDLE, RING_BUSY, RING_TAKEN };

/* threadstate.c.  get_thread: the calling thread's state, made (and the
 * thread set up as img asks) on its first call; NULL if out of memory.
 * current_thread: the state, or NULL if the thread has none; only after
 * get_thread or nbdl_thread_release has created the pthread key. */
struct nbdl_thread *get_thread (struct nbdl_image *img);
struct nbdl_thread *current_thread (void);

/* threadstate.c.  ring_enter: the calling thread's state, its ring held
 * for one call (NULL if out of memory); ring_leave ends the call. */
struct nbdl_thread *ring_enter (struct nbdl_image *img);
void ring_leave (struct nbdl_thread *t);

/* ring.c.  ring_free takes NULL; drop_ring frees the calling thread's. */
void ring_free (struct nbdl_ring *r);
void drop_ring (void);

#pragma GCC visibility pop

#endif
