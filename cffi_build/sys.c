/* System helpers, which need neither an image nor a ring, and the
 * counters that every unit adds to, defined beside their reader. */
#include "nbdl_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
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

/* ---- samples for the adaptive placement rule -------------------------- */

/* The whole of a small /proc file into buf, NUL-terminated; its length or -errno. */
static ssize_t
read_proc (const char *path, char *buf, size_t size)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC), err = 0;
  ssize_t n, got = 0;

  if (fd < 0)
    return -errno;
  while (got < (ssize_t) size - 1) {
    n = read (fd, buf + got, size - 1 - got);
    if (n < 0)
      err = -errno;
    if (n <= 0)
      break;
    got += n;
  }
  close (fd);
  if (err)
    return err;
  buf[got] = '\0';     /* the CPU lines come first: a cut-off tail is no loss */
  return got;
}

/* The number after "name:" in a /proc status text, or -1. */
static long long
status_field (const char *text, const char *name)
{
  const char *at = strstr (text, name);

  return at ? strtoll (at + strlen (name), NULL, 10) : -1;
}

int
nbdl_sample_times (struct nbdl_task_times *tasks, int max_tasks,
                   uint64_t *busy, uint64_t *idle, int max_cpus)
{
  char path[64], buf[4096];
  struct dirent *de;
  DIR *dir;
  int n = 0, i;

  dir = opendir ("/proc/self/task");
  if (dir == NULL)
    return -errno;
  while (n < max_tasks && (de = readdir (dir)) != NULL) {
    unsigned long long run, wait;
    long long vol, invol;
    int tid = atoi (de->d_name);

    if (tid <= 0)
      continue;
    snprintf (path, sizeof path, "/proc/self/task/%d/schedstat", tid);
    if (read_proc (path, buf, sizeof buf) <= 0 ||
        sscanf (buf, "%llu %llu", &run, &wait) != 2)
      continue;          /* the thread has just ended */
    /* The switch counts are the status file's last lines (about 1.4 KB
     * in); the name is looked for with its newline, since "voluntary_"
     * ends "nonvoluntary_".  Not found (a status cut short), the thread
     * counts no switches: the rule then goes by CPU time alone. */
    snprintf (path, sizeof path, "/proc/self/task/%d/status", tid);
    vol = invol = -1;
    if (read_proc (path, buf, sizeof buf) > 0) {
      vol = status_field (buf, "\nvoluntary_ctxt_switches:");
      invol = status_field (buf, "\nnonvoluntary_ctxt_switches:");
    }
    if (vol < 0 || invol < 0)
      vol = invol = 0;
    tasks[n].tid = tid;
    tasks[n].run_ns = run;
    tasks[n].wait_ns = wait;
    tasks[n].switches = (uint64_t) (vol + invol);
    tasks[n].preempted = (uint64_t) invol;
    n++;
  }
  closedir (dir);

  for (i = 0; i < max_cpus; i++)
    busy[i] = idle[i] = 0;
  {
    size_t size = 256 << 10;
    char *stat = malloc (size), *line;
    ssize_t len;

    if (stat == NULL)
      return -ENOMEM;
    len = read_proc ("/proc/stat", stat, size);
    if (len < 0) {
      free (stat);
      return (int) len;
    }
    for (line = stat; line != NULL && *line != '\0';
         line = strchr (line, '\n') ? strchr (line, '\n') + 1 : NULL) {
      unsigned long long t[8] = { 0 };
      int cpu;

      if (strncmp (line, "cpu", 3) != 0 || line[3] < '0' || line[3] > '9')
        continue;
      if (sscanf (line, "cpu%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu,
                  &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7]) < 5 ||
          cpu < 0 || cpu >= max_cpus)
        continue;
      busy[cpu] = t[0] + t[1] + t[2] + t[5] + t[6] + t[7];
      idle[cpu] = t[3] + t[4];
    }
    free (stat);
  }
  return n;
}
