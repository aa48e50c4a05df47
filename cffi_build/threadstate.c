/* Per-pthread state: each nbdkit worker thread owns a ring, so the I/O
 * path takes no lock to find one, and, under nbdkit, a pinned Python thread
 * state.  The only unit that includes Python.h. */
#include <Python.h> /* first: it sets feature macros the system headers read */

#include "nbdl_int.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

static pthread_key_t thread_key;
static pthread_once_t thread_key_once = PTHREAD_ONCE_INIT;

/* pthread key destructor: runs when an nbdkit worker thread exits, which
 * happens when its connection closes. */
static void
thread_exit (void *p)
{
  struct nbdl_thread *t = p;

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

struct nbdl_thread *
current_thread (void)
{
  return pthread_getspecific (thread_key);
}

void
nbdl_thread_release (void)
{
  pthread_once (&thread_key_once, make_thread_key);
  drop_ring ();
}
