"""When the worker pool should leave its CPUs: the adaptive placement rule.

Under load, the pool gathers on its *home* CPUs, those that do not take the
disk's interrupts (nbdloop.engine.placement).  That is the best place while
the client runs elsewhere.  On a loop device the client (the filesystem,
the applications) shares the machine, and when it lands on the pool's CPU
the two take turns on it while another CPU idles.  This rule sees that and
moves the pool *away*, onto the other CPUs, or, if the pool is still
crowded there while home idles (two servers that both left), *spreads*
it over every allowed CPU; it brings the pool home again when that serves
fewer requests than home did.

It is fed a :class:`Sample` per interval (what the pool's threads ran and
waited, how often they were preempted, how busy each CPU was, how many
requests were served) and answers with the CPUs the pool should use under
load.  Pure logic: no I/O, no clock of its own (the caller passes the
time), so it is tested on recorded samples.

- **Why away before spread**: the pool serves best kept together, because
  a wake-up within a CPU is cheap and one across CPUs is an interrupt to
  the other (a VM exit in a VM).  Spread beside the client, the workers are
  woken across CPUs and share one of them with the client; away, they have
  a CPU to themselves and only the request and the reply cross.  Away is
  skipped, the pool going straight to spread, where the CPUs outside home
  are fewer than home's: the pool would trade the client's contention for
  its own.
- **Home to away (or spread)**: another task pushes the pool at home
  (more than ``preempt`` of its threads' context switches are
  preemptions, or other work takes more than ``shared`` of home), the pool
  waits for a CPU (its threads' run delay is more than ``wait_share`` of
  their runnable time) and a CPU outside its current set has room (idle
  more than ``room``), in ``confirm`` samples in a row, and the current
  set's rate is known: ``settle`` loaded samples were taken there.  The
  pool's own threads queue behind each other, so waiting alone says
  little; a client elsewhere that waits on a slow disk leaves its own CPU
  idle, so an idle CPU beside a waiting pool says little more.  What shows
  the client on the pool's CPU, at any rate, is preemption: each reply
  wakes the client and it preempts the worker that sent it, while the
  workers (SCHED_BATCH) do not preempt each other.  Away, a pool that
  waits spreads, but only if home is all but idle (``deserted``): home
  holds the client that made the pool leave, and that client may leave
  half its CPU free.
- **Back home**: away or spread turns out worse: after ``dwell`` seconds
  and ``settle`` samples there, the pool serves fewer requests per second
  than it did at home just before, by more than ``margin`` (spread that
  came from away is judged against the better of the two, and goes back
  to it).  It then stays there for ``probe`` seconds whatever the samples
  say, and ``probe`` doubles.
- **A clear verdict comes sooner**: from ``early`` samples on, a place
  that serves less by more than ``margin`` times ``settle`` over the
  samples seen (7 % at 3 of 7) is left at once.  A wrong move (a client
  on the CPU the pool went to, which left it idle because it waits on a
  slow disk) costs what the pool loses until the verdict, and in a short
  run that loss is the difference; a small difference still needs every
  sample, so noise does not decide it.  The trial at home is cut short
  the same way when home is clearly worse.
- **Rates** are medians of loaded samples: away or spread, of those since
  it got there (``settle`` at least, about a second, but ``early`` for a
  clear verdict); home, of the crowded
  ones that made it leave (``confirm`` to ``settle`` of them: a client that
  has just come onto the pool's CPU must not be judged by what home served
  before it came).  The first sample after a change, in which the workers
  are still moving, does not count.  A short baseline is the one to fear:
  the first samples of a run serve least (the client and the workers are
  starting), and a move judged against them looks good whatever it serves.
  The margin is small because the pool should be within a few per cent of
  the better of its places; the longer comparison keeps noise from
  deciding.
- **A client that moves**: after ``probe`` seconds away (or spread) the
  pool goes home for a trial of ``settle`` samples; if home serves more by
  ``margin`` it stays (and ``probe`` is reset), otherwise it goes back at
  once and ``probe`` doubles (up to ``max_probe``).  No change comes sooner
  than ``dwell`` after the one before, so the pool cannot flap faster than
  that however the samples swing, and a swing that keeps coming back is
  tried ever less often.
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

HOME = "home"
AWAY = "away"
SPREAD = "spread"


@dataclass(frozen=True)
class Sample:
    """What the pool and the CPUs did over one interval."""
    seconds: float                  # the interval's wall time
    run: float                      # CPU seconds the pool's threads ran
    wait: float                     # seconds they were runnable, waiting for a CPU
    busy: Mapping[int, float]       # per CPU: seconds busy with anything
    requests: int = 0               # requests served
    switches: int = 0               # times the pool's threads left a CPU
    preempted: int = 0              # of them, not by their own choice

    def waiting(self) -> float:
        total = self.run + self.wait
        return self.wait / total if total > 0 else 0.0

    def preemptions(self) -> float:
        """The share of the pool's switches that were preemptions."""
        return self.preempted / self.switches if self.switches > 0 else 0.0

    def others(self, cpus: frozenset[int]) -> float:
        """The share of ``cpus``' time busy with work other than the
        pool's, taking the pool to run on them."""
        if self.seconds <= 0 or not cpus:
            return 0.0
        busy = sum(self.busy.get(c, 0.0) for c in cpus)
        return max(0.0, busy - self.run) / (self.seconds * len(cpus))

    def free(self, cpu: int) -> float:
        if self.seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - self.busy.get(cpu, 0.0) / self.seconds)

    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Rule:
    """The pool's state (home, away or spread) and what moves it."""
    home: frozenset[int]
    allowed: frozenset[int]
    wait_share: float = 0.2
    preempt: float = 0.2           # share of the pool's switches that were preemptions
    shared: float = 0.35           # share of the pool's CPUs other work took
    room: float = 0.55
    deserted: float = 0.8          # home's idle share that lets a crowded pool spread
    loaded: float = 0.5            # CPU seconds a second the pool must want to count
    confirm: int = 3
    settle: int = 7
    early: int = 3                 # loaded samples that can show a place clearly worse
    dwell: float = 0.5
    margin: float = 0.03
    probe: float = 8.0
    max_probe: float = 64.0
    state: str = HOME
    #: (time, state, why) of every change, for the log and the tests.
    changes: list[tuple[float, str, str]] = field(default_factory=list)
    _agree: int = field(default=0, repr=False)
    _since: float | None = field(default=None, repr=False)
    _until: float = field(default=float("-inf"), repr=False)   # where it went back: held till
    _trial: bool = field(default=False, repr=False)            # home on trial
    _left: str = field(default=AWAY, repr=False)               # where a trial goes back to
    _rates: list[float] = field(default_factory=list, repr=False)
    _moving: bool = field(default=False, repr=False)           # the first sample after a change
    _seen: int = field(default=0, repr=False)                  # loaded samples since then
    _home_rate: float = field(default=0.0, repr=False)
    _away_rate: float = field(default=0.0, repr=False)         # of the last away or spread
    _via_away: float = field(default=0.0, repr=False)          # away's rate, when it spread

    def __post_init__(self) -> None:
        self.home = frozenset(self.home)
        self.allowed = frozenset(self.allowed)
        if not self.home or not self.home < self.allowed:
            raise ValueError("the home CPUs must be some, not all, of the allowed ones")
        self._probe = self.probe

    @property
    def cpus(self) -> frozenset[int]:
        """Where the pool runs under load in the current state."""
        return {HOME: self.home, AWAY: self.allowed - self.home}.get(self.state, self.allowed)

    def _away_or_spread(self) -> str:
        """Where a pool crowded at home goes."""
        return AWAY if len(self.allowed - self.home) >= len(self.home) else SPREAD

    def is_loaded(self, s: Sample) -> bool:
        """The pool wants a CPU: its threads, summed, ran or waited to run for
        at least ``loaded`` seconds a second.  Waiting counts: a pool that
        a busy thread on its CPU starves runs little (a tenth of the CPU, its
        workers queued behind it), and it is the one that most needs to move."""
        return s.run + s.wait >= self.loaded * s.seconds

    def pushed(self, s: Sample) -> bool:
        """Another task takes the pool's CPU: it preempts the workers
        (the client, woken by a reply, does that once a request or more),
        or it runs there a good part of the time (a busy thread, another
        pool).  The pool's own workers queue behind each other but do not
        preempt each other (they are SCHED_BATCH), so with the client
        elsewhere a pool that waits is seldom preempted."""
        return (s.preemptions() > self.preempt
                or s.others(self.cpus) > self.shared)

    def crowded(self, s: Sample) -> bool:
        """The pool waits while a CPU outside its current ones has room
        (spread, there is none); at home, only when another task pushes
        it.  Away, the room must be more: home holds the client that made
        the pool leave, and a client that keeps half a CPU busy is no
        reason to join it again; a home that idles is."""
        outside = self.allowed - self.cpus
        room = self.deserted if self.state == AWAY else self.room
        return (bool(outside) and self.is_loaded(s) and s.waiting() > self.wait_share
                and max(s.free(c) for c in outside) > room
                and (self.state != HOME or self.pushed(s)))

    def _rate(self, last: int | None = None) -> float:
        rates = self._rates[-last:] if last else self._rates
        return statistics.median(rates) if rates else 0.0

    def _worse(self, than: float) -> bool:
        """The current place serves less than ``than`` by more than its
        samples so far let noise explain (``margin`` once ``settle`` are in)."""
        n = len(self._rates)
        if not than or n < self.early:
            return False
        return self._rate() < than * (1 - self.margin * max(1.0, self.settle / n))

    def _change(self, now: float, state: str, why: str) -> frozenset[int]:
        if self.state == HOME:
            # What home serves under the conditions that make it leave: the
            # samples of the crowded streak, up to ``settle`` of them.
            self._home_rate = self._rate(max(1, min(self._agree, self.settle)))
        else:
            self._away_rate = self._rate()
            self._left = self.state
        if self.state == AWAY and state == SPREAD:
            self._via_away = self._away_rate
        elif self.state == HOME and state == AWAY:
            self._via_away = 0.0
        self.state = state
        self._since = now
        self._agree = 0
        self._rates = []
        self._moving = True
        self._seen = 0
        self.changes.append((now, state, why))
        return self.cpus

    def feed(self, now: float, s: Sample) -> frozenset[int] | None:
        """Take one sample at time ``now`` (seconds, any monotonic origin);
        return the pool's new CPUs if it should move, else None."""
        loaded = self.is_loaded(s)
        if loaded and self._moving:
            self._moving = False
        elif loaded:
            self._seen += 1
            if s.requests:
                self._rates = (self._rates + [s.rate()])[-20:]
        # Before the first change there is nothing to dwell on.
        stayed = float("inf") if self._since is None else now - self._since
        judged = stayed >= self.dwell
        settled = judged and self._seen >= self.settle
        if self.state == HOME and self._trial and judged and (
                settled or self._worse(self._away_rate)):
            self._trial = False
            if self._rate() < self._away_rate * (1 + self.margin):
                self._probe = min(2 * self._probe, self.max_probe)
                return self._change(now, self._left, "home served no more than "
                                    + self._left)
            self._probe = self.probe
        self._agree = self._agree + 1 if self.crowded(s) else 0
        if self.state == HOME:
            if (self._agree >= self.confirm and settled and now >= self._until
                    and not self._trial):
                return self._change(now, self._away_or_spread(),
                                    "another task takes the pool's CPU while another idles")
            return None
        if not loaded or not judged:
            return None
        # Spread is judged against away too, when it came from there.
        back, best = HOME, self._home_rate
        if self.state == SPREAD and self._via_away > best:
            back, best = AWAY, self._via_away
        if self._worse(best):
            self._until = now + self._probe
            self._probe = min(2 * self._probe, self.max_probe)
            return self._change(now, back, f"{self.state} served less than {back}")
        if not settled:
            return None
        if self.state == AWAY and self._agree >= self.confirm and now >= self._until:
            return self._change(now, SPREAD, "the pool waits away while home idles")
        if stayed >= self._probe:
            self._trial = True
            return self._change(now, HOME, "a trial at home")
        return None
