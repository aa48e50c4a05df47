"""When the worker pool should leave its CPUs: the adaptive placement rule.

Under load, the pool gathers on its *home* CPUs, those that do not take the
disk's interrupts (nbdloop.engine.placement).  That is the best place while
the client runs elsewhere.  On a loop device the client (the filesystem,
the applications) shares the machine, and when it lands on the pool's CPU
the two take turns on it while another CPU idles.  This rule sees that and
spreads the pool over every allowed CPU, and brings it home again when
spreading serves fewer requests than home did.

It is fed a :class:`Sample` per interval (what the pool's threads ran and
waited, how busy each CPU was, how many requests were served) and answers
with the CPUs the pool should use under load.  Pure logic: no I/O, no clock
of its own (the caller passes the time), so it is tested on recorded
samples.

- **Home to spread**: the pool waits for a CPU (its threads' run delay is
  more than ``wait_share`` of their runnable time) while a CPU outside
  home has room (idle more than ``room``), in ``confirm`` samples in a row,
  and home's rate is known: ``settle`` loaded samples were taken there.
  The pool's own threads queue behind each other at home, so waiting alone
  says little; an idle CPU beside a waiting pool is the sign.
- **Spread to home**: the CPUs outside home turn out worse: after ``dwell``
  seconds and ``settle`` samples spread, the pool serves fewer requests per
  second than it did at home just before, by more than ``margin``.  It then
  stays home for ``probe`` seconds whatever the samples say, and ``probe``
  doubles.
- **Rates** are medians of loaded samples: spread, of those since it
  left home (``settle`` at least, about a second); home, of the crowded
  ones that made it leave (``confirm`` to ``settle`` of them: a client that
  has just come onto the pool's CPU must not be judged by what home served
  before it came).  The first sample after a change, in which the workers
  are still moving, does not count.  A short baseline is the one to fear: the first
  samples of a run serve least (the client and the workers are starting),
  and a spread measured against them looks good whatever it serves.  The
  margin is small because the pool should be within a few per cent of the
  better of its two places; the longer comparison keeps noise from
  deciding.
- **A client that moves**: after ``probe`` seconds spread the pool goes home
  for a trial of ``dwell`` seconds; if home serves more by ``margin`` it
  stays (and ``probe`` is reset), otherwise it spreads again at once and
  ``probe`` doubles (up to ``max_probe``).  No change comes sooner than
  ``dwell`` after the one before, so the pool cannot flap faster than that
  however the samples swing, and a swing that keeps coming back is tried
  ever less often.
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

HOME = "home"
SPREAD = "spread"


@dataclass(frozen=True)
class Sample:
    """What the pool and the CPUs did over one interval."""
    seconds: float                  # the interval's wall time
    run: float                      # CPU seconds the pool's threads ran
    wait: float                     # seconds they were runnable, waiting for a CPU
    busy: Mapping[int, float]       # per CPU: seconds busy with anything
    requests: int = 0               # requests served

    def waiting(self) -> float:
        total = self.run + self.wait
        return self.wait / total if total > 0 else 0.0

    def free(self, cpu: int) -> float:
        if self.seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - self.busy.get(cpu, 0.0) / self.seconds)

    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Rule:
    """The pool's state (home or spread) and what moves it."""
    home: frozenset[int]
    allowed: frozenset[int]
    wait_share: float = 0.2
    room: float = 0.45
    loaded: float = 0.5            # CPU seconds a second the pool must want to count
    confirm: int = 3
    settle: int = 7
    dwell: float = 1.0
    margin: float = 0.03
    probe: float = 8.0
    max_probe: float = 64.0
    state: str = HOME
    #: (time, state, why) of every change, for the log and the tests.
    changes: list[tuple[float, str, str]] = field(default_factory=list)
    _agree: int = field(default=0, repr=False)
    _since: float | None = field(default=None, repr=False)
    _until: float = field(default=float("-inf"), repr=False)   # home held until then
    _trial: bool = field(default=False, repr=False)            # home on trial
    _rates: list[float] = field(default_factory=list, repr=False)
    _moving: bool = field(default=False, repr=False)           # the first sample after a change
    _seen: int = field(default=0, repr=False)                  # loaded samples since then
    _home_rate: float = field(default=0.0, repr=False)
    _spread_rate: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self.home = frozenset(self.home)
        self.allowed = frozenset(self.allowed)
        if not self.home or not self.home < self.allowed:
            raise ValueError("the home CPUs must be some, not all, of the allowed ones")
        self._probe = self.probe

    @property
    def cpus(self) -> frozenset[int]:
        """Where the pool runs under load in the current state."""
        return self.home if self.state == HOME else self.allowed

    def is_loaded(self, s: Sample) -> bool:
        """The pool wants a CPU: its threads, summed, ran or waited to run for
        at least ``loaded`` seconds a second.  Waiting counts: a pool that
        a busy thread on its CPU starves runs little (a tenth of the CPU, its
        workers queued behind it), and it is the one that most needs to move."""
        return s.run + s.wait >= self.loaded * s.seconds

    def crowded(self, s: Sample) -> bool:
        """The pool waits while a CPU outside home has room."""
        return (self.is_loaded(s) and s.waiting() > self.wait_share
                and max(s.free(c) for c in self.allowed - self.home) > self.room)

    def _rate(self, last: int | None = None) -> float:
        rates = self._rates[-last:] if last else self._rates
        return statistics.median(rates) if rates else 0.0

    def _change(self, now: float, state: str, why: str) -> frozenset[int]:
        if self.state == HOME:
            # What home serves under the conditions that make it leave: the
            # samples of the crowded streak, up to ``settle`` of them.
            self._home_rate = self._rate(max(1, min(self._agree, self.settle)))
        else:
            self._spread_rate = self._rate()
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
        known = self._seen >= self.settle
        if self.state == HOME:
            if self._trial and stayed >= self.dwell and known:
                self._trial = False
                if self._rate() < self._spread_rate * (1 + self.margin):
                    self._probe = min(2 * self._probe, self.max_probe)
                    return self._change(now, SPREAD, "home served no more than spread")
                self._probe = self.probe
            self._agree = self._agree + 1 if self.crowded(s) else 0
            if (self._agree >= self.confirm and known and stayed >= self.dwell
                    and now >= self._until and not self._trial):
                return self._change(now, SPREAD, "the pool waits while another CPU idles")
            return None
        if not loaded or stayed < self.dwell or not known:
            return None
        if self._home_rate and self._rate() < self._home_rate * (1 - self.margin):
            self._until = now + self._probe
            self._probe = min(2 * self._probe, self.max_probe)
            return self._change(now, HOME, "spread served less than home")
        if stayed >= self._probe:
            self._trial = True
            return self._change(now, HOME, "a trial at home")
        return None
