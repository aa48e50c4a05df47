/* Per-pthread state: each nbdkit worker thread owns a ring, so the I/O
 * path takes no lock to find one, and, under nbdkit, a pinned Python thread
 * state.  The only unit that includes Python.h. */
#include <Python.h> /* first: it sets feature macros the system headers read */

#include "nbdl_int.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static pthread_key_t thread_key;
static pthread_once_t thread_key_once = PTHREAD_ONCE_INIT;
/* Every thread's state, for nbdl_release_idle; a thread leaves the list
 * before its state is freed. */
static pthread_mutex_t threads_lock = PTHREAD_MUTEX_INITIALIZER;
static struct nbdl_thread *threads;

static uint64_t
now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* pthread key destructor: runs when an nbdkit worker thread exits, which
 * happens when its connection closes. */
static void
thread_exit (void *p)
{
  struct nbdl_thread *t = p;

  pthread_mutex_lock (&threads_lock);
  if (t->prev != NULL)
    t->prev->next = t->next;
  else
    threads = t->next;
  if (t->next != NULL)
    t->next->prev = t->prev;
  pthread_mutex_unlock (&threads_lock);
  ring_free (t->ring);
  if (t->pinned != NULL && Py_IsInitialized ()) {
    /* Take the GIL with our own thread state, then delete it.  We keep our
     * own pointer because Python's TSS slot may already be cleared. */
    PyEval_RestoreThread (t->pinned);
    PyThreadState_Clear (t->pinned);
    PyThreadState_DeleteCurrent ();
    STAT_ADD (unpinned, 1);
  }
  free (t);
}

static void
make_thread_key (void)
{
  if (pthread_key_create (&thread_key, thread_exit) != 0) {
    fprintf (stderr, "nbdloop: pthread_key_create failed\n");
    abort ();
  }
}

/* Called with the GIL released (cffi releases it around our calls). */
struct nbdl_thread *
get_thread (struct nbdl_image *img)
{
  struct nbdl_thread *t;

  pthread_once (&thread_key_once, make_thread_key);
  t = pthread_getspecific (thread_key);
  if (t == NULL) {
    t = calloc (1, sizeof *t);
    if (t == NULL)
      return NULL;
    if (pthread_setspecific (thread_key, t) != 0) {
      free (t);
      return NULL;
    }
    pthread_mutex_lock (&threads_lock);
    t->next = threads;
    if (threads != NULL)
      threads->prev = t;
    threads = t;
    pthread_mutex_unlock (&threads_lock);
    /* Read back what each worker inherited, so that it can be shown, not
     * assumed: nbdkit creates its workers after get_ready() set the flag. */
    STAT_ADD (threads, 1);
    if (prctl (PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1)
      STAT_ADD (io_flushers, 1);
    if (img->sched_batch) {
      /* Once per thread; a failure only leaves the thread as it was. */
      struct sched_param sp = { .sched_priority = 0 };
      if (sched_setscheduler (0, SCHED_BATCH, &sp) == 0)
        STAT_ADD (batched, 1);
    }
  }
  if (img->pin && t->pinned == NULL) {
    /* nbdkit wraps each callback in PyGILState_Ensure/Release, which
     * creates and destroys this thread's PyThreadState every time.  One
     * extra Ensure that is never released keeps it alive; we hand the GIL
     * straight back so cffi can retake it on return. */
    PyGILState_Ensure ();
    t->pinned = PyEval_SaveThread ();
    STAT_ADD (pinned, 1);
  }
  return t;
}

static void
hold (struct nbdl_thread *t)
{
  int idle = RING_IDLE;

  /* Only nbdl_release_idle competes, and only for the moment it takes to
   * unhook the ring. */
  while (!__atomic_compare_exchange_n (&t->ring_state, &idle, RING_BUSY, 0,
                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
    idle = RING_IDLE;
    sched_yield ();
  }
}

struct nbdl_thread *
ring_enter (struct nbdl_image *img)
{
  struct nbdl_thread *t = get_thread (img);

  if (t != NULL)
    hold (t);
  return t;
}

void
ring_leave (struct nbdl_thread *t)
{
  t->last_used = now_ns ();
  __atomic_store_n (&t->ring_state, RING_IDLE, __ATOMIC_RELEASE);
}

int
nbdl_release_idle (uint32_t idle_ms)
{
  uint64_t before = now_ns () - (uint64_t) idle_ms * 1000000;
  struct nbdl_thread *t;
  int n = 0;

  pthread_mutex_lock (&threads_lock);
  for (t = threads; t != NULL; t = t->next) {
    int idle = RING_IDLE;
    struct nbdl_ring *r;

    if (__atomic_load_n (&t->last_used, __ATOMIC_RELAXED) > before ||
        !__atomic_compare_exchange_n (&t->ring_state, &idle, RING_TAKEN, 0,
                                      __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
      continue;
    r = t->ring;
    t->ring = NULL;
    __atomic_store_n (&t->ring_state, RING_IDLE, __ATOMIC_RELEASE);
    if (r == NULL)
      continue;
    /* Nothing is in flight on an idle ring.  Its teardown from another
     * thread cannot unregister first (a single-issuer ring takes that
     * only from its own thread), so the kernel lets go of the file and
     * the slots a moment later, as it does for a thread that exits. */
    ring_free (r);
    n++;
  }
  pthread_mutex_unlock (&threads_lock);
  if (n > 0) {
    STAT_ADD (rings_idle_freed, (uint64_t) n);
    malloc_trim (0);
  }
  return n;
}

struct nbdl_thread *
current_thread (void)
{
  return pthread_getspecific (thread_key);
}

void
nbdl_thread_release (void)
{
  struct nbdl_thread *t;

  pthread_once (&thread_key_once, make_thread_key);
  t = current_thread ();
  if (t != NULL) {
    hold (t);
    drop_ring ();
    ring_leave (t);
  }
}
