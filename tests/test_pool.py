"""Tests for pgcat_tw.pool.ConnectionPool on a Clock with a fake connector."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw.errors import AuthenticationFailed, PoolTimeout, ServerConnectionFailed
from pgcat_tw.pool import ConnectionPool

NAME = 'pool "app" user "bob" at 127.0.0.1:5432'


class FakeConn:
    def __init__(self, clock, n):
        self.n = n
        self.closed = False
        self.created_at = clock.seconds()
        self.last_used = clock.seconds()
        self.pool = None
        self.close_calls = 0

    def close(self):
        self.closed = True
        self.close_calls += 1

    def __repr__(self):
        return f"<FakeConn {self.n}{' closed' if self.closed else ''}>"


class Connector:
    """connect() callable whose attempts the test completes by hand."""

    def __init__(self, clock):
        self.clock = clock
        self.attempts = []  # Deferreds, in call order
        self.made = []
        self.count = 0

    def __call__(self):
        d = defer.Deferred()
        self.attempts.append(d)
        return d

    def pending(self):
        return [d for d in self.attempts if not d.called]

    def succeed(self, i=None):
        """Complete attempt ``i`` (the oldest pending one by default)."""
        d = self.pending()[0] if i is None else self.attempts[i]
        self.count += 1
        conn = FakeConn(self.clock, self.count)
        self.made.append(conn)
        d.callback(conn)
        return conn

    def fail(self, exc, i=None):
        d = self.pending()[0] if i is None else self.attempts[i]
        d.errback(exc)


class Result:
    """Collects the outcome of a Deferred."""

    def __init__(self, d):
        self.value = None
        self.failure = None
        d.addCallbacks(self._ok, self._err)

    def _ok(self, v):
        self.value = v

    def _err(self, f):
        self.failure = f

    @property
    def done(self):
        return self.value is not None or self.failure is not None


class PoolTestBase(SynchronousTestCase):
    def make(self, pool_size=3, **kw):
        self.clock = Clock()
        self.clock.advance(1000)
        self.connector = Connector(self.clock)
        kw.setdefault("connect_timeout", 1.0)
        self.pool = ConnectionPool(self.clock, NAME, self.connector, pool_size, **kw)
        return self.pool

    def acquire(self):
        r = self.pool.acquire()
        self.assertIsInstance(r, defer.Deferred)
        return Result(r)

    def fill_idle(self, n):
        """Open n connections and return them all to the pool (idle)."""
        waiters = [self.acquire() for _ in range(n)]
        for _ in range(n):
            self.connector.succeed()
        conns = [w.value for w in waiters]
        for c in conns:
            self.pool.release(c)
        return conns

    def no_timers(self):
        """No timer is left that could fail anybody: the pool's expiry timer
        may still be pending (it is not cancelled when the queue empties),
        but once it fires with nobody waiting it does not come back."""
        pending = [c for c in self.clock.getDelayedCalls() if c.active()]
        self.assertLessEqual(len(pending), 1, pending)
        if pending:
            waiting = len(self.pool.waiters)
            self.clock.advance(pending[0].getTime() - self.clock.seconds())
            self.assertEqual(len(self.pool.waiters), waiting)
            if not self.pool.waiters:
                self.assertEqual(
                    [c for c in self.clock.getDelayedCalls() if c.active()], [])


class AcquireTests(PoolTestBase):
    def test_synchronous_when_idle(self):
        pool = self.make()
        (c1,) = self.fill_idle(1)
        r = pool.acquire()
        self.assertNotIsInstance(r, defer.Deferred)
        self.assertIs(r, c1)
        self.assertIn(c1, pool.busy)
        self.assertEqual(len(pool.idle), 0)
        self.assertIs(c1.pool, pool)
        self.no_timers()

    def test_closing_idle_connection_never_handed_out(self):
        # A server that sent an error while idle is closing: it stays in the
        # idle deque until its connectionLost, but nobody may get it.
        for round_robin in (True, False):
            pool = self.make(round_robin=round_robin)
            c1, c2 = self.fill_idle(2)
            first = c1 if round_robin else c2
            first.close()
            self.assertIs(pool.take_idle(), c2 if round_robin else c1)
            self.assertNotIn(first, pool.idle)
            pool.release(c2 if round_robin else c1)
            (c2 if round_robin else c1).close()
            self.assertIsNone(pool.take_idle_any())
            self.assertEqual(len(pool.idle), 0)

    def test_connect_when_empty(self):
        pool = self.make()
        w = self.acquire()
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertFalse(w.done)
        self.assertEqual(pool.total, 1)
        conn = self.connector.succeed()
        self.assertIs(w.value, conn)
        self.assertIs(conn.pool, pool)
        self.assertIn(conn, pool.busy)
        self.assertEqual(pool.connecting, 0)
        self.no_timers()

    def test_on_new_connection(self):
        pool = self.make()
        seen = []
        pool.on_new_connection = seen.append
        w = self.acquire()
        conn = self.connector.succeed()
        self.assertEqual(seen, [conn])
        self.assertIs(w.value, conn)

    def test_waiters_fifo(self):
        pool = self.make(pool_size=1)
        waiters = [self.acquire() for _ in range(4)]
        self.assertEqual(len(self.connector.attempts), 1)
        conn = self.connector.succeed()
        self.assertIs(waiters[0].value, conn)
        for i in range(1, 4):
            self.assertFalse(waiters[i].done)
            pool.release(conn)
            self.assertIs(waiters[i].value, conn, i)
            for later in waiters[i + 1:]:
                self.assertFalse(later.done)
        pool.release(conn)
        self.assertEqual(list(pool.idle), [conn])
        self.no_timers()

    def test_new_acquire_queues_behind_waiters(self):
        pool = self.make(pool_size=1)
        w1 = self.acquire()
        w2 = self.acquire()
        conn = self.connector.succeed()
        self.assertIs(w1.value, conn)
        pool.release(conn)
        self.assertIs(w2.value, conn)
        w3 = self.acquire()
        self.assertFalse(w3.done)
        pool.release(conn)
        self.assertIs(w3.value, conn)

    def test_round_robin_fifo(self):
        pool = self.make(round_robin=True)
        c1, c2, c3 = self.fill_idle(3)
        self.assertEqual(list(pool.idle), [c1, c2, c3])
        self.assertIs(pool.acquire(), c1)
        self.assertIs(pool.acquire(), c2)
        pool.release(c1)
        self.assertIs(pool.acquire(), c3)
        self.assertIs(pool.acquire(), c1)

    def test_lifo(self):
        pool = self.make(round_robin=False)
        c1, c2, c3 = self.fill_idle(3)
        self.assertIs(pool.acquire(), c3)
        self.assertIs(pool.acquire(), c2)
        pool.release(c3)
        self.assertIs(pool.acquire(), c3)
        self.assertIs(pool.acquire(), c1)

    def test_pool_size_respected(self):
        pool = self.make(pool_size=2)
        waiters = [self.acquire() for _ in range(5)]
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertEqual(pool.total, 2)
        c1 = self.connector.succeed()
        c2 = self.connector.succeed()
        self.assertEqual([w.value for w in waiters[:2]], [c1, c2])
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertEqual(pool.total, 2)
        pool.release(c2)
        self.assertIs(waiters[2].value, c2)
        self.assertEqual(len(self.connector.attempts), 2)
        # More acquires never exceed the size either.
        more = [self.acquire() for _ in range(3)]
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertEqual(pool.total, 2)
        self.assertFalse(any(w.done for w in more))

    def test_connects_only_as_many_as_waiters(self):
        pool = self.make(pool_size=10)
        self.acquire()
        self.acquire()
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertEqual(pool.connecting, 2)

    def test_acquire_closed_pool(self):
        pool = self.make()
        pool.close()
        r = pool.acquire()
        self.assertIsInstance(r, defer.Deferred)
        f = self.failureResultOf(r, ServerConnectionFailed)
        self.assertIn(NAME, f.value.message)
        self.assertEqual(self.connector.attempts, [])


class WaiterFailureTests(PoolTestBase):
    def test_timeout(self):
        pool = self.make(pool_size=1, connect_timeout=2.5)
        w0 = self.acquire()
        self.connector.succeed()  # the only connection is busy
        self.assertIsNotNone(w0.value)
        w = self.acquire()
        self.clock.advance(2.4)
        self.assertFalse(w.done)
        self.clock.advance(0.1)
        self.assertTrue(w.done)
        err = w.failure.value
        self.assertIsInstance(err, PoolTimeout)
        self.assertEqual(err.sqlstate, "53300")
        self.assertIn(NAME, err.message)
        self.assertIn("exhausted", err.message)
        self.assertIn("2500 ms", err.message)
        self.assertEqual(len(pool.waiters), 0)
        self.assertEqual(pool.maxwait(), 0.0)
        self.no_timers()

    def test_timeouts_staggered(self):
        pool = self.make(pool_size=1, connect_timeout=1.0)
        self.acquire()
        self.connector.succeed()
        w1 = self.acquire()
        self.clock.advance(0.5)
        w2 = self.acquire()
        self.clock.advance(0.5)
        self.assertIsInstance(w1.failure.value, PoolTimeout)
        self.assertFalse(w2.done)
        self.clock.advance(0.4)
        self.assertFalse(w2.done)
        self.clock.advance(0.1)
        self.assertIsInstance(w2.failure.value, PoolTimeout)
        self.no_timers()

    def test_served_waiter_does_not_time_out(self):
        pool = self.make(pool_size=1)
        w0 = self.acquire()
        conn = self.connector.succeed()
        w1 = self.acquire()
        w2 = self.acquire()
        self.clock.advance(0.5)
        pool.release(conn)
        self.assertIs(w1.value, conn)
        self.clock.advance(0.6)  # w1's deadline passes: w2 (queued with it) expires
        self.assertIs(w1.value, conn)
        self.assertIsNone(w1.failure)
        self.assertIsInstance(w2.failure.value, PoolTimeout)
        self.assertIs(w0.value, conn)
        self.no_timers()

    def test_connect_failure(self):
        pool = self.make(pool_size=2)
        w = self.acquire()
        self.connector.fail(ConnectionRefusedError("Connection refused"))
        self.assertTrue(w.done)
        err = w.failure.value
        self.assertIsInstance(err, ServerConnectionFailed)
        self.assertEqual(err.sqlstate, "08006")
        self.assertIn("Connection refused", err.message)
        self.assertIn(NAME, err.message)
        self.assertEqual(pool.connecting, 0)
        self.assertEqual(pool.total, 0)
        self.assertEqual(len(pool.waiters), 0)
        self.no_timers()

    def test_connect_raising_synchronously(self):
        self.make(pool_size=2)

        def boom():
            raise OSError("Network is unreachable")

        self.pool._connect = boom
        d = self.pool.acquire()
        f = self.failureResultOf(d, ServerConnectionFailed)
        self.assertIn("Network is unreachable", f.value.message)
        self.assertEqual(self.pool.connecting, 0)
        self.assertEqual(len(self.pool.waiters), 0)
        self.no_timers()

    def test_connect_failure_pg_error_passed_through(self):
        self.make()
        w = self.acquire()
        auth = AuthenticationFailed('password authentication failed for user "bob"')
        self.connector.fail(auth)
        self.assertIs(w.failure.value, auth)

    def test_connect_failure_fails_one_waiter_per_attempt(self):
        pool = self.make(pool_size=2)
        w1, w2 = self.acquire(), self.acquire()
        self.connector.fail(OSError("no route to host"))
        self.assertIsInstance(w1.failure.value, ServerConnectionFailed)
        self.assertFalse(w2.done)
        conn = self.connector.succeed()
        self.assertIs(w2.value, conn)
        self.assertIn(conn, pool.busy)

    def test_timeout_after_connect_failures_names_reason(self):
        pool = self.make(pool_size=1)
        w1, w2 = self.acquire(), self.acquire()
        self.connector.fail(OSError("no route to host"))
        self.assertIsInstance(w1.failure.value, ServerConnectionFailed)
        self.clock.advance(1.0)
        err = w2.failure.value
        self.assertIsInstance(err, ServerConnectionFailed)
        self.assertIn("no route to host", err.message)
        self.assertEqual(len(pool.waiters), 0)

    def test_cancel_waiter(self):
        pool = self.make(pool_size=1)
        self.acquire()
        conn = self.connector.succeed()
        d = pool.acquire()
        w = Result(d)
        self.assertEqual(len(pool.waiters), 1)
        d.cancel()
        self.assertIsInstance(w.failure.value, defer.CancelledError)
        self.assertEqual(len(pool.waiters), 0)
        self.no_timers()
        # The connection goes back to idle, not to the cancelled waiter.
        pool.release(conn)
        self.assertEqual(list(pool.idle), [conn])
        self.clock.advance(10)  # nothing fires later

    def test_cancel_one_of_several(self):
        pool = self.make(pool_size=1)
        self.acquire()
        conn = self.connector.succeed()
        d1, d2, d3 = pool.acquire(), pool.acquire(), pool.acquire()
        r1, r2, r3 = Result(d1), Result(d2), Result(d3)
        d2.cancel()
        self.assertEqual(len(pool.waiters), 2)
        pool.release(conn)
        self.assertIs(r1.value, conn)
        pool.release(conn)
        self.assertIs(r3.value, conn)
        self.assertIsInstance(r2.failure.value, defer.CancelledError)
        self.no_timers()

    def test_cancel_with_connect_in_flight(self):
        pool = self.make(pool_size=1)
        d = pool.acquire()
        r = Result(d)
        d.cancel()
        self.assertIsInstance(r.failure.value, defer.CancelledError)
        self.assertEqual(len(pool.waiters), 0)
        self.no_timers()
        conn = self.connector.succeed()
        self.assertEqual(list(pool.idle), [conn])
        self.assertIs(pool.acquire(), conn)

    def test_maxwait(self):
        pool = self.make(pool_size=1, connect_timeout=10)
        self.assertEqual(pool.maxwait(), 0.0)
        self.acquire()
        self.assertEqual(pool.maxwait(), 0.0)
        self.clock.advance(1.5)
        self.assertAlmostEqual(pool.maxwait(), 1.5)
        self.acquire()
        self.clock.advance(2)
        self.assertAlmostEqual(pool.maxwait(), 3.5)
        self.connector.succeed()  # first waiter served: the second is the oldest
        self.assertAlmostEqual(pool.maxwait(), 2.0)


class ReleaseTests(PoolTestBase):
    def test_release_to_first_waiter(self):
        pool = self.make(pool_size=1)
        self.acquire()
        conn = self.connector.succeed()
        w = self.acquire()
        before = conn.last_used
        self.clock.advance(0.3)
        pool.release(conn)
        self.assertIs(w.value, conn)
        self.assertIn(conn, pool.busy)
        self.assertEqual(len(pool.idle), 0)
        # last_used (read only while idle) is set when it goes idle.
        self.assertEqual(conn.last_used, before)
        self.clock.advance(0.2)
        pool.release(conn)
        self.assertEqual(pool.idle[-1], conn)
        self.assertEqual(conn.last_used, self.clock.seconds())
        self.no_timers()

    def test_release_sets_last_used(self):
        pool = self.make()
        (conn,) = self.fill_idle(1)
        pool.acquire()
        self.clock.advance(7)
        pool.release(conn)
        self.assertEqual(conn.last_used, self.clock.seconds())
        self.assertEqual(list(pool.idle), [conn])

    def test_release_unknown_ignored(self):
        pool = self.make()
        stranger = FakeConn(self.clock, 99)
        pool.release(stranger)
        self.assertEqual(len(pool.idle), 0)
        (conn,) = self.fill_idle(1)
        pool.release(conn)  # already idle: released twice
        self.assertEqual(list(pool.idle), [conn])

    def test_release_closed_connection(self):
        pool = self.make(pool_size=1)
        self.acquire()
        conn = self.connector.succeed()
        w = self.acquire()
        conn.closed = True
        pool.release(conn)
        self.assertNotIn(conn, pool.idle)
        self.assertNotIn(conn, pool.busy)
        self.assertFalse(w.done)
        # room was made: a new connect for the waiter
        self.assertEqual(len(self.connector.attempts), 2)
        conn2 = self.connector.succeed()
        self.assertIs(w.value, conn2)

    def test_release_closed_no_waiters(self):
        pool = self.make()
        w = self.acquire()
        conn = self.connector.succeed()
        self.assertIs(w.value, conn)
        conn.close()
        pool.release(conn)
        self.assertEqual(len(pool.idle), 0)
        self.assertEqual(pool.total, 0)
        self.assertEqual(len(self.connector.attempts), 1)

    def test_release_past_lifetime_closes(self):
        pool = self.make(server_lifetime=100)
        w = self.acquire()
        conn = self.connector.succeed()
        self.assertIs(w.value, conn)
        self.clock.advance(100)
        pool.release(conn)
        self.assertTrue(conn.closed)
        self.assertEqual(len(pool.idle), 0)
        self.assertEqual(pool.total, 0)

    def test_discard_makes_room_for_waiter(self):
        pool = self.make(pool_size=1)
        self.acquire()
        conn = self.connector.succeed()
        w = self.acquire()
        self.assertEqual(len(self.connector.attempts), 1)
        pool.discard(conn)
        self.assertTrue(conn.closed)
        self.assertEqual(len(self.connector.attempts), 2)
        conn2 = self.connector.succeed()
        self.assertIs(w.value, conn2)
        self.assertEqual(pool.busy, {conn2})

    def test_discard_without_waiters(self):
        pool = self.make(pool_size=1)
        (conn,) = self.fill_idle(1)
        pool.discard(conn)  # also works on an idle connection
        self.assertTrue(conn.closed)
        self.assertEqual(len(pool.idle), 0)
        self.assertEqual(pool.total, 0)
        self.assertEqual(len(self.connector.attempts), 1)

    def test_connection_lost_makes_room(self):
        pool = self.make(pool_size=1)
        self.acquire()
        conn = self.connector.succeed()
        w = self.acquire()
        conn.closed = True
        pool.connection_lost(conn)
        self.assertNotIn(conn, pool.busy)
        self.assertEqual(conn.close_calls, 0)
        self.assertEqual(len(self.connector.attempts), 2)
        conn2 = self.connector.succeed()
        self.assertIs(w.value, conn2)

    def test_connection_lost_idle(self):
        pool = self.make()
        c1, c2 = self.fill_idle(2)
        pool.connection_lost(c1)
        self.assertEqual(list(pool.idle), [c2])
        self.assertEqual(pool.total, 1)
        self.assertIs(pool.acquire(), c2)


class ReapTests(PoolTestBase):
    def test_idle_timeout(self):
        pool = self.make(pool_size=5, idle_timeout=60)
        conns = self.fill_idle(3)
        self.clock.advance(59)
        self.assertEqual(pool.reap(self.clock.seconds()), 0)
        self.assertEqual(len(pool.idle), 3)
        self.clock.advance(1)
        self.assertEqual(pool.reap(self.clock.seconds()), 3)
        self.assertTrue(all(c.closed for c in conns))
        self.assertEqual(pool.total, 0)

    def test_idle_timeout_keeps_recently_used(self):
        pool = self.make(pool_size=5, idle_timeout=60)
        c1, c2 = self.fill_idle(2)
        self.clock.advance(30)
        pool.acquire()  # c1
        pool.release(c1)
        self.clock.advance(30)
        self.assertEqual(pool.reap(self.clock.seconds()), 1)
        self.assertTrue(c2.closed)
        self.assertFalse(c1.closed)
        self.assertEqual(list(pool.idle), [c1])

    def test_idle_timeout_keeps_min_pool_size(self):
        pool = self.make(pool_size=5, min_pool_size=2, idle_timeout=60)
        conns = self.fill_idle(4)
        self.clock.advance(120)
        self.assertEqual(pool.reap(self.clock.seconds()), 2)
        self.assertEqual(sum(c.closed for c in conns), 2)
        self.assertEqual(len(pool.idle), 2)
        self.assertEqual(pool.total, 2)
        self.assertEqual(len(self.connector.pending()), 0)

    def test_idle_timeout_min_counts_busy(self):
        pool = self.make(pool_size=5, min_pool_size=2, idle_timeout=60)
        c1, c2, c3 = self.fill_idle(3)
        busy = pool.acquire()
        self.clock.advance(120)
        pool.reap(self.clock.seconds())
        self.assertEqual(pool.total, 2)
        self.assertFalse(busy.closed)
        self.assertEqual(len(pool.idle), 1)

    def test_release_past_lifetime_with_waiters(self):
        # An old connection still serves a waiter rather than making it wait
        # for a new login; reap() retires it once it is idle.
        pool = self.make(pool_size=1, idle_timeout=0, server_lifetime=100,
                         connect_timeout=1000)
        self.acquire()
        conn = self.connector.succeed()
        w = self.acquire()
        self.clock.advance(100)
        pool.release(conn)
        self.assertIs(w.value, conn)
        self.assertFalse(conn.closed)
        pool.release(conn)
        self.assertTrue(conn.closed)
        self.assertEqual(pool.total, 0)

    def test_server_lifetime_reap(self):
        pool = self.make(pool_size=5, idle_timeout=0, server_lifetime=3600)
        old = self.fill_idle(2)
        self.clock.advance(1800)
        w = [pool.acquire(), pool.acquire(), self.acquire()]
        young = self.connector.succeed()
        pool.release(w[0])
        pool.release(w[1])
        pool.release(young)
        self.clock.advance(1799)
        self.assertEqual(pool.reap(self.clock.seconds()), 0)
        self.clock.advance(1)
        self.assertEqual(pool.reap(self.clock.seconds()), 2)
        self.assertTrue(all(c.closed for c in old))
        self.assertFalse(young.closed)
        self.assertEqual(list(pool.idle), [young])

    def test_server_lifetime_ignores_min_pool_size(self):
        pool = self.make(pool_size=5, min_pool_size=2, idle_timeout=0, server_lifetime=100)
        old = self.fill_idle(2)
        self.clock.advance(100)
        self.assertEqual(pool.reap(self.clock.seconds()), 2)
        self.assertTrue(all(c.closed for c in old))
        # ...and opens replacements for min_pool_size.
        self.assertEqual(len(self.connector.pending()), 2)
        self.assertEqual(pool.total, 2)

    def test_min_pool_size_opens(self):
        pool = self.make(pool_size=5, min_pool_size=3)
        pool.reap(self.clock.seconds())
        self.assertEqual(len(self.connector.attempts), 3)
        self.assertEqual(pool.total, 3)
        pool.reap(self.clock.seconds())  # in-flight connects count
        self.assertEqual(len(self.connector.attempts), 3)
        conns = [self.connector.succeed() for _ in range(3)]
        self.assertEqual(list(pool.idle), conns)
        self.assertEqual(len(pool.busy), 0)
        pool.reap(self.clock.seconds())
        self.assertEqual(len(self.connector.attempts), 3)

    def test_min_pool_size_capped_by_pool_size(self):
        pool = self.make(pool_size=2, min_pool_size=5)
        pool.reap(self.clock.seconds())
        self.assertEqual(len(self.connector.attempts), 2)

    def test_min_pool_size_tops_up(self):
        pool = self.make(pool_size=5, min_pool_size=2)
        busy = self.acquire()
        self.connector.succeed()
        self.assertIsNotNone(busy.value)
        pool.reap(self.clock.seconds())
        self.assertEqual(len(self.connector.attempts), 2)

    def test_min_connection_goes_to_waiter(self):
        pool = self.make(pool_size=2, min_pool_size=2)
        pool.reap(self.clock.seconds())
        w = self.acquire()
        self.assertEqual(len(self.connector.attempts), 2)  # no extra connect
        conn = self.connector.succeed()
        self.assertIs(w.value, conn)

    def test_reap_closed_pool_does_not_connect(self):
        pool = self.make(pool_size=5, min_pool_size=2)
        pool.close()
        pool.reap(self.clock.seconds())
        self.assertEqual(self.connector.attempts, [])


class CloseTests(PoolTestBase):
    def test_close_fails_waiters(self):
        pool = self.make(pool_size=2)
        (c1,) = self.fill_idle(1)
        busy = pool.acquire()
        self.assertIs(busy, c1)
        w1, w2 = self.acquire(), self.acquire()
        self.assertEqual(len(self.connector.pending()), 1)
        pool.close()
        for w in (w1, w2):
            self.assertIsInstance(w.failure.value, ServerConnectionFailed)
            self.assertIn("closed", w.failure.value.message)
            self.assertIn(NAME, w.failure.value.message)
        self.assertFalse(busy.closed)
        self.assertEqual(len(pool.waiters), 0)
        self.no_timers()
        pool.release(busy)  # comes back after the close: closed, not kept
        self.assertTrue(busy.closed)
        self.assertEqual(len(pool.idle), 0)
        late = self.connector.succeed()  # the in-flight connect
        self.assertTrue(late.closed)
        self.assertEqual(len(pool.idle), 0)

    def test_close_closes_idle(self):
        pool = self.make(pool_size=3)
        conns = self.fill_idle(3)
        busy = pool.acquire()
        pool.close()
        self.assertEqual([c.closed for c in conns if c is not busy], [True, True])
        self.assertFalse(busy.closed)
        self.assertEqual(len(pool.idle), 0)
        self.assertTrue(pool.closed)

    def test_connect_completing_after_close(self):
        pool = self.make()
        w = self.acquire()
        pool.close()
        self.assertIsInstance(w.failure.value, ServerConnectionFailed)
        conn = self.connector.succeed()
        self.assertTrue(conn.closed)
        self.assertEqual(len(pool.idle), 0)
        self.assertEqual(pool.connecting, 0)

    def test_discard_after_close_does_not_connect(self):
        pool = self.make(pool_size=1)
        w0 = self.acquire()
        conn = self.connector.succeed()
        self.assertIs(w0.value, conn)
        pool.close()
        pool.discard(conn)
        self.assertTrue(conn.closed)
        self.assertEqual(len(self.connector.attempts), 1)


class LoginGateTests(SynchronousTestCase):
    """server_login_limit: logins in flight to one address are capped,
    across the pools that share it; the others start as logins end."""

    def test_logins_in_flight_are_capped(self):
        from pgcat_tw.pool import LoginGate

        clock = Clock()
        connector = Connector(clock)
        gate = LoginGate(2)
        pools = []
        for name in ("a", "b"):
            p = ConnectionPool(clock, name, connector, pool_size=5, connect_timeout=5.0)
            p.login_gate = gate
            pools.append(p)
        results = [Result(p.acquire()) for p in pools for _ in range(3)]
        self.assertEqual(len(connector.pending()), 2)        # not 6
        self.assertEqual(gate.in_flight, 2)
        self.assertEqual(len(gate.queue), 4)
        connector.succeed()
        self.assertEqual(len(connector.pending()), 2)        # the next one started
        connector.fail(ServerConnectionFailed("refused"))
        self.assertEqual(len(connector.pending()), 2)
        for _ in range(4):
            connector.succeed()
        self.assertEqual(gate.in_flight, 0)
        self.assertEqual(sum(1 for r in results if r.value is not None), 5)
