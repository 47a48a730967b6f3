"""Transaction and session pooling through pgcat_tw with real clients
(psql, pgbench) against a real PostgreSQL primary."""

from twisted.internet import defer

from tests.support import PoolerTestCase


class TransactionPsqlTests(PoolerTestCase):
    pool_mode = "transaction"

    @defer.inlineCallbacks
    def test_simple_select(self):
        out, err, code = yield self.pooler.psql("select 40 + 2")
        self.assertEqual((code, out.strip()), (0, b"42"), err)

    @defer.inlineCallbacks
    def test_multi_statement_string(self):
        out, err, code = yield self.pooler.psql(
            "create temp table t(x int); insert into t values (1),(2); select sum(x) from t")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.split()[-1], b"3")


class SessionPsqlTests(TransactionPsqlTests):
    pool_mode = "session"


import os
import socket
import threading
import time

import psycopg
from twisted.internet import reactor, task

from tests.support import in_thread

_pgbench_ready = []


class PgbenchMixin:
    @defer.inlineCallbacks
    def _init_pgbench(self):
        if not _pgbench_ready:
            out, err, code = yield self.pooler.pgbench("-i", "-s", "1", "-q")
            self.assertEqual(code, 0, err)
            _pgbench_ready.append(True)


class TransactionPgbenchTests(PoolerTestCase, PgbenchMixin):
    """pgbench with more clients than servers: zero failed transactions."""

    pool_mode = "transaction"
    pool_size = 2

    @defer.inlineCallbacks
    def _bench(self, mode, clients=8, pool_size=2):
        yield self._init_pgbench()
        out, err, code = yield self.pooler.pgbench(
            "-M", mode, "-c", str(clients), "-j", "2", "-t", "200", "-n")
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn(f"number of transactions actually processed: {clients * 200}/", text)
        self.assertIn("number of failed transactions: 0 ", text)
        # Never more server connections than pool_size.
        self.assertLessEqual(self.pooler.cluster.server_connections(), pool_size)

    def test_pgbench_simple(self):
        return self._bench("simple")

    def test_pgbench_extended(self):
        return self._bench("extended")


class SessionPgbenchTests(TransactionPgbenchTests):
    pool_mode = "session"

    def test_pgbench_simple(self):
        return self._bench("simple", clients=2)

    def test_pgbench_extended(self):
        return self._bench("extended", clients=2)


class ServerAuthTests(PoolerTestCase):
    """The pooler logs in to Postgres with md5, SCRAM-SHA-256, cleartext and
    trust; clients authenticate against the configured password (md5) or
    not at all (trust)."""

    users = {
        "pgcat_md5": "",
        "pgcat_scram": "",
        "pgcat_clear": "",
        "pgcat_trust": 'auth_type = "trust"',
        "app": 'password = "app_pw"\nserver_username = "pgcat_scram"\nserver_password = "scram_pw"',
    }

    @defer.inlineCallbacks
    def test_each_server_auth_method(self):
        for user in ("pgcat_md5", "pgcat_scram", "pgcat_clear", "pgcat_trust"):
            out, err, code = yield self.pooler.psql("select current_user", user=user)
            self.assertEqual((code, out.strip()), (0, user.encode()), err)

    @defer.inlineCallbacks
    def test_server_username_and_password(self):
        out, err, code = yield self.pooler.psql("select current_user", user="app",
                                                password="app_pw")
        self.assertEqual((code, out.strip()), (0, b"pgcat_scram"), err)

    @defer.inlineCallbacks
    def test_trust_user_needs_no_password(self):
        out, err, code = yield self.pooler.psql("select 1", user="pgcat_trust",
                                                password="anything-or-nothing")
        self.assertEqual((code, out.strip()), (0, b"1"), err)


class ClientAuthErrorTests(PoolerTestCase):
    def _connect_error(self, **kw):
        def go():
            try:
                psycopg.connect(self.pooler.dsn(**kw)).close()
            except psycopg.OperationalError as e:
                return e
            return None
        return in_thread(go)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        e = yield self._connect_error(password="not-the-password")
        self.assertIsNotNone(e)
        self.assertIn('password authentication failed for user "pgcat_md5"', str(e))

    @defer.inlineCallbacks
    def test_error_codes(self):
        """The SQLSTATE of each login failure, read off the wire."""
        cases = [
            ("pgcat_md5", "pgcat_test", "wrong", "28P01"),
            ("pgcat_md5", "no_such_pool", "md5_pw", "3D000"),
            ("nobody", "pgcat_test", "x", "28000"),
        ]
        for user, db, password, code in cases:
            fields, closed = yield in_thread(raw_login, self.pooler.port, user, db, password)
            self.assertEqual(fields.get("C"), code, fields)
            self.assertEqual(fields.get("S"), "FATAL")
            self.assertTrue(closed)


def raw_login(port, user, db, password):
    """Log in over a raw socket (md5); returns (ErrorResponse fields or {},
    whether the pooler closed the connection)."""
    import hashlib

    from tests.support import error_fields, read_messages, startup_packet
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(startup_packet(user, db))
        msgs, closed = read_messages(s, until=b"R")
        if msgs and msgs[-1][0] == b"R" and msgs[-1][1][:4] == b"\0\0\0\x05":
            salt = msgs[-1][1][4:8]
            inner = hashlib.md5((password + user).encode()).hexdigest()
            resp = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"
            s.sendall(b"p" + (len(resp) + 4).to_bytes(4, "big") + resp)
            msgs, closed = read_messages(s, until=b"Z")
        for t, body in msgs:
            if t == b"E":
                more, closed2 = read_messages(s, until=b"never")
                return error_fields(body), closed or closed2
        return {}, closed
    finally:
        s.close()


def _sqlstate_of(exc):
    diag = getattr(exc, "diag", None)
    return getattr(diag, "sqlstate", None)


class DefaultDatabaseTests(PoolerTestCase):
    """With no database in the startup packet, the user name is the pool."""

    @defer.inlineCallbacks
    def setUp(self):
        self.topo = yield in_thread(__import__("tests.pgharness", fromlist=["x"]).topology)
        self.primary = self.topo.primary
        from tests.support import Pooler, free_port, pooler_toml
        text = pooler_toml(free_port(), [(self.primary.port, "primary")], pool_name="pgcat_md5")
        self.pooler = yield Pooler(text).start()
        self.addCleanup(self.pooler.stop)

    @defer.inlineCallbacks
    def test_database_defaults_to_user(self):
        dsn = f"host=127.0.0.1 port={self.pooler.port} user=pgcat_md5 password=md5_pw sslmode=disable"

        def go():
            with psycopg.connect(dsn) as conn:
                return conn.execute("select current_database()").fetchone()[0], conn.info.dbname
        db, seen = yield in_thread(go)
        self.assertEqual(db, "pgcat_test")   # the pool's shard database
        self.assertEqual(seen, "pgcat_md5")  # what the client asked for


class ParameterStatusTests(PoolerTestCase):
    @defer.inlineCallbacks
    def test_greeting_comes_from_a_real_server(self):
        direct = yield self.primary_sql("show server_version")

        def go():
            with psycopg.connect(self.pooler.dsn(application_name="psy")) as conn:
                info = conn.info
                return {k: info.parameter_status(k) for k in (
                    "server_version", "server_encoding", "client_encoding", "DateStyle",
                    "TimeZone", "integer_datetimes", "standard_conforming_strings",
                    "IntervalStyle", "is_superuser", "session_authorization",
                    "application_name")}
        ps = yield in_thread(go)
        self.assertEqual(ps["server_version"], direct.strip())
        self.assertEqual(ps["integer_datetimes"], "on")
        self.assertEqual(ps["server_encoding"], "UTF8")
        self.assertEqual(ps["session_authorization"], "pgcat_md5")
        self.assertEqual(ps["is_superuser"], "off")
        self.assertEqual(ps["application_name"], "psy")
        for k, v in ps.items():
            self.assertIsNotNone(v, k)

    @defer.inlineCallbacks
    def test_own_backend_key_per_client(self):
        def go():
            with psycopg.connect(self.pooler.dsn()) as a, psycopg.connect(self.pooler.dsn()) as b:
                return a.info.backend_pid, b.info.backend_pid, \
                    a.execute("select pg_backend_pid()").fetchone()[0]
        pa, pb, server_pid = yield in_thread(go)
        self.assertNotEqual(pa, pb)
        self.assertNotEqual(pa, server_pid)  # the pooler's key, not the server's


class CancelTests(PoolerTestCase):
    pool_size = 2

    @defer.inlineCallbacks
    def _cancel_sleep(self):
        started = threading.Event()
        result = {}

        def sleeper(conn):
            started.set()
            t0 = time.monotonic()
            try:
                conn.execute("select pg_sleep(30)")
            except psycopg.errors.QueryCanceled as e:
                result["error"] = e
            result["elapsed"] = time.monotonic() - t0
            # The connection is still usable after a cancel.
            result["after"] = conn.execute("select 7").fetchone()[0]

        conn = yield in_thread(psycopg.connect, self.pooler.dsn(), autocommit=True)
        self.addCleanup(conn.close)
        d = in_thread(sleeper, conn)
        yield in_thread(started.wait, 10)
        yield task.deferLater(reactor, 0.5, lambda: None)
        cancel = getattr(conn, "cancel_safe", None) or conn.cancel
        yield in_thread(cancel)
        yield d
        self.assertIn("error", result)
        self.assertLess(result["elapsed"], 10)
        self.assertEqual(result["after"], 7)

    def test_cancel_transaction_mode(self):
        return self._cancel_sleep()


class SessionCancelTests(CancelTests):
    pool_mode = "session"


class DirtyServerTests(PoolerTestCase):
    """A server is never handed to the next client with the previous
    client's transaction or state."""

    pool_size = 1

    @defer.inlineCallbacks
    def _table(self, name):
        yield self.primary_sql(f"drop table if exists {name}; create table {name}(x int); "
                               f"grant all on {name} to public")
        self.addCleanup(self.primary_sql, f"drop table if exists {name}")

    @defer.inlineCallbacks
    def test_disconnect_inside_transaction_rolls_back(self):
        yield self._table("dirty_tx")

        def client_a():
            conn = psycopg.connect(self.pooler.dsn())
            conn.execute("insert into dirty_tx values (1)")  # opens a transaction
            pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            # Vanish without Terminate: shut the socket down under libpq.
            s = socket.socket(fileno=os.dup(conn.fileno()))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
            try:
                conn.close()
            except Exception:
                pass
            return pid

        def client_b():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                count = conn.execute("select count(*) from dirty_tx").fetchone()[0]
                pid = conn.execute("select pg_backend_pid()").fetchone()[0]
                idle_in_tx = conn.execute(
                    "select count(*) from pg_stat_activity where usename = 'pgcat_md5' "
                    "and state like 'idle in transaction%'").fetchone()[0]
                return count, pid, idle_in_tx

        pid_a = yield in_thread(client_a)
        yield task.deferLater(reactor, 0.2, lambda: None)
        count, pid_b, idle_in_tx = yield in_thread(client_b)
        self.assertEqual(count, 0)
        self.assertEqual(idle_in_tx, 0)
        self.assertEqual(pid_a, pid_b)  # rolled back and reused, pool_size 1

    @defer.inlineCallbacks
    def test_terminate_inside_transaction_rolls_back(self):
        yield self._table("dirty_tx2")

        def client_a():
            conn = psycopg.connect(self.pooler.dsn())
            conn.execute("insert into dirty_tx2 values (1)")
            conn.close()  # sends Terminate while in a transaction

        def client_b():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                return conn.execute("select count(*) from dirty_tx2").fetchone()[0]

        yield in_thread(client_a)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual((yield in_thread(client_b)), 0)

    @defer.inlineCallbacks
    def test_server_dies_mid_transaction(self):
        def begin():
            conn = psycopg.connect(self.pooler.dsn())
            pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            return conn, pid

        conn, pid = yield in_thread(begin)
        self.addCleanup(conn.close)
        yield self.primary_sql(f"select pg_terminate_backend({pid})")

        def next_query():
            try:
                conn.execute("select 1")
            except psycopg.OperationalError as e:
                return e
            return None

        err = yield in_thread(next_query)
        self.assertIsNotNone(err, "the client must get an error")
        self.assertTrue(conn.closed or conn.broken)

        def fresh():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as c:
                return c.execute("select pg_backend_pid()").fetchone()[0]
        new_pid = yield in_thread(fresh)
        self.assertNotEqual(new_pid, pid)  # the pool replaced the dead server


class PoolExhaustedTests(PoolerTestCase):
    pool_size = 1
    pool_extra = "connect_timeout = 400"

    @defer.inlineCallbacks
    def test_waiting_client_gets_clear_error_and_stays_usable(self):
        holder = yield in_thread(psycopg.connect, self.pooler.dsn())
        self.addCleanup(holder.close)
        yield in_thread(holder.execute, "select 1")  # transaction open: server held

        def waiter():
            conn = psycopg.connect(self.pooler.dsn(), autocommit=True)
            try:
                t0 = time.monotonic()
                try:
                    conn.execute("select 1")
                    return None
                except psycopg.Error as e:
                    err = (e.sqlstate, str(e), time.monotonic() - t0)
                holder.commit()  # frees the server
                return err, conn.execute("select 2").fetchone()[0]
            finally:
                conn.close()

        (sqlstate, msg, waited), after = yield in_thread(waiter)
        self.assertEqual(sqlstate, "53300")
        self.assertIn('pool "pgcat_test"', msg)
        self.assertIn("exhausted", msg)
        self.assertGreaterEqual(waited, 0.35)
        self.assertLess(waited, 3)
        self.assertEqual(after, 2)


class SessionResetTests(PoolerTestCase):
    pool_mode = "session"
    pool_size = 1

    @defer.inlineCallbacks
    def test_discard_all_between_clients(self):
        def client_a():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                conn.execute("set search_path to pg_catalog")
                conn.execute("create temp table sess_tmp(x int)")
                conn.execute("prepare p1 as select 1")
                return conn.execute("select pg_backend_pid()").fetchone()[0]

        def client_b():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                return (conn.execute("show search_path").fetchone()[0],
                        conn.execute("select count(*) from pg_prepared_statements").fetchone()[0],
                        conn.execute("select to_regclass('pg_temp.sess_tmp') is null").fetchone()[0],
                        conn.execute("select pg_backend_pid()").fetchone()[0])

        pid_a = yield in_thread(client_a)
        yield task.deferLater(reactor, 0.2, lambda: None)
        search_path, prepared, no_tmp, pid_b = yield in_thread(client_b)
        self.assertEqual(pid_a, pid_b)
        self.assertEqual(search_path, '"$user", public')
        self.assertEqual(prepared, 0)
        self.assertTrue(no_tmp)


class MinPoolSizeTests(PoolerTestCase):
    users = {"pgcat_md5": "min_pool_size = 2\npool_size = 3"}

    @defer.inlineCallbacks
    def test_min_pool_size_kept_warm(self):
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        pool = up.server_pool()
        for _ in range(100):
            if len(pool.idle) >= 2:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(pool.idle), 2)


class GracefulShutdownTests(PoolerTestCase):
    """SIGINT semantics (PgCat): idle clients are closed at once, a client
    inside a transaction may finish it, new clients are refused."""

    @defer.inlineCallbacks
    def test_drain(self):
        idle = yield in_thread(psycopg.connect, self.pooler.dsn(), autocommit=True)
        busy = yield in_thread(psycopg.connect, self.pooler.dsn())
        self.addCleanup(idle.close)
        self.addCleanup(busy.close)
        yield in_thread(busy.execute, "select 1")  # inside a transaction now
        done = defer.Deferred()
        self.pooler.service.drain(lambda: done.callback(None))
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(done.called)

        def idle_is_closed():
            try:
                idle.execute("select 1")
            except psycopg.OperationalError as e:
                return str(e)
            return None
        msg = yield in_thread(idle_is_closed)
        self.assertIn("terminating connection due to administrator command", msg)

        new_err = yield in_thread(lambda: _connect_error(self.pooler.dsn()))
        self.assertIn("shutting down", new_err)

        # The transaction can still be finished...
        value = yield in_thread(lambda: busy.execute("select 2").fetchone()[0])
        self.assertEqual(value, 2)
        yield in_thread(busy.commit)
        # ...and then the client is closed and the drain completes.
        yield done
        self.assertEqual(len(self.pooler.service.factory.clients), 0)


def _connect_error(dsn):
    try:
        psycopg.connect(dsn).close()
    except psycopg.OperationalError as e:
        return str(e)
    return ""


class CustomCommandTests(PoolerTestCase):
    """PgCat's role commands are answered by the pooler (reference §4.1)."""

    pool_extra = 'default_role = "primary"'

    @defer.inlineCallbacks
    def test_server_role_commands(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                seen = [conn.execute("SHOW SERVER ROLE").fetchone()[0]]
                conn.execute("SET SERVER ROLE TO 'replica'")
                seen.append(conn.execute("show server role;").fetchone()[0])
                conn.execute("  set server role to 'ANY' ;")
                seen.append(conn.execute("SHOW SERVER ROLE").fetchone()[0])
                conn.execute("SET SERVER ROLE TO 'default'")
                seen.append(conn.execute("SHOW SERVER ROLE").fetchone()[0])
                seen.append(conn.execute("SHOW PRIMARY READS").fetchone()[0])
                conn.execute("SET PRIMARY READS TO on")
                seen.append(conn.execute("SHOW PRIMARY READS").fetchone()[0])
                # Not a custom command: goes to the server.
                seen.append(conn.execute("show server_version").fetchone()[0] != "")
                # A bad value is not ours either: the server rejects it.
                try:
                    conn.execute("SET SERVER ROLE TO 'nonsense'")
                    seen.append("accepted")
                except psycopg.Error as e:
                    seen.append(e.sqlstate)
                return seen
        seen = yield in_thread(go)
        self.assertEqual(seen, ["primary", "replica", "any", "primary", "off", "on", True,
                                "42601"])
