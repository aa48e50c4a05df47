/* System helpers, which need neither an image nor a ring, and the
 * counters that every unit adds to, defined beside their reader. */
#include "nbdl_int.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <linux/stat.h>

struct nbdl_stats nbdl_global_stats;

int
nbdl_set_io_flusher (void)
{
  /* Memory reclaim in this thread (and the threads it creates later) must
   * not wait on I/O to the device we serve: PF_MEMALLOC_NOIO and
   * PF_LOCAL_THROTTLE, as the loop driver's and ublk's servers have. */
  if (prctl (PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0)
    return -errno;
  return prctl (PR_GET_IO_FLUSHER, 0, 0, 0, 0);
}

int
nbdl_outlive_parent (void)
{
  /* nbdkit's python plugin asks for SIGTERM when its parent dies; under a
   * device's agent the agent decides, and a SIGTERMed nbdkit would answer
   * the kernel's requests with ESHUTDOWN (an I/O error for the filesystem). */
  if (prctl (PR_SET_PDEATHSIG, 0, 0, 0, 0) != 0)
    return -errno;
  return 0;
}

int
nbdl_mlockall (void)
{
  /* MCL_ONFAULT: lock pages as they are touched, not all at once.  Without
   * it every worker's whole stack (RLIMIT_STACK) is faulted in and locked,
   * which on a small machine gets the server killed for memory. */
  if (mlockall (MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0)
    return -errno;
  return 0;
}

int
nbdl_dio_align (int fd, uint32_t *mem_align, uint32_t *off_align)
{
  struct statx st;

  memset (&st, 0, sizeof st);
  if (statx (fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) != 0)
    return -errno;
  if (st.stx_mask & STATX_DIOALIGN) {
    *mem_align = st.stx_dio_mem_align;
    *off_align = st.stx_dio_offset_align;
  }
  else {
    *mem_align = 0;
    *off_align = 0;
  }
  return 0;
}

void
nbdl_stats (struct nbdl_stats *out)
{
  uint64_t *dst = (uint64_t *) out;
  uint64_t *src = (uint64_t *) &nbdl_global_stats;
  size_t i;

  for (i = 0; i < sizeof *out / sizeof (uint64_t); i++)
    dst[i] = __atomic_load_n (&src[i], __ATOMIC_RELAXED);
}
