/* nbdloop's I/O engine.  See nbdl.h for the contract.
 *
 * Shape (after liburing's examples/io_uring-cp.c): each pthread owns one
 * ring with `entries` SQEs and, in direct mode, once a segment first needs
 * one, `entries` aligned bounce slots of `seg_size` bytes registered with
 * the ring.  A request's segments run in waves of at most `entries`:
 * prepare one SQE per segment with the segment's index in user_data,
 * submit them together, reap every completion and store its result in the
 * segment.  Nothing is left in flight when a
 * call returns, because the caller's buffer belongs to nbdkit.
 */
#include "nbdl_int.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <linux/fs.h>

#include <liburing.h>

/* ---- the image -------------------------------------------------------- */

static uint64_t next_image_id = 1;

struct nbdl_image *
nbdl_image_new (int fd, int direct, uint32_t mem_align, uint32_t seg_size,
                uint32_t entries, int pin)
{
  struct nbdl_image *img;

  if (fd < 0 || seg_size == 0 || entries == 0 || entries > 4096 ||
      (mem_align & (mem_align - 1)) != 0) {
    errno = EINVAL;
    return NULL;
  }
  img = calloc (1, sizeof *img);
  if (img == NULL)
    return NULL;
  img->id = __atomic_fetch_add (&next_image_id, 1, __ATOMIC_RELAXED);
  img->fd = fd;
  img->direct = direct;
  img->mem_align = direct ? mem_align : 0;
  img->pin = pin;
  img->seg_size = seg_size;
  img->entries = entries;
  if (!direct) {
    img->zeros = calloc (1, seg_size);
    if (img->zeros == NULL) {
      free (img);
      return NULL;
    }
  }
  pthread_mutex_init (&img->lock, NULL);
  pthread_cond_init (&img->cond, NULL);
  return img;
}

int
nbdl_image_set_placement (struct nbdl_image *img, const int *busy, int nbusy,
                          const int *idle, int nidle, uint32_t busy_at)
{
  cpu_set_t b, l;
  int i;

  if (nbusy <= 0 || nidle <= 0 || busy_at < 2)
    return -EINVAL;
  CPU_ZERO (&b);
  CPU_ZERO (&l);
  for (i = 0; i < nbusy; i++) {
    if (busy[i] < 0 || busy[i] >= CPU_SETSIZE)
      return -EINVAL;
    CPU_SET (busy[i], &b);
  }
  for (i = 0; i < nidle; i++) {
    if (idle[i] < 0 || idle[i] >= CPU_SETSIZE)
      return -EINVAL;
    CPU_SET (idle[i], &l);
  }
  img->busy = b;
  img->idle = l;
  img->busy_at = busy_at;
  img->placement = 1;
  return 0;
}

void
nbdl_image_set_sched_batch (struct nbdl_image *img, int on)
{
  img->sched_batch = on != 0;
}

void
nbdl_image_free (struct nbdl_image *img)
{
  if (img == NULL)
    return;
  pthread_mutex_destroy (&img->lock);
  pthread_cond_destroy (&img->cond);
  free (img->zeros);
  free (img);
}

/* ---- rings ------------------------------------------------------------ */

struct nbdl_ring {
  struct io_uring ring;
  uint64_t img_id;
  int fd;          /* the raw fd, used when it is not registered */
  int fixed_file;  /* fd is registered as fixed file 0 */
  int fixed_bufs;  /* bounce slots are registered buffers 0..entries-1 */
  int broken;      /* a submission failed: drop the ring after this call */
  uint32_t entries;
  uint32_t seg_size;
  char *bounce;    /* entries * seg_size bytes, 4096-aligned; NULL until a
                    * direct-mode segment first needs a slot */
};

void
ring_free (struct nbdl_ring *r)
{
  if (r == NULL)
    return;
  /* Nothing is in flight here.  Unregister explicitly: the ring's own
   * teardown runs later in a kernel worker, and until then the registered
   * file would stay open, and with it the image's flock. */
  if (r->fixed_file)
    io_uring_unregister_files (&r->ring);
  if (r->fixed_bufs)
    io_uring_unregister_buffers (&r->ring);
  io_uring_queue_exit (&r->ring);
  free (r->bounce);
  free (r);
  STAT_ADD (rings_freed, 1);
}

static struct nbdl_ring *
ring_new (struct nbdl_image *img, int *err)
{
  /* Strongest setup first; older kernels reject newer flags with EINVAL. */
  static const unsigned flag_sets[] = {
    IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN |
      IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
    IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN,
    IORING_SETUP_SUBMIT_ALL,
    0,
  };
  struct nbdl_ring *r;
  struct io_uring_params p;
  size_t i;
  int ret = -EINVAL;

  r = calloc (1, sizeof *r);
  if (r == NULL) {
    *err = -ENOMEM;
    return NULL;
  }
  r->img_id = img->id;
  r->fd = img->fd;
  r->entries = img->entries;
  r->seg_size = img->seg_size;

  for (i = 0; i < sizeof flag_sets / sizeof flag_sets[0]; i++) {
    memset (&p, 0, sizeof p);
    p.flags = flag_sets[i];
    ret = io_uring_queue_init_params (img->entries, &r->ring, &p);
    if (ret != -EINVAL)
      break;
  }
  if (ret < 0) {
    *err = ret;
    free (r);
    return NULL;
  }

  ret = io_uring_register_files (&r->ring, &img->fd, 1);
  r->fixed_file = ret == 0;

  STAT_ADD (rings, 1);
  return r;
}

/* The bounce slots, made on first need: a worker whose requests all go
 * straight to nbdkit's buffer never holds them.  Returns 0 or -errno. */
static int
need_bounce (struct nbdl_ring *r)
{
  size_t total = (size_t) r->entries * r->seg_size;
  struct iovec *iov;
  uint32_t s;
  int ret;

  if (r->bounce != NULL)
    return 0;
  ret = posix_memalign ((void **) &r->bounce, 4096, total);
  if (ret != 0) {
    r->bounce = NULL;
    return -ret;
  }
  memset (r->bounce, 0, total);
  iov = calloc (r->entries, sizeof *iov);
  if (iov != NULL) {
    for (s = 0; s < r->entries; s++) {
      iov[s].iov_base = r->bounce + (size_t) s * r->seg_size;
      iov[s].iov_len = r->seg_size;
    }
    /* Fails with ENOMEM past RLIMIT_MEMLOCK; plain reads still work. */
    ret = io_uring_register_buffers (&r->ring, iov, r->entries);
    r->fixed_bufs = ret == 0;
    free (iov);
  }
  if (r->fixed_bufs)
    STAT_ADD (fixed_bufs, 1);
  return 0;
}

static struct nbdl_ring *
get_ring (struct nbdl_image *img, int *err)
{
  struct nbdl_thread *t = get_thread (img);

  if (t == NULL) {
    *err = -ENOMEM;
    return NULL;
  }
  if (t->ring != NULL && t->ring->img_id != img->id) {
    ring_free (t->ring);
    t->ring = NULL;
  }
  if (t->ring == NULL)
    t->ring = ring_new (img, err);
  return t->ring;
}

/* A ring whose state we can no longer trust is dropped; the next call on
 * this thread builds a fresh one. */
void
drop_ring (void)
{
  struct nbdl_thread *t = current_thread ();

  if (t != NULL) {
    ring_free (t->ring);
    t->ring = NULL;
  }
}

/* ---- placement of the calling thread ---------------------------------- */

/* Move the calling worker between the busy and idle CPU sets as the number
 * of requests in progress (n, ours included) crosses the thresholds; in
 * between it stays where it is, so a steady load makes no system calls. */
static void
place_thread (struct nbdl_image *img, uint32_t n)
{
  struct nbdl_thread *t = current_thread ();
  int want;

  if (t == NULL)
    return;
  if (t->placed_img != img->id) {
    t->placed = PLACED_NOWHERE;
    t->placed_img = img->id;
  }
  if (n >= img->busy_at)
    want = PLACED_BUSY;
  else if (n <= 1)
    want = PLACED_IDLE;
  else
    return;
  if (want == t->placed)
    return;
  if (sched_setaffinity (0, sizeof (cpu_set_t),
                         want == PLACED_BUSY ? &img->busy : &img->idle) == 0) {
    t->placed = want;
    STAT_ADD (moves, 1);
  }
}

/* ---- submission and completion ---------------------------------------- */

static struct io_uring_sqe *
next_sqe (struct nbdl_ring *r)
{
  /* The ring has `entries` SQEs and a wave never prepares more. */
  struct io_uring_sqe *sqe = io_uring_get_sqe (&r->ring);

  if (sqe == NULL) {
    fprintf (stderr, "nbdloop: submission queue unexpectedly full\n");
    abort ();
  }
  return sqe;
}

static void
prep_rw (struct nbdl_ring *r, int write, char *addr, uint32_t len,
         uint64_t off, int slot, int fua, uint64_t user_data)
{
  struct io_uring_sqe *sqe = next_sqe (r);
  int fd = r->fixed_file ? 0 : r->fd;

  if (slot >= 0 && r->fixed_bufs) {
    if (write)
      io_uring_prep_write_fixed (sqe, fd, addr, len, off, slot);
    else
      io_uring_prep_read_fixed (sqe, fd, addr, len, off, slot);
  }
  else {
    if (write)
      io_uring_prep_write (sqe, fd, addr, len, off);
    else
      io_uring_prep_read (sqe, fd, addr, len, off);
  }
  if (write && fua)
    sqe->rw_flags = RWF_DSYNC;
  if (r->fixed_file)
    sqe->flags |= IOSQE_FIXED_FILE;
  sqe->user_data = user_data;
}

/* A wait for completions returns after at most WAIT_SLICE_S seconds and is
 * entered again.  Entering again runs any completion work the kernel queued
 * for this thread without waking it, so a lost wakeup costs a slice instead
 * of hanging the request; a wave that gets no completion for
 * STALL_REPORT_SLICES slices in a row says so on stderr, and again as often
 * after (a completion starts the count over). */
#define WAIT_SLICE_S 1
#define STALL_REPORT_SLICES 10

/* Store each completion now in the CQ ring in res[user_data] and its
 * arrival in order[...]; returns how many of them were ours (user_data
 * below nslots: liburing's own timeout CQEs are not). */
static unsigned
take_cqes (struct nbdl_ring *r, unsigned nslots, int64_t *res,
           uint32_t *order, uint32_t *next_order)
{
  struct io_uring_cqe *cqe;
  unsigned head, seen = 0, ours = 0;

  io_uring_for_each_cqe (&r->ring, head, cqe) {
    uint64_t i = cqe->user_data;
    if (i < nslots) {
      res[i] = cqe->res;
      order[i] = (*next_order)++;
      ours++;
    }
    seen++;
  }
  io_uring_cq_advance (&r->ring, seen);
  return ours;
}

/* Submit the n prepared SQEs and wait for all of their completions (see
 * take_cqes); user_data is below nslots.  Returns 0, or -errno if the SQEs
 * could not all be submitted; then every slot still marked NBDL_NOT_RUN
 * gets that error and the ring is marked broken (unsubmitted SQEs are stuck
 * in it), to be dropped by the caller once it no longer uses the bounce
 * slots. */
static int
submit_and_reap (struct nbdl_ring *r, unsigned n, unsigned nslots,
                 int64_t *res, uint32_t *order, uint32_t *next_order)
{
  /* Without IORING_FEAT_EXT_ARG liburing would time a wait with an SQE of
   * its own, and a full SQ ring has no room for one: wait unbounded. */
  int bounded = (r->ring.features & IORING_FEAT_EXT_ARG) != 0;
  struct __kernel_timespec slice = { .tv_sec = WAIT_SLICE_S, .tv_nsec = 0 };
  unsigned submitted = 0, reaped = 0, idle = 0;
  int ret = 0, tries = 0;

  STAT_ADD (sqes, n);
  STAT_ADD (waves, 1);
  while (submitted < n) {
    struct io_uring_cqe *cqe;
    unsigned now;

    /* One system call submits and waits; its return value mixes the two,
     * so what was submitted is read from the SQ ring instead. */
    if (bounded)
      ret = io_uring_submit_and_wait_timeout (&r->ring, &cqe, n, &slice, NULL);
    else
      ret = io_uring_submit_and_wait (&r->ring, n - submitted);
    now = n - io_uring_sq_ready (&r->ring);
    /* liburing says ETIME only when no CQE came; with everything
     * submitted, that was a whole slice of waiting. */
    if (ret == -ETIME && now == n) {
      STAT_ADD (wait_slices, 1);
      idle++;
    }
    if (now > submitted) {
      submitted = now;
      continue;
    }
    if ((ret >= 0 || ret == -EINTR || ret == -EAGAIN || ret == -ETIME) && ++tries < 1000)
      continue;
    if (ret >= 0)
      ret = -EIO;
    break;
  }
  reaped += take_cqes (r, nslots, res, order, next_order);
  while (reaped < submitted) {
    struct io_uring_cqe *cqe;
    int w = io_uring_wait_cqes (&r->ring, &cqe, submitted - reaped,
                                bounded ? &slice : NULL, NULL);

    if (w == -ETIME) {
      STAT_ADD (wait_slices, 1);
      if (++idle % STALL_REPORT_SLICES == 0)
        fprintf (stderr, "nbdloop: %u of %u I/O submissions not completed "
                 "after %u s; still waiting\n", submitted - reaped, submitted,
                 idle * WAIT_SLICE_S);
      continue;
    }
    if (w == -EINTR || w == -EAGAIN)
      continue;
    if (w < 0) {
      /* We cannot return while the kernel may still use the buffers. */
      fprintf (stderr, "nbdloop: io_uring_wait_cqe: %s\n", strerror (-w));
      abort ();
    }
    idle = 0;
    reaped += take_cqes (r, nslots, res, order, next_order);
  }
  if (submitted < n) {
    unsigned i;
    /* Only SQEs that never reached the kernel are left in the SQ ring;
     * their user_data slots still hold NBDL_NOT_RUN. */
    for (i = 0; i < nslots; i++)
      if (res[i] == NBDL_NOT_RUN)
        res[i] = ret;
    r->broken = 1;
    return ret;
  }
  return 0;
}

/* ---- requests --------------------------------------------------------- */

static void
copy_out (char *user, const struct nbdl_seg *s, const char *slot, int64_t res)
{
  /* Copy the part of the request's window that the read produced. */
  uint64_t got = res > 0 ? (uint64_t) res : 0;
  uint64_t end = (uint64_t) s->skip + s->copy_len;

  if (got > end)
    got = end;
  if (got > s->skip) {
    memcpy (user + s->user_off, slot + s->skip, got - s->skip);
    STAT_ADD (copied, got - s->skip);
  }
}

static void
fill_window (struct nbdl_image *img, int op, char *user,
             const struct nbdl_seg *s, char *slot)
{
  if (op == NBDL_OP_WRITE)
    memcpy (slot + s->skip, user + s->user_off, s->copy_len);
  else
    memset (slot + s->skip, 0, s->copy_len);
  STAT_ADD (copied, s->copy_len);
  (void) img;
}

/* Whether a direct-mode segment can be done on the caller's buffer: all of
 * it is window (so no preread), and its place there meets the memory
 * alignment.  Its offset and length meet the offset alignment already, by
 * plan.  Decided per segment, since nbdkit moves its buffer when a larger
 * request comes. */
static int
in_place (const struct nbdl_image *img, int op, const char *user,
          const struct nbdl_seg *s)
{
  return img->mem_align != 0 && op != NBDL_OP_WRITE_ZEROES &&
    !(s->flags & NBDL_SEG_PREREAD) && s->skip == 0 && s->copy_len == s->len &&
    ((uintptr_t) (user + s->user_off) & (img->mem_align - 1)) == 0;
}

/* One wave of at most `entries` segments.  *bounced is set when a segment
 * went through a bounce slot. */
static int
run_wave (struct nbdl_image *img, struct nbdl_ring *r, int op, int fua,
          char *user, struct nbdl_seg *w, unsigned n, uint32_t *next_order,
          int *bounced)
{
  int64_t res[n];
  uint32_t order[n];
  char direct_to_user[n];
  unsigned i, prereads = 0, bad = 0;
  int write = op != NBDL_OP_READ;
  int ret;

  if (img->direct) {
    int need = 0;

    for (i = 0; i < n; i++) {
      direct_to_user[i] = in_place (img, op, user, &w[i]);
      need |= !direct_to_user[i];
    }
    if (need) {
      ret = need_bounce (r);
      if (ret < 0) {
        for (i = 0; i < n; i++) {
          w[i].res = ret;
          w[i].order = (*next_order)++;
        }
        return (int) n;
      }
      *bounced = 1;
    }
  }

  if (img->direct && write) {
    /* Read-modify-write: fetch the edge blocks into their slots first. */
    for (i = 0; i < n; i++) {
      res[i] = NBDL_NOT_RUN;
      order[i] = UINT32_MAX;
      if (w[i].flags & NBDL_SEG_PREREAD) {
        prep_rw (r, 0, r->bounce + (size_t) i * r->seg_size, w[i].len,
                 w[i].file_off, i, 0, i);
        prereads++;
      }
    }
    if (prereads > 0) {
      uint32_t scratch = 0;
      STAT_ADD (prereads, prereads);
      ret = submit_and_reap (r, prereads, n, res, order, &scratch);
      /* user_data was the slot index, so res[] is indexed by segment. */
      for (i = 0; i < n; i++) {
        if (!(w[i].flags & NBDL_SEG_PREREAD))
          continue;
        if (res[i] != (int64_t) w[i].len) {
          /* A short pre-read cannot be completed later: report EIO. */
          w[i].res = res[i] < 0 ? res[i] : -EIO;
          w[i].order = (*next_order)++;
          bad++;
        }
      }
      if (ret < 0 || bad > 0)
        return bad > 0 ? (int) bad : ret;
    }
  }

  for (i = 0; i < n; i++) {
    struct nbdl_seg *s = &w[i];
    char *addr;
    int slot;

    res[i] = NBDL_NOT_RUN;
    order[i] = UINT32_MAX;
    if (img->direct && direct_to_user[i]) {
      slot = -1;
      addr = user + s->user_off;
      STAT_ADD (zero_copy_bytes, s->len);
    }
    else if (img->direct) {
      slot = i;
      addr = r->bounce + (size_t) i * r->seg_size;
      if (write)
        fill_window (img, op, user, s, addr);
    }
    else {
      slot = -1;
      addr = op == NBDL_OP_WRITE_ZEROES ? img->zeros : user + s->user_off;
    }
    prep_rw (r, write, addr, s->len, s->file_off, slot, fua, i);
  }
  ret = submit_and_reap (r, n, n, res, order, next_order);
  for (i = 0; i < n; i++) {
    w[i].res = res[i];
    w[i].order = order[i];
    if (img->direct && !write && !direct_to_user[i])
      copy_out (user, &w[i], r->bounce + (size_t) i * r->seg_size, res[i]);
    if (res[i] != (int64_t) w[i].len)
      bad++;
  }
  (void) ret;
  return (int) bad;
}

int
nbdl_rw (struct nbdl_image *img, int op, int fua, char *user,
         struct nbdl_seg *segs, uint32_t nsegs, uint64_t lock_off,
         uint64_t lock_len, int lock_mode)
{
  struct nbdl_range held;
  struct nbdl_thread *t;
  struct nbdl_ring *r;
  uint32_t done = 0, next_order = 0, i, n_now;
  uint64_t total = 0;
  int err = 0, bad = 0, bounced = 0;

  for (i = 0; i < nsegs; i++) {
    total += segs[i].len;
    segs[i].res = NBDL_NOT_RUN;
    segs[i].order = UINT32_MAX;
    if (segs[i].len > img->seg_size ||
        (uint64_t) segs[i].skip + segs[i].copy_len > segs[i].len ||
        (!img->direct && (segs[i].skip != 0 || segs[i].copy_len != segs[i].len)))
      return -EINVAL;
  }
  t = ring_enter (img);
  if (t == NULL)
    return -ENOMEM;
  r = get_ring (img, &err);
  if (r == NULL) {
    ring_leave (t);
    return err;
  }
  STAT_ADD (requests, 1);
  n_now = __atomic_add_fetch (&img->inflight, 1, __ATOMIC_RELAXED);
  if (img->placement) {
    if (total <= NBDL_PLACE_MAX_LEN)
      place_thread (img, n_now);
    else
      STAT_ADD (unplaced, 1);
  }

  if (lock_mode != NBDL_LOCK_NONE)
    range_lock (img, &held, lock_off, lock_len, lock_mode);
  while (done < nsegs && bad == 0) {
    uint32_t n = nsegs - done;

    if (n > r->entries)
      n = r->entries;
    bad = run_wave (img, r, op, fua, user, segs + done, n, &next_order,
                    &bounced);
    if (bad < 0)
      break;
    done += n;
    if (r->broken) {
      drop_ring ();
      r = NULL;
      if (done < nsegs && bad == 0) {
        r = get_ring (img, &err);
        if (r == NULL)
          break;
      }
    }
  }
  if (r != NULL && r->broken)
    drop_ring ();
  if (img->direct && !bounced)
    STAT_ADD (zero_copy, 1);
  if (lock_mode != NBDL_LOCK_NONE)
    range_unlock (img, &held);
  __atomic_fetch_sub (&img->inflight, 1, __ATOMIC_RELAXED);
  ring_leave (t);

  bad = 0;
  for (i = 0; i < nsegs; i++)
    if (segs[i].res != (int64_t) segs[i].len)
      bad++;
  return bad;
}

int64_t
nbdl_rw1 (struct nbdl_image *img, int op, int fua, char *user,
          uint64_t file_off, uint32_t len, int lock_mode)
{
  struct nbdl_seg s = {
    .file_off = file_off, .user_off = 0, .len = len, .skip = 0,
    .copy_len = len, .flags = 0,
  };
  int ret = nbdl_rw (img, op, fua, user, &s, 1, file_off, len, lock_mode);

  return ret < 0 ? ret : s.res;
}

/* The operations that need no buffer: one SQE each, on the calling
 * thread's ring, under a range lock when lock_mode asks for one. */
enum fd_op { FD_FSYNC, FD_FALLOCATE, FD_FADVISE };

static int
run_fd_op (struct nbdl_image *img, enum fd_op op, int arg, uint64_t off,
           uint64_t len, int lock_mode)
{
  struct nbdl_range held;
  struct io_uring_sqe *sqe;
  struct nbdl_thread *t;
  struct nbdl_ring *r;
  int64_t res = NBDL_NOT_RUN;
  uint32_t order, next = 0;
  int err = 0, ret;

  t = ring_enter (img);
  if (t == NULL)
    return -ENOMEM;
  r = get_ring (img, &err);
  if (r == NULL) {
    ring_leave (t);
    return err;
  }
  if (lock_mode != NBDL_LOCK_NONE)
    range_lock (img, &held, off, len, lock_mode);
  sqe = next_sqe (r);
  switch (op) {
  case FD_FSYNC:
    io_uring_prep_fsync (sqe, r->fd, arg ? IORING_FSYNC_DATASYNC : 0);
    break;
  case FD_FALLOCATE:
    io_uring_prep_fallocate (sqe, r->fd, arg, off, len);
    break;
  case FD_FADVISE:
    io_uring_prep_fadvise (sqe, r->fd, off, (uint32_t) len, arg);
    break;
  }
  sqe->user_data = 0;
  if (r->fixed_file) {
    sqe->fd = 0;
    sqe->flags |= IOSQE_FIXED_FILE;
  }
  STAT_ADD (requests, 1);
  ret = submit_and_reap (r, 1, 1, &res, &order, &next);
  if (r->broken)
    drop_ring ();
  if (lock_mode != NBDL_LOCK_NONE)
    range_unlock (img, &held);
  ring_leave (t);
  return ret < 0 ? ret : (int) res;
}

int
nbdl_fsync (struct nbdl_image *img, int datasync)
{
  return run_fd_op (img, FD_FSYNC, datasync, 0, 0, NBDL_LOCK_NONE);
}

int
nbdl_fallocate (struct nbdl_image *img, int mode, uint64_t off, uint64_t len,
                int lock_mode)
{
  return run_fd_op (img, FD_FALLOCATE, mode, off, len, lock_mode);
}

int
nbdl_fadvise (struct nbdl_image *img, uint64_t off, uint32_t len, int advice)
{
  return run_fd_op (img, FD_FADVISE, advice, off, len, NBDL_LOCK_NONE);
}
