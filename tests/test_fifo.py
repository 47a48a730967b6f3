"""First come, first served, on a Clock (issue 13, part A).

A pool hands its connections to waiting clients in the order their waits
began, whatever the clients are: a client whose tracked parameters differ
from the server's pays for the SET once it holds the server, it does not
lose its turn; login-time needs (the greeting's parameters) go before the
work queue; a client moved from another address keeps its place.
"""

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw.backend import ServerConnection
from pgcat_tw.cancel import CancelKeys
from pgcat_tw.cluster import Cluster, set_parameter_sql
from pgcat_tw.config import parse
from pgcat_tw.errors import PoolTimeout
from pgcat_tw.frontend import ClientFactory, Session
from pgcat_tw.pool import ConnectionPool, Waiter
from pgcat_tw.protocol import messages as m
from tests.test_handoff import CONFIG, LoggedTransport
from tests.test_pool import Connector, Result

BASE = {"client_encoding": "UTF8", "DateStyle": "ISO, MDY", "TimeZone": "UTC",
        "standard_conforming_strings": "on", "application_name": "pgbench"}


class PoolOrderTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.connector = Connector(self.clock)
        self.pool = ConnectionPool(self.clock, "p", self.connector, pool_size=1,
                                   connect_timeout=5.0)
        self.served = []
        d = self.pool.acquire()
        self.connector.succeed()
        self.conn = Result(d).value
        self.assertIsNotNone(self.conn)

    def waiter(self, name, urgent=False):
        def ok(conn):
            self.served.append(name)

        def fail(err):
            self.served.append((name, type(err).__name__))

        return Waiter(ok, fail, 0.0, urgent)

    def cycle(self, n):
        """``n`` transactions: each served waiter gives the server back."""
        for _ in range(n):
            self.pool.release(self.conn)

    def test_waiters_are_served_in_arrival_order(self):
        for name in "abcde":
            self.pool.enqueue(self.waiter(name))
            self.clock.advance(0.001)
        self.cycle(5)
        self.assertEqual(self.served, list("abcde"))

    def test_nobody_takes_an_idle_server_while_somebody_waits(self):
        self.pool.enqueue(self.waiter("a"))
        # The server comes back and goes to "a" at once: it is never idle.
        self.pool.release(self.conn)
        self.assertEqual(self.served, ["a"])
        self.assertIsNone(self.pool.take_idle())
        self.assertIsNone(self.pool.take_idle_any())

    def test_urgent_login_need_goes_before_the_work_queue(self):
        for name in "abc":
            self.pool.enqueue(self.waiter(name))
        self.clock.advance(0.5)
        self.pool.enqueue(self.waiter("login1", urgent=True))
        self.pool.enqueue(self.waiter("login2", urgent=True))
        self.pool.enqueue(self.waiter("d"))
        self.cycle(6)
        self.assertEqual(self.served, ["login1", "login2", "a", "b", "c", "d"])

    def test_requeue_keeps_the_place(self):
        moved = self.waiter("moved")
        moved.since = self.clock.seconds()   # began waiting elsewhere, first
        self.clock.advance(1.0)
        for name in "ab":
            self.pool.enqueue(self.waiter(name))
            self.clock.advance(0.1)
        self.pool.requeue(moved)
        late = self.waiter("late")
        late.since = self.clock.seconds()
        self.pool.requeue(late)
        self.cycle(4)
        self.assertEqual(self.served, ["moved", "a", "b", "late"])

    def test_expiry_with_urgent_waiters_in_front(self):
        self.pool.enqueue(self.waiter("a"))
        self.clock.advance(3.0)
        self.pool.enqueue(self.waiter("login", urgent=True))
        self.assertAlmostEqual(self.pool.maxwait(), 3.0)
        self.clock.advance(2.0)  # "a" has waited connect_timeout
        self.assertEqual(self.served, [("a", "PoolTimeout")])
        self.assertEqual([w.urgent for w in self.pool.waiters], [True])
        self.clock.advance(3.0)
        self.assertEqual(self.served, [("a", "PoolTimeout"), ("login", "PoolTimeout")])
        self.assertEqual(list(self.pool.waiters), [])

    def test_requeued_waiter_gets_a_full_connect_timeout_here(self):
        """Its place is kept, its timeout starts again on the new address
        (each candidate gets connect_timeout, as in PgCat)."""
        self.pool.enqueue(self.waiter("a"))          # deadline 5.0
        self.clock.advance(1.0)
        moved = self.waiter("moved")
        moved.since = -3.0                            # waited 4 s elsewhere
        self.pool.requeue(moved)                      # deadline 6.0, first in line
        self.assertAlmostEqual(self.pool.maxwait(), 4.0)
        self.clock.advance(4.0)
        self.assertEqual(self.served, [("a", "PoolTimeout")])
        self.clock.advance(1.0)
        self.assertEqual(self.served, [("a", "PoolTimeout"), ("moved", "PoolTimeout")])

    def test_requeued_waiter_is_served_first(self):
        self.pool.enqueue(self.waiter("a"))
        self.clock.advance(1.0)
        moved = self.waiter("moved")
        moved.since = -0.5                            # before "a"
        self.pool.requeue(moved)
        self.cycle(2)
        self.assertEqual(self.served, ["moved", "a"])

    def test_pool_timeout_error(self):
        self.pool.enqueue(self.waiter("a"))
        errors = []
        self.pool.waiters[0].fail = errors.append
        self.clock.advance(5.0)
        self.assertIsInstance(errors[0], PoolTimeout)


def set_answer(pairs):
    """A server's answer to the pooler's SETs: one Query each."""
    out = b""
    for name, value in pairs:
        out += (m.command_complete("SET") + m.parameter_status(name, value)
                + m.READY_IDLE)
    return out


def select_answer(text):
    return (m.row_description([("x", 25)]) + m.data_row([text])
            + m.command_complete("SELECT 1") + m.READY_IDLE)


class CheckoutOrderTests(SynchronousTestCase):
    """Real ClientProtocols with mixed parameter sets queue on a pool of one
    server: they are served in the order they asked, SETs included."""

    def setUp(self):
        self.log = []
        self.clock = task.Clock()
        config, _ = parse(CONFIG)
        self.cluster = Cluster(self.clock, config)
        self.factory = ClientFactory(self.clock, lambda: self.cluster, CancelKeys())
        self.up = self.cluster.user_pools[("db", "u")]
        self.pool = self.up.server_pool()
        server = ServerConnection(self.clock, "127.0.0.1", 5432, "u", "p", "db")
        server.makeConnection(LoggedTransport("server", self.log))
        server.params.update(BASE)
        server.state = "idle"
        server.dataReceived = server.idle_data
        server.ready.callback(server)
        server.pool = self.pool
        self.pool.idle.append(server)
        self.server = server

    def client(self, name, **params):
        client = self.factory.buildProtocol(None)
        client.makeConnection(LoggedTransport(name, self.log))
        values = dict(BASE)
        values.update(params)
        client._enter_work_phase(Session("u", "db", user_pool=self.up, params=values))
        return client

    def server_writes(self):
        return [d for n, d in self.log if n == "server"]

    def test_mixed_parameters_first_come_first_served(self):
        first = self.client("first")
        others = [self.client("psql", application_name="psql"),
                  self.client("bench1"),
                  self.client("psycopg", TimeZone="Asia/Tokyo", client_encoding="LATIN1"),
                  self.client("bench2")]
        first.dataReceived(m.query("SELECT 'first'"))
        self.assertIs(first.server, self.server)
        for c in others:
            self.clock.advance(0.001)
            c.dataReceived(m.query(f"SELECT '{c.transport.name}'"))
            self.assertIsNone(c.server)
        holder = first
        sets_paid = []
        for nxt in others:   # the order they asked in
            del self.log[:]
            self.server.dataReceived(select_answer(holder.transport.name))
            diff = [(k, v) for k, v in nxt.params.items() if self.server.params.get(k) != v]
            if diff:
                # Handed the server, it pays for the SET before its query.
                self.assertEqual(self.server_writes(),
                                 [b"".join(m.query(set_parameter_sql(k, v)) for k, v in diff)])
                self.assertIsNone(nxt.server)
                self.server.dataReceived(set_answer(diff))
                sets_paid.append(nxt.transport.name)
            self.assertIs(nxt.server, self.server)
            self.assertEqual(self.server_writes()[-1],
                             m.query(f"SELECT '{nxt.transport.name}'"))
            holder = nxt
        # Each client whose values differ from the previous holder's paid.
        self.assertEqual(sets_paid, ["psql", "bench1", "psycopg", "bench2"])

    def test_client_paying_for_a_set_keeps_its_turn(self):
        first = self.client("first")
        psql = self.client("psql", application_name="psql")
        bench = self.client("bench")
        first.dataReceived(m.query("SELECT 'first'"))
        psql.dataReceived(m.query("SELECT 'psql'"))
        bench.dataReceived(m.query("SELECT 'bench'"))
        del self.log[:]
        self.server.dataReceived(select_answer("first"))
        # psql holds the server while its SET runs; bench still waits.
        writes = self.server_writes()
        self.assertEqual(len(writes), 1)
        self.assertIn(b'SET "application_name"', writes[0])
        self.assertEqual([w.ok.__self__ for w in self.pool.waiters], [bench])
        self.clock.advance(0.5)
        self.assertIsNone(bench.server)
        self.server.dataReceived(set_answer([("application_name", "psql")]))
        self.assertIs(psql.server, self.server)
        self.assertEqual(self.server_writes()[-1], m.query("SELECT 'psql'"))
        # psql's transaction ends: bench is next, and pays its own SET back.
        del self.log[:]
        self.server.dataReceived(select_answer("psql"))
        self.assertIn(b'SET "application_name"', self.server_writes()[-1])
        self.server.dataReceived(set_answer([("application_name", "pgbench")]))
        self.assertIs(bench.server, self.server)
        self.assertEqual(self.server_writes()[-1], m.query("SELECT 'bench'"))

    def test_login_need_is_served_by_the_next_release(self):
        """A login's greeting parameters (pool.acquire(urgent=True)) wait
        for one transaction, not behind the queued clients."""
        first = self.client("first")
        queued = [self.client(f"q{i}") for i in range(3)]
        first.dataReceived(m.query("SELECT 'first'"))
        for c in queued:
            c.dataReceived(m.query("SELECT 'q'"))
        got = Result(self.pool.acquire(urgent=True))
        self.assertFalse(got.done)
        self.server.dataReceived(select_answer("first"))
        self.assertIs(got.value, self.server)
        self.assertTrue(all(c.server is None for c in queued))
