/* The image's range lock.  A read-modify-write of an edge block must not
 * interleave with another write to that block; plain aligned writes, the
 * common case, must not pay a mutex for that. */
#include "nbdl_int.h"

static int
ranges_conflict (const struct nbdl_range *a, const struct nbdl_range *b)
{
  if (a->start >= b->end || b->start >= a->end)
    return 0;
  return a->mode == NBDL_LOCK_EXCLUSIVE || b->mode == NBDL_LOCK_EXCLUSIVE;
}

void
range_lock (struct nbdl_image *img, struct nbdl_range *r, uint64_t off,
            uint64_t len, int mode)
{
  const struct nbdl_range *q;
  int waited = 0;

  r->start = off;
  r->end = off + len;
  r->mode = mode;
  r->fast = 0;
  r->prev = NULL;
  if (mode == NBDL_LOCK_SHARED &&
      __atomic_load_n (&img->exclusive, __ATOMIC_SEQ_CST) == 0) {
    /* Announce ourselves, then check again: an exclusive locker does the
     * same in the other order, so one of us always sees the other. */
    __atomic_fetch_add (&img->fast_shared, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n (&img->exclusive, __ATOMIC_SEQ_CST) == 0) {
      r->fast = 1;
      return;
    }
    __atomic_fetch_sub (&img->fast_shared, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock (&img->lock);
    pthread_cond_broadcast (&img->cond);
    pthread_mutex_unlock (&img->lock);
  }
  if (mode == NBDL_LOCK_EXCLUSIVE)
    __atomic_fetch_add (&img->exclusive, 1, __ATOMIC_SEQ_CST);
  pthread_mutex_lock (&img->lock);
 again:
  if (mode == NBDL_LOCK_EXCLUSIVE &&
      __atomic_load_n (&img->fast_shared, __ATOMIC_SEQ_CST) > 0) {
    /* Lock-free shared holders do not say where they are: wait them out. */
    img->waiters++;
    pthread_cond_wait (&img->cond, &img->lock);
    img->waiters--;
    waited = 1;
    goto again;
  }
  for (q = img->ranges; q != NULL; q = q->next) {
    if (ranges_conflict (q, r)) {
      img->waiters++;
      pthread_cond_wait (&img->cond, &img->lock);
      img->waiters--;
      waited = 1;
      goto again;
    }
  }
  r->next = img->ranges;
  if (img->ranges)
    img->ranges->prev = r;
  img->ranges = r;
  pthread_mutex_unlock (&img->lock);
  if (waited)
    STAT_ADD (lock_waits, 1);
}

void
range_unlock (struct nbdl_image *img, struct nbdl_range *r)
{
  if (r->fast) {
    __atomic_fetch_sub (&img->fast_shared, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n (&img->exclusive, __ATOMIC_SEQ_CST) != 0) {
      pthread_mutex_lock (&img->lock);
      pthread_cond_broadcast (&img->cond);
      pthread_mutex_unlock (&img->lock);
    }
    return;
  }
  pthread_mutex_lock (&img->lock);
  if (r->prev)
    r->prev->next = r->next;
  else
    img->ranges = r->next;
  if (r->next)
    r->next->prev = r->prev;
  if (r->mode == NBDL_LOCK_EXCLUSIVE)
    __atomic_fetch_sub (&img->exclusive, 1, __ATOMIC_SEQ_CST);
  if (img->waiters)
    pthread_cond_broadcast (&img->cond);
  pthread_mutex_unlock (&img->lock);
}
