"""Timeouts and limits with real clients (issue 16, items 4 and 5)."""

import time

import psycopg
from twisted.internet import defer

from tests.support import PoolerTestCase, in_thread
from tests.test_admin import admin, sleep


class StatementTimeoutTests(PoolerTestCase):
    pool_size = 1
    users = {"pgcat_md5": "pool_size = 1\nstatement_timeout = 500"}

    @defer.inlineCallbacks
    def test_cancelled_on_the_server_client_stays(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                t0 = time.monotonic()
                try:
                    conn.execute("select pg_sleep(10)")
                    err = None
                except psycopg.Error as e:
                    err = e
                took = time.monotonic() - t0
                # The same client goes on, on the same (only) server.
                after = conn.execute("select 41 + 1").fetchone()[0]
                return err, took, after

        err, took, after = yield in_thread(go)
        self.assertIsInstance(err, psycopg.errors.QueryCanceled)
        self.assertLess(took, 5.0)
        self.assertEqual(after, 42)
        cols, servers = yield in_thread(admin, self.pooler.port, "SHOW SERVERS")
        self.assertEqual([s["state"] for s in servers if s["type"] == "pool"], ["idle"])

    @defer.inlineCallbacks
    def test_fast_statements_are_not_cancelled(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                return [conn.execute("select pg_sleep(0.01), %s::int", (i,)).fetchone()[1]
                        for i in range(30)]

        self.assertEqual((yield in_thread(go)), list(range(30)))


class IdleInTransactionTests(PoolerTestCase):
    pool_size = 1
    general = "idle_client_in_transaction_timeout = 500"

    @defer.inlineCallbacks
    def test_rolled_back_and_client_usable(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), prepare_threshold=None) as conn:
                conn.execute("create temp table if not exists idle_t (x int)")
                conn.commit()
                conn.execute("insert into idle_t values (1)")
                time.sleep(1.5)
                try:
                    conn.execute("insert into idle_t values (2)")
                    err = None
                except psycopg.Error as e:
                    err = e
                conn.rollback()
                # Usable afterwards, and the server is free for others.
                return err, conn.execute("select 7").fetchone()[0]

        def other():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                return conn.execute("select 8").fetchone()[0]

        d = in_thread(go)
        yield sleep(1.0)
        # The only server was given back: another client gets it.
        self.assertEqual((yield in_thread(other)), 8)
        err, after = yield d
        self.assertIsNotNone(err)
        self.assertEqual(err.sqlstate, "25P03")
        self.assertIn("idle transaction timeout", str(err))
        self.assertEqual(after, 7)

    @defer.inlineCallbacks
    def test_extended_protocol_after_the_timeout(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), prepare_threshold=None) as conn:
                conn.execute("select %s::int", (1,))
                time.sleep(1.5)
                try:
                    conn.execute("select %s::int", (2,))
                    err = None
                except psycopg.Error as e:
                    err = e
                conn.rollback()
                return err, conn.execute("select %s::int", (3,)).fetchone()[0]

        err, after = yield in_thread(go)
        self.assertEqual(err.sqlstate, "25P03")
        self.assertEqual(after, 3)


class SessionIdleInTransactionTests(IdleInTransactionTests):
    pool_mode = "session"

    def test_rolled_back_and_client_usable(self):
        """Session mode: the server is rolled back and bound again (not
        given to another client)."""
        def go():
            with psycopg.connect(self.pooler.dsn(), prepare_threshold=None) as conn:
                conn.execute("set application_name = 'kept'")
                conn.commit()
                conn.execute("select 1")
                time.sleep(1.5)
                try:
                    conn.execute("select 2")
                    err = None
                except psycopg.Error as e:
                    err = e
                conn.rollback()
                return err, conn.execute("show application_name").fetchone()[0]

        def check(result):
            err, name = result
            self.assertEqual(err.sqlstate, "25P03")
            self.assertEqual(name, "kept")   # the session's state survived

        return in_thread(go).addCallback(check)


class CheckoutFailureLimitTests(PoolerTestCase):
    pool_size = 1
    general = "connect_timeout = 300"
    pool_extra = "checkout_failure_limit = 2"

    @defer.inlineCallbacks
    def test_disconnected_after_the_limit(self):
        holder = yield in_thread(psycopg.connect, self.pooler.dsn(), prepare_threshold=None)
        self.addCleanup(in_thread, holder.close)
        yield in_thread(holder.execute, "select 1")   # holds the only server

        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                errors = []
                for _ in range(3):
                    try:
                        conn.execute("select 1")
                    except psycopg.Error as e:
                        errors.append((type(e).__name__, str(e), conn.closed))
                return errors

        errors = yield in_thread(go)
        self.assertIn("pool exhausted", errors[0][1])
        self.assertFalse(errors[0][2])
        self.assertIn("checkout failure limit reached (2 / 2)", errors[1][1])
        self.assertTrue(errors[-1][2])
