"""Server connection pool for one (pool, user, server address).

``acquire()`` returns an idle connection synchronously when there is one,
otherwise a Deferred that fires with a connection (or fails with PoolTimeout
after connect_timeout, or ServerConnectionFailed when a connect attempt made
for it failed).

Waiting is first come, first served: the queue is ordered by the time each
wait began (``Waiter.since``), whoever the client is and whatever it will do
with the server (a client whose parameters differ pays for the SET after it
is handed the server; it keeps its turn). Nobody takes an idle connection
while somebody waits. A client moved from another address (a ban, a failed
health check) keeps its place (``requeue``). Login-time needs (``urgent``:
the greeting's parameters) go before the work queue, so a login waits for
one transaction's turn at most. ``release()`` takes back a clean
connection; ``discard()`` closes one. ``reap(now)`` is called by the janitor
tick and applies idle_timeout, server_lifetime and min_pool_size.

The pool knows nothing about sockets: it gets a ``connect()`` callable that
returns a Deferred firing with a logged-in connection object. A connection
object needs: ``close()``, ``created_at``, ``last_used`` and a settable
``pool`` attribute; it reports its own death with ``pool.connection_lost(conn)``.
"""

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger

from pgcat_tw.errors import PoolTimeout, ServerConnectionFailed
from pgcat_tw.stats import Averages, LiveClock, Totals

log = Logger()


class Waiter:
    """A queued checkout: ``ok(conn)`` or ``fail(exception)`` is called once.
    ``since``: when its wait began (its place in the queue); ``deadline``:
    when it fails with a timeout (connect_timeout after it queued on this
    address); ``urgent``: a login-time need (greeting parameters), served
    before the work queue."""

    __slots__ = ("ok", "fail", "since", "deadline", "urgent")

    def __init__(self, ok, fail, since, urgent=False):
        self.ok = ok
        self.fail = fail
        self.since = since
        self.deadline = since
        self.urgent = urgent


class LoginGate:
    """Server logins in flight to one server address, at most ``limit``
    (server_login_limit): the others wait their turn, so a reconnect storm
    (every client back at once, a restarted server) cannot flood
    PostgreSQL with logins."""

    def __init__(self, limit):
        self.limit = limit
        self.in_flight = 0
        self.queue = deque()

    def run(self, login):
        """``login()`` -> a Deferred; started now or when a login ends."""
        if self.in_flight < self.limit:
            self._start(login)
        else:
            self.queue.append(login)

    def _start(self, login):
        self.in_flight += 1
        login().addBoth(self._done)

    def _done(self, result):
        self.in_flight -= 1
        while self.queue and self.in_flight < self.limit:
            self._start(self.queue.popleft())
        return result


class ConnectionPool:
    # What checkout and checkin touch on every transaction are slots
    # (faster on CPython than entries of an instance dict this large); the
    # rest stays in ``__dict__``.
    __slots__ = ("idle", "waiters", "busy", "closed", "_halted", "clock", "round_robin",
                 "stale_before", "server_lifetime", "wait_timeout", "_timer", "pool_size",
                 "connecting", "totals", "reactor", "__dict__")

    def __init__(self, reactor, name, connect, pool_size, min_pool_size=0,
                 connect_timeout=1.0, idle_timeout=600.0, server_lifetime=3600.0,
                 round_robin=True):
        self.reactor = reactor
        # The time of the event being handled (the owner sets the service's
        # stats.EventClock): waits and last use read it, not the reactor.
        self.clock = LiveClock(reactor.seconds)
        self.name = name  # for messages, e.g. 'pool "app" user "bob" at 127.0.0.1:5432'
        self._connect = connect
        self.pool_size = pool_size
        self.min_pool_size = min_pool_size
        self.connect_timeout = connect_timeout
        # How long a client may wait in the queue (query_wait_timeout; by
        # default connect_timeout, PgCat's meaning) and that setting's name.
        self.wait_timeout = connect_timeout
        self.wait_timeout_name = "connect_timeout"
        # Shared by the pools of one server address: server logins in flight
        # (server_login_limit); None: no limit.
        self.login_gate = None
        self.idle_timeout = idle_timeout
        self.server_lifetime = server_lifetime
        self.round_robin = round_robin  # FIFO reuse of idle connections (PgCat default)
        self.idle = deque()
        self.waiters = deque()
        self.busy = set()
        self.connecting = 0
        self.closed = False
        # PAUSE (admin console): no server is handed out or opened; servers
        # that come back are closed; waiters wait without a timeout.
        self.paused = False
        self._halted = False   # closed or paused: release closes what comes back
        # Statistics of this address (stats.Totals): each connection's
        # counters are folded in when it goes away.
        self.totals = Totals()
        self.averages = Averages(reactor.seconds())
        self.last_connect_error = None
        self.on_new_connection = None  # callback(conn) after each successful login
        self.on_connection_lost = None  # callback(conn) once a connection is gone
        self.mirrors = None    # mirror.MirrorSet of this address (None: not mirrored)
        # Seconds an idle connection may rest before it must be health-checked
        # at checkout (healthcheck_delay); None: never. ``take_idle`` leaves a
        # stale connection in place for the caller's slow path. It compares
        # with ``stale_before`` (now - healthcheck_delay, moved by each
        # ``reap`` tick) so the hot path reads no clock.
        self.healthcheck_delay = None
        self.stale_before = float("-inf")
        self.healthcheck_timeout = 1.0
        self.address = None    # config.ServerAddress (set by the owner)
        self.shard = None      # config.Shard
        self.health = None     # balancer.AddressState
        # One timer for the oldest waiter's deadline (waiters are FIFO and share
        # one timeout, so it is always the first to expire), not one per waiter.
        # It is never cancelled when the queue empties (that would churn the
        # reactor's timer heap on every checkout under load): it fires at most
        # once per connect_timeout and reschedules only while waiters remain.
        self._timer = None

    # --- counts ---------------------------------------------------------------

    @property
    def total(self):
        return len(self.idle) + len(self.busy) + self.connecting

    def maxwait(self):
        """Seconds the longest-waiting client has been waiting."""
        if not self.waiters:
            return 0.0
        return self.reactor.seconds() - self._oldest_since()

    def _oldest_since(self):
        # The work queue is in ``since`` order; urgent waiters (at most a
        # few logins) sit before it and may have begun later.
        oldest = None
        for w in self.waiters:
            if oldest is None or w.since < oldest:
                oldest = w.since
            if not w.urgent:
                break
        return oldest

    # --- checkout / checkin ---------------------------------------------------

    @property
    def outstanding(self):
        """Connections in use plus clients queued (least-outstanding-connections)."""
        return len(self.busy) + len(self.waiters)

    def take_idle(self):
        """An idle connection that needs no health check, now, or None
        (none idle, somebody queued before us, or the next one is stale).
        A connection already closing (its server sent an error while idle;
        it leaves the pool at connectionLost) is dropped, never handed out."""
        idle = self.idle
        if not self.waiters and not self.closed:
            rr = self.round_robin
            while idle:
                conn = idle[0] if rr else idle[-1]
                if conn.closed:
                    idle.popleft() if rr else idle.pop()
                    continue
                if conn.last_used < self.stale_before:
                    return None
                idle.popleft() if rr else idle.pop()
                self.busy.add(conn)
                return conn
        return None

    def take_idle_any(self):
        """Like ``take_idle`` but also hands out a stale connection: the
        caller checks ``is_stale(conn)`` and health-checks it."""
        idle = self.idle
        if not self.waiters and not self.closed:
            while idle:
                conn = idle.popleft() if self.round_robin else idle.pop()
                if conn.closed:
                    continue
                self.busy.add(conn)
                return conn
        return None

    def is_stale(self, conn):
        delay = self.healthcheck_delay
        return delay is not None and self.reactor.seconds() - conn.last_used > delay

    def acquire(self, urgent=False):
        """A connection now, or a cancellable Deferred that fires with one.
        ``urgent``: a login-time need, queued before the work queue."""
        if self.closed:
            return defer.fail(ServerConnectionFailed(f"{self.name}: pool is closed"))
        conn = self.take_idle()
        if conn is not None:
            return conn
        d = defer.Deferred(lambda d: self.cancel_wait(w))
        w = Waiter(d.callback, d.errback, 0.0, urgent)
        self.enqueue(w)
        return d

    def wait(self, ok, fail):
        """Queue for the next free connection (the hot path's Deferred-free
        form of acquire). Returns the Waiter, for ``cancel_wait``."""
        return self.enqueue(Waiter(ok, fail, 0.0))

    def enqueue(self, w):
        """``wait`` with a caller-owned Waiter (a client reuses one for all
        its checkouts; it is in at most one queue at a time). Its wait
        begins now."""
        w.since = now = self.clock.now
        w.deadline = now + self.wait_timeout
        if w.urgent:
            return self._insert(w)
        if self.closed:
            w.fail(ServerConnectionFailed(f"{self.name}: pool is closed"))
            return w
        waiters = self.waiters
        waiters.append(w)
        if self._timer is None:
            self._timer = self.reactor.callLater(self.wait_timeout, self._expire)
        # (Under load every server is busy: the first test ends it.)
        if len(self.busy) < self.pool_size and len(waiters) > self.connecting and \
                len(self.idle) + len(self.busy) + self.connecting < self.pool_size:
            self._maybe_connect()
        return w

    def requeue(self, w):
        """Queue a Waiter whose wait began earlier (``w.since``, kept): a
        client moved here from another address goes before everybody who
        began waiting after it. Its connect_timeout starts again here."""
        w.deadline = self.reactor.seconds() + self.wait_timeout
        return self._insert(w)

    def _insert(self, w):
        """Slow path of enqueue: put ``w`` in its place (urgent ones first,
        among themselves and the rest by ``since``)."""
        if self.closed:
            w.fail(ServerConnectionFailed(f"{self.name}: pool is closed"))
            return w
        waiters = self.waiters
        i = len(waiters)
        if w.urgent:
            i = 0
            while i < len(waiters) and waiters[i].urgent:
                i += 1
        else:
            while i > 0 and not waiters[i - 1].urgent and waiters[i - 1].since > w.since:
                i -= 1
        waiters.insert(i, w)
        if self._timer is None:
            # (A deadline set now is the latest: a running timer is earlier.)
            self._timer = self.reactor.callLater(self.wait_timeout, self._expire)
        self._maybe_connect()
        return w

    def release(self, conn, used=True):
        """Take back a clean, idle connection. ``used=False`` (the pooler's
        own health checks) leaves ``last_used``, so idle_timeout still
        applies. The first waiter, if any, gets it straight away."""
        busy = self.busy
        if conn not in busy:
            return
        if getattr(conn, "closed", False):
            busy.discard(conn)
            self._maybe_connect()
            return
        if self._halted:
            busy.discard(conn)
            conn.close()
            return
        waiters = self.waiters
        if waiters:
            # A server past server_lifetime still serves a waiting client:
            # it is retired when it comes back with nobody queued. (Its
            # last_used, read only while it is idle, is set then too.)
            waiters.popleft().ok(conn)  # stays in busy
            return
        if used:
            conn.last_used = self.clock.now
        if self.server_lifetime and conn.last_used - conn.created_at >= self.server_lifetime:
            busy.discard(conn)
            conn.close()
            self._maybe_connect()
            return
        busy.discard(conn)
        self.idle.append(conn)

    def current_totals(self):
        """This address's statistics with its open connections' counters
        added (stats.Totals)."""
        t = self.totals.copy()
        for conn in list(self.idle) + list(self.busy):
            ss = getattr(conn, "scanner", None)
            if ss is not None:
                t.add_connection(ss)
        return t

    def discard(self, conn):
        """Close a connection that must not be reused (dirty, broken)."""
        self._forget(conn)
        conn.close()
        self._maybe_connect()

    def connection_lost(self, conn):
        """A connection of this pool closed (called once per connection):
        forget it and keep its statistics."""
        self._forget(conn)
        ss = getattr(conn, "scanner", None)
        if ss is not None:
            self.totals.add_connection(ss)
        if self.on_connection_lost is not None:
            self.on_connection_lost(conn)
        self._maybe_connect()

    def _forget(self, conn):
        self.busy.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def _hand_out(self, conn):
        waiters = self.waiters
        if waiters:
            w = waiters.popleft()
            self.busy.add(conn)
            w.ok(conn)
            return
        self.idle.append(conn)

    # --- waiters --------------------------------------------------------------

    def _stop_timer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def cancel_wait(self, w):
        try:
            self.waiters.remove(w)
        except ValueError:
            pass

    def _expire(self):
        """Fail every waiter whose connect_timeout has passed (at most once
        per connect_timeout while clients wait: a scan is cheap then)."""
        self._timer = None
        if self.paused:
            return  # resume() gives every waiter a new deadline
        now = self.reactor.seconds()
        limit = now + 1e-9
        waiters = self.waiters
        expired = [w for w in waiters if w.deadline <= limit]
        if expired:
            self.waiters = waiters = deque(w for w in waiters if w.deadline > limit)
            for w in expired:
                self._waiter_timeout(w)
        if waiters and self._timer is None:
            first = min(w.deadline for w in waiters)
            self._timer = self.reactor.callLater(max(0.0, first - now), self._expire)

    def fail_waiters(self, err):
        """Fail every queued checkout with ``err`` (the address was banned:
        its clients go to the next candidate at once)."""
        waiters = list(self.waiters)
        self.waiters.clear()
        for w in waiters:
            w.fail(err)

    def adopt(self, conn):
        """Take a logged-in connection made outside the pool (a health
        probe) if there is room; otherwise close it."""
        if self._halted or self.total >= self.pool_size:
            conn.close()
            return
        conn.pool = self
        conn.last_used = self.reactor.seconds()
        self._hand_out(conn)

    def connect_extra(self):
        """A new connection outside the pool's accounting (health probes):
        a Deferred firing with it."""
        return defer.maybeDeferred(self._connect)

    def _waiter_timeout(self, w):
        if self.connecting and len(self.busy) < self.pool_size:
            # A connect attempt made for this waiter is still running: the
            # server is slow to answer or unreachable, not busy.
            err = ServerConnectionFailed(
                f"{self.name}: could not connect to the server within connect_timeout "
                f"({self.connect_timeout * 1000:.0f} ms)"
            )
        elif self.last_connect_error is not None and not self.busy and not self.idle:
            err = ServerConnectionFailed(
                f"{self.name}: no server connection could be made within "
                f"{self.connect_timeout * 1000:.0f} ms: {self.last_connect_error}"
            )
        else:
            what = self.wait_timeout_name
            err = PoolTimeout(
                f"{self.name}: no server connection became free within {what} "
                f"({self.wait_timeout * 1000:.0f} ms); all {self.pool_size} "
                f"connections of the pool are in use (pool exhausted)",
                hint=f"raise pool_size or {what}, or make transactions shorter",
            )
        w.fail(err)

    # --- growth -----------------------------------------------------------------

    def _maybe_connect(self):
        if self._halted:
            return
        while len(self.waiters) > self.connecting and self.total < self.pool_size:
            self._start_connect()

    def _start_connect(self):
        self.connecting += 1
        gate = self.login_gate
        if gate is None:
            self._login()
        else:
            gate.run(self._login)

    def _login(self):
        d = defer.maybeDeferred(self._connect)
        d.addCallbacks(self._connected, self._connect_failed)
        return d

    def _connected(self, conn):
        self.connecting -= 1
        self.last_connect_error = None
        conn.pool = self
        if self._halted:
            conn.close()
            return
        if self.on_new_connection is not None:
            self.on_new_connection(conn)
        self._hand_out(conn)

    def _connect_failed(self, failure):
        self.connecting -= 1
        reason = failure.value
        msg = getattr(reason, "message", None) or str(reason) or reason.__class__.__name__
        self.last_connect_error = msg
        log.warn("{pool}: server connection failed: {reason}", pool=self.name, reason=msg)
        # The oldest waiter beyond what the remaining attempts can serve learns
        # why at once instead of waiting for its timeout; when no connection
        # is left or being made, nobody can be served: all of them learn it.
        if len(self.waiters) > self.connecting and not self.idle:
            if isinstance(reason, ServerConnectionFailed) or getattr(reason, "sqlstate", None):
                err = reason
            else:
                err = ServerConnectionFailed(f"{self.name}: could not connect to server: {msg}")
            if not self.busy and not self.connecting:
                self.fail_waiters(err)
            else:
                self.waiters.popleft().fail(err)

    # --- janitor ------------------------------------------------------------------

    def reap(self, now):
        """Close idle connections past idle_timeout / server_lifetime and keep
        min_pool_size connections open. Returns the number closed."""
        if self.healthcheck_delay is not None:
            self.stale_before = now - self.healthcheck_delay
        if self.averages.due(now):
            self.averages.tick(self.current_totals(), now)
        closed = 0
        keep = deque()
        open_count = self.total
        while self.idle:
            conn = self.idle.popleft()
            too_old = self.server_lifetime and now - conn.created_at >= self.server_lifetime
            too_idle = (self.idle_timeout and now - conn.last_used >= self.idle_timeout
                        and open_count - closed > self.min_pool_size)
            if too_old or too_idle:
                conn.close()
                closed += 1
            else:
                keep.append(conn)
        self.idle = keep
        if not self._halted:
            while self.total < min(self.min_pool_size, self.pool_size):
                self._start_connect()
        return closed

    # --- PAUSE / RESUME ----------------------------------------------------------

    def pause(self):
        """Hand out nothing, open nothing; close the idle servers now and the
        busy ones as they come back. Queued and new clients wait (their
        connect_timeout is suspended) until ``resume``."""
        if self.closed or self.paused:
            return
        self.paused = self._halted = True
        self._stop_timer()
        while self.idle:
            self.idle.popleft().close()

    @property
    def drained(self):
        """Paused and no server connection left in use."""
        return self.paused and not self.busy

    def resume(self):
        if not self.paused:
            return
        self.paused = False
        self._halted = self.closed
        now = self.reactor.seconds()
        for w in self.waiters:
            w.deadline = now + self.wait_timeout
        if self.waiters and self._timer is None:
            self._timer = self.reactor.callLater(self.wait_timeout, self._expire)
        self._maybe_connect()

    def close(self):
        self.closed = self._halted = True
        self._stop_timer()
        while self.waiters:
            w = self.waiters.popleft()
            w.fail(ServerConnectionFailed(f"{self.name}: pool is closed"))
        while self.idle:
            self.idle.popleft().close()
