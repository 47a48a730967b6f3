"""Timeouts and limits with real clients (issue 16, items 4 and 5)."""

import time

import psycopg
from twisted.internet import defer

from tests.support import PoolerTestCase, in_thread
from tests.test_admin import _raw_login_error, admin, sleep


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
                conn.execute("create table if not exists idle_t (x int)")
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


class ClientLimitTests(PoolerTestCase):
    general = "max_client_conn = 3\nmax_user_client_connections = 2"
    users = {"pgcat_md5": "pool_size = 2", "pgcat_scram": "pool_size = 2"}

    @defer.inlineCallbacks
    def test_limits_refuse_with_53300(self):
        from tests.pgharness import USERS

        held = []
        for _ in range(2):
            c = yield in_thread(psycopg.connect, self.pooler.dsn(), prepare_threshold=None)
            held.append(c)
        # The user's limit (2) is reached, not the global one.
        err = yield self.failUnlessFailure(
            in_thread(psycopg.connect, self.pooler.dsn()), psycopg.Error)
        self.assertIn("max_user_client_connections = 2", str(err))
        fields = yield in_thread(_raw_login_error, self.pooler.port, "pgcat_md5",
                                 USERS["pgcat_md5"], "pgcat_test")
        self.assertEqual((fields.get("S"), fields.get("C")), ("FATAL", "53300"))
        c = yield in_thread(psycopg.connect, self.pooler.dsn(
            user="pgcat_scram", password=USERS["pgcat_scram"]), prepare_threshold=None)
        held.append(c)
        err = yield self.failUnlessFailure(in_thread(psycopg.connect, self.pooler.dsn(
            user="pgcat_scram", password=USERS["pgcat_scram"])), psycopg.Error)
        self.assertIn("max_client_conn = 3", str(err))
        # The admin console is never refused.
        cols, rows = yield in_thread(admin, self.pooler.port, "SHOW CLIENTS")
        self.assertEqual(len(rows), 3)
        # A client that leaves frees its place.
        yield in_thread(held.pop(0).close)
        c = yield in_thread(psycopg.connect, self.pooler.dsn(), prepare_threshold=None)
        held.append(c)
        for c in held:
            yield in_thread(c.close)


class DbLimitTests(PoolerTestCase):
    pool_extra = "max_db_client_connections = 1"

    @defer.inlineCallbacks
    def test_pool_limit(self):
        c = yield in_thread(psycopg.connect, self.pooler.dsn(), prepare_threshold=None)
        self.addCleanup(in_thread, c.close)
        err = yield self.failUnlessFailure(
            in_thread(psycopg.connect, self.pooler.dsn()), psycopg.Error)
        self.assertIn('pool "pgcat_test" (max_db_client_connections = 1)', str(err))


class WaitTimeoutTests(PoolerTestCase):
    """query_wait_timeout is not connect_timeout; query_wait_notify tells a
    waiting client it waits."""

    pool_size = 1
    general = "connect_timeout = 20000\nquery_wait_timeout = 1500\nquery_wait_notify = 500"

    @defer.inlineCallbacks
    def test_wait_notified_then_timed_out(self):
        holder = yield in_thread(psycopg.connect, self.pooler.dsn(), prepare_threshold=None)
        self.addCleanup(in_thread, holder.close)
        yield in_thread(holder.execute, "select 1")

        def wait():
            notices = []
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                conn.add_notice_handler(lambda d: notices.append(d.message_primary))
                t0 = time.monotonic()
                try:
                    conn.execute("select 1")
                except psycopg.Error as e:
                    return str(e), time.monotonic() - t0, notices
            return None, 0, notices

        err, took, notices = yield in_thread(wait)
        self.assertIn("query_wait_timeout (1500 ms)", err)
        self.assertLess(took, 10)
        self.assertEqual(len(notices), 1, notices)
        self.assertIn("waiting for a server connection", notices[0])


class TransactionTimeoutTests(PoolerTestCase):
    general = "transaction_timeout = 700\nclient_idle_timeout = 1500"

    @defer.inlineCallbacks
    def test_long_transaction_disconnected(self):
        def go():
            conn = psycopg.connect(self.pooler.dsn(), prepare_threshold=None)
            conn.execute("select 1")
            time.sleep(1.5)
            try:
                conn.execute("select 2")
                return None
            except psycopg.Error as e:
                return str(e)
            finally:
                conn.close()

        err = yield in_thread(go)
        self.assertIn("transaction timeout", err)
        # The server went back clean: the next client gets it.
        def other():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as c:
                return c.execute("select txid_current_if_assigned() is null").fetchone()[0]
        self.assertTrue((yield in_thread(other)))

    @defer.inlineCallbacks
    def test_idle_client_disconnected(self):
        def go():
            conn = psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None)
            conn.execute("select 1")
            time.sleep(0.8)
            conn.execute("select 1")   # activity: the idle time starts again
            time.sleep(2.5)
            try:
                conn.execute("select 2")
                return None
            except psycopg.Error as e:
                return str(e)
            finally:
                conn.close()

        err = yield in_thread(go)
        self.assertIn("idle-session timeout", err)
