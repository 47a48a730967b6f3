"""Statistics: the counters, their totals and their 15-second averages (L0).

What the hot path pays (docs/architecture.rst, "Statistics"): plain
integer and float increments on objects it already holds, and no clock
call. Per message, the scanners count bytes (``received``), answered
requests (``ServerScanner.rfqs``), ended transactions (``xacts``) and
errors. Per transaction, the checkout and the release read the time of the
event being handled from an ``EventClock`` the reactor loop (``fastpoll``)
sets once per poll round, and add wait, query and transaction time.

Where the numbers live:

- a server connection: its ``ServerScanner`` (rfqs, xacts, errors, bytes
  received from the server, bytes sent to it, query and transaction time);
- a client: its ``ClientScanner`` (queries, bytes, the transactions and
  errors of its servers while bound) and its ClientProtocol (wait time);
- a server address (``pool.ConnectionPool.totals``): a ``Totals`` into
  which each connection's counters are folded when it closes; the live
  connections are added when a snapshot is taken;
- averages: ``Averages.tick`` once per janitor tick, recomputed every
  ``PERIOD`` seconds from the difference of two totals.

Units inside: seconds (floats) and bytes; the admin console and the metrics
convert (PgCat's SHOW STATS: query and transaction time in ms, wait time in
µs).
"""

PERIOD = 15.0  # seconds between two computations of the averages (PgCat's STAT_PERIOD)


class EventClock:
    """The time of the event being handled, set by the reactor loop once per
    poll round (``fastpoll``): reading it is an attribute load, not a
    call."""

    __slots__ = ("now",)

    def __init__(self, now=0.0):
        self.now = now


class LiveClock:
    """An EventClock for reactors whose loop does not set one (tests, other
    reactors): each read asks ``seconds()``."""

    __slots__ = ("_seconds",)

    def __init__(self, seconds):
        self._seconds = seconds

    @property
    def now(self):
        return self._seconds()


COUNTERS = ("xact_count", "query_count", "received", "sent", "xact_time", "query_time",
            "wait_time", "errors", "login_count", "assignments")


class Totals:
    """Monotonic counters of one server address, (pool, user) or pool."""

    __slots__ = COUNTERS

    def __init__(self):
        for name in COUNTERS:
            setattr(self, name, 0)

    def add(self, other):
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def add_connection(self, ss):
        """Fold in a server connection's ``ServerScanner`` counters."""
        self.xact_count += ss.xacts
        self.query_count += ss.rfqs
        self.received += ss.sent       # what clients sent through it
        self.sent += ss.received       # what it answered them
        self.xact_time += ss.xact_time
        self.query_time += ss.query_time
        self.errors += ss.errors
        self.assignments += ss.binds
        return self

    def copy(self):
        return Totals().add(self)

    def as_dict(self):
        return {name: getattr(self, name) for name in COUNTERS}


class Averages:
    """The averages of one Totals over the last complete period: per second
    for counts, bytes, errors and wait time (PgCat's), per transaction or
    query for transaction and query time. Zero until a period has passed."""

    __slots__ = ("_last", "_at", "xact_count", "query_count", "received", "sent",
                 "errors", "wait_time", "xact_time", "query_time", "login_count", "assignments")

    def __init__(self, now=0.0):
        self._last = Totals()
        self._at = now
        for name in self.__slots__[2:]:
            setattr(self, name, 0.0)

    def due(self, now):
        return now - self._at >= PERIOD - 1e-9

    def tick(self, totals, now):
        """Recompute if a period is over; ``totals``: the current Totals."""
        elapsed = now - self._at
        if elapsed < PERIOD - 1e-9:
            return False
        last = self._last
        for name in ("xact_count", "query_count", "received", "sent", "errors",
                     "wait_time", "login_count", "assignments"):
            setattr(self, name, (getattr(totals, name) - getattr(last, name)) / elapsed)
        xacts = totals.xact_count - last.xact_count
        queries = totals.query_count - last.query_count
        self.xact_time = (totals.xact_time - last.xact_time) / xacts if xacts > 0 else 0.0
        self.query_time = (totals.query_time - last.query_time) / queries if queries > 0 else 0.0
        self._last = totals.copy()
        self._at = now
        return True
