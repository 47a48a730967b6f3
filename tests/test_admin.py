"""The admin console (pgcat / pgbouncer databases) with real clients
(psql, psycopg2: both speak the simple query protocol the console accepts)
against a pooler in front of the run's real PostgreSQL."""

import os
import signal
import socket
import subprocess
import time

import psycopg
import psycopg2
from twisted.internet import defer, task, reactor

from tests.pgharness import USERS
from tests.support import PoolerTestCase, in_thread, read_messages, startup_packet
from tests.test_pooling import PgbenchMixin

ADMIN_PW = "admin_pw"

# Reference §2.2: PgCat's columns, in order (pgcat_tw's extras come after).
COLUMNS = {
    "POOLS": ["database", "user", "pool_mode", "cl_idle", "cl_active", "cl_waiting",
              "cl_cancel_req", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login",
              "maxwait", "maxwait_us"],
    "STATS": ["instance", "database", "user", "total_xact_count", "total_query_count",
              "total_received", "total_sent", "total_xact_time", "total_query_time",
              "total_wait_time", "total_errors", "avg_xact_count", "avg_query_count",
              "avg_recv", "avg_sent", "avg_errors", "avg_xact_time", "avg_query_time",
              "avg_wait_time"],
    "DATABASES": ["name", "host", "port", "database", "force_user", "pool_size",
                  "min_pool_size", "reserve_pool", "pool_mode", "max_connections",
                  "current_connections", "paused", "disabled"],
    "CLIENTS": ["client_id", "database", "user", "application_name", "state",
                "transaction_count", "query_count", "error_count", "age_seconds", "maxwait",
                "maxwait_us"],
    "SERVERS": ["server_id", "database_name", "user", "address_id", "application_name",
                "state", "transaction_count", "query_count", "bytes_sent", "bytes_received",
                "age_seconds", "prepare_cache_hit", "prepare_cache_miss",
                "prepare_cache_eviction", "prepare_cache_size"],
    "USERS": ["name", "pool_mode"],
    "CONFIG": ["key", "value", "default", "changeable"],
    "LISTS": ["list", "items"],
    "VERSION": ["version"],
    "BANS": ["db", "user", "role", "host", "reason", "ban_time", "ban_duration_seconds",
             "ban_remaining_seconds"],
    # PgBouncer's (PgCat has no such command).
    "STATS_TOTALS": ["database", "server_assignment_count", "xact_count", "query_count",
                     "bytes_received", "bytes_sent", "xact_time", "query_time", "wait_time",
                     "client_parse_count", "server_parse_count", "bind_count"],
    "STATS_AVERAGES": ["database", "server_assignment_count", "xact_count", "query_count",
                       "bytes_received", "bytes_sent", "xact_time", "query_time", "wait_time",
                       "client_parse_count", "server_parse_count", "bind_count"],
    "STATE": ["key", "value"],
}
# The columns whose extras are allowed after PgCat's list.
EXTENDED = ("CLIENTS", "SERVERS", "STATS")
LISTS_ROWS = ["databases", "users", "pools", "free_clients", "used_clients", "login_clients",
              "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries",
              "dns_pending"]


def admin_conn(port, db="pgbouncer", user="admin", password=ADMIN_PW):
    conn = psycopg2.connect(host="127.0.0.1", port=port, dbname=db, user=user,
                            password=password, sslmode="disable", connect_timeout=10)
    conn.autocommit = True
    return conn


def admin(port, sql, **kw):
    """(column names, rows as dicts) of one admin command."""
    conn = admin_conn(port, **kw)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        if cur.description is None:
            return [], []
        cols = [d[0] for d in cur.description]
        return cols, [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        conn.close()


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class ConsoleTests(PoolerTestCase):
    pool_size = 1

    def admin(self, sql, **kw):
        return in_thread(admin, self.pooler.port, sql, **kw)

    @defer.inlineCallbacks
    def test_every_command_has_the_reference_columns(self):
        for command, expected in COLUMNS.items():
            cols, rows = yield self.admin(f"SHOW {command}")
            if command in EXTENDED:
                self.assertEqual(cols[:len(expected)], expected, command)
            else:
                self.assertEqual(cols, expected, command)
        cols, rows = yield self.admin("show lists")
        self.assertEqual([r["list"] for r in rows], LISTS_ROWS)
        cols, rows = yield self.admin("SHOW VERSION;")
        self.assertIn("pgcat_tw", rows[0]["version"])

    @defer.inlineCallbacks
    def test_both_databases_any_case_and_semicolons(self):
        for db in ("pgcat", "pgbouncer"):
            cols, rows = yield self.admin("sHoW pOoLs;;", db=db)
            self.assertEqual([(r["database"], r["user"]) for r in rows],
                             [("pgcat_test", "pgcat_md5")])

    @defer.inlineCallbacks
    def test_errors_are_58000_and_the_session_stays_usable(self):
        def go():
            conn = admin_conn(self.pooler.port)
            cur = conn.cursor()
            codes = []
            for sql in ("SHOW NOTHING", "FROBNICATE", "BAN 127.0.0.1 -5",
                        "PAUSE nosuchpool", "KILL_CLIENT 0x7FFFFFFF", "BAN nosuchhost 10"):
                try:
                    cur.execute(sql)
                    codes.append((sql, None))
                except psycopg2.Error as e:
                    codes.append((sql, e.pgcode, e.pgerror))
            cur.execute("SET client_encoding = 'UTF8'")
            cur.execute("SHOW USERS")
            users = cur.fetchall()
            conn.close()
            return codes, users

        codes, users = yield in_thread(go)
        for entry in codes:
            self.assertEqual(entry[1], "58000", entry)
        texts = dict((c[0], c[2]) for c in codes)
        self.assertIn("Unsupported SHOW query against the admin database", texts["SHOW NOTHING"])
        self.assertIn("Unsupported query against the admin database", texts["FROBNICATE"])
        self.assertIn("positive", texts["BAN 127.0.0.1 -5"])
        self.assertIn("nosuchpool", texts["PAUSE nosuchpool"])
        self.assertEqual(users, [("pgcat_md5", "transaction")])

    @defer.inlineCallbacks
    def test_ban_of_the_primary_refused(self):
        port = self.primary.port
        err = yield self.failUnlessFailure(
            self.admin(f"BAN 127.0.0.1:{port} 30"), psycopg2.Error)
        self.assertEqual(err.pgcode, "58000")
        self.assertIn("primary", err.pgerror)

    @defer.inlineCallbacks
    def test_only_the_admin_user_with_its_password(self):
        port = self.pooler.port
        err = yield self.failUnlessFailure(
            in_thread(admin, port, "SHOW POOLS", password="wrong"), psycopg2.Error)
        self.assertIn("password authentication failed", str(err))
        for user, pw in (("pgcat_md5", USERS["pgcat_md5"]), ("nobody", "x")):
            err = yield self.failUnlessFailure(
                in_thread(admin, port, "SHOW POOLS", user=user, password=pw), psycopg2.Error)
            self.assertIn("not allowed to connect to the admin database", str(err))
        # The server's codes: 28P01 / 28000, with a FATAL and a close.
        for user, pw, code in (("admin", "wrong", b"28P01"), ("nobody", "x", b"28000")):
            fields = yield in_thread(_raw_login_error, port, user, pw)
            self.assertEqual((fields.get("S"), fields.get("C")), ("FATAL", code.decode()))
        # Failed logins are not clients.
        cols, rows = yield self.admin("SHOW CLIENTS")
        self.assertEqual(rows, [])

    @defer.inlineCallbacks
    def test_extended_protocol_is_refused(self):
        def go():
            with psycopg.connect(f"host=127.0.0.1 port={self.pooler.port} dbname=pgcat "
                                 f"user=admin password={ADMIN_PW} sslmode=disable",
                                 autocommit=True) as conn:
                conn.execute("SHOW POOLS", prepare=True)   # Parse, Bind, Execute

        err = yield self.failUnlessFailure(in_thread(go), psycopg.Error)
        self.assertIn("simple queries", str(err))

    @defer.inlineCallbacks
    def test_waiting_client_shows_in_cl_waiting_and_maxwait(self):
        holder = yield in_thread(self._open_transaction)
        self.addCleanup(in_thread, holder.close)
        waiter = in_thread(self._query_once, "select 1")
        yield sleep(1.2)
        cols, pools = yield self.admin("SHOW POOLS")
        cols, clients = yield self.admin("SHOW CLIENTS")
        states = sorted(c["state"] for c in clients)
        holder_rollback = in_thread(holder.rollback)
        yield holder_rollback
        yield waiter
        p = pools[0]
        self.assertEqual((p["cl_waiting"], p["cl_active"], p["sv_active"]), (1, 1, 1))
        self.assertGreaterEqual(p["maxwait"] * 1_000_000 + p["maxwait_us"], 1_000_000)
        self.assertEqual(states, ["active", "waiting"])
        waiting = [c for c in clients if c["state"] == "waiting"][0]
        self.assertGreaterEqual(waiting["maxwait"], 1)
        self.assertEqual(waiting["application_name"], "fair-waiter")

    def _open_transaction(self):
        conn = psycopg.connect(self.pooler.dsn(), prepare_threshold=None)
        conn.execute("select 1")   # BEGIN + select: holds the only server
        return conn

    def _query_once(self, sql):
        with psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None,
                             application_name="fair-waiter") as conn:
            return conn.execute(sql).fetchone()[0]

    @defer.inlineCallbacks
    def test_stats_move(self):
        before = yield self.admin("SHOW STATS")
        yield in_thread(self._queries, 25)
        after = yield self.admin("SHOW STATS")
        b, a = before[1][0], after[1][0]
        self.assertEqual(a["instance"], "pgcat_test_shard_0_primary")
        self.assertEqual(a["total_xact_count"] - b["total_xact_count"], 25)
        self.assertEqual(a["total_query_count"] - b["total_query_count"], 25)
        self.assertGreater(a["total_received"], b["total_received"])
        self.assertGreater(a["total_sent"], b["total_sent"])
        self.assertGreater(a["total_query_time"] + a["total_xact_time"], -1)
        self.assertEqual(a["total_errors"] - b["total_errors"], 1)
        cols, servers = yield self.admin("SHOW SERVERS")
        self.assertEqual(len([s for s in servers if s["type"] == "pool"]), 1)
        self.assertGreaterEqual(servers[0]["transaction_count"], 25)

    def _queries(self, n):
        with psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None) as c:
            for i in range(n - 1):
                c.execute("select %s::int", (i,))
            try:
                c.execute("select 1/0")
            except psycopg.errors.DivisionByZero:
                pass

    @defer.inlineCallbacks
    def test_kill_client(self):
        conn = yield in_thread(psycopg.connect, self.pooler.dsn(), autocommit=True,
                               prepare_threshold=None)
        self.addCleanup(in_thread, conn.close)
        yield in_thread(conn.execute, "select 1")
        cols, clients = yield self.admin("SHOW CLIENTS")
        yield self.admin(f"KILL_CLIENT {clients[0]['client_id']}")
        err = yield self.failUnlessFailure(in_thread(conn.execute, "select 1"), psycopg.Error)
        self.assertIn("administrator command", str(err))

    @defer.inlineCallbacks
    def test_pause_waits_for_the_servers_and_clients_wait(self):
        holder = yield in_thread(self._open_transaction)
        self.addCleanup(in_thread, holder.close)
        paused = self.admin("PAUSE pgcat_test")
        yield sleep(0.5)
        self.assertFalse(paused.called)    # a transaction still holds a server
        cols, dbs = yield self.admin("SHOW DATABASES")
        self.assertEqual(dbs[0]["paused"], 1)
        yield in_thread(holder.rollback)
        yield paused
        # A client that comes while paused waits (past connect_timeout,
        # 3 s here) without an error, and runs after RESUME.
        waiter = in_thread(self._query_once, "select 42")
        yield sleep(3.5)
        self.assertFalse(waiter.called)
        cols, pools = yield self.admin("SHOW POOLS")
        self.assertEqual(pools[0]["cl_waiting"], 1)
        yield self.admin("RESUME")
        self.assertEqual((yield waiter), 42)
        cols, dbs = yield self.admin("SHOW DATABASES")
        self.assertEqual(dbs[0]["paused"], 0)

    @defer.inlineCallbacks
    def test_reload_without_a_file_answers_why(self):
        err = yield self.failUnlessFailure(self.admin("RELOAD"), psycopg2.Error)
        self.assertEqual(err.pgcode, "58000")
        self.assertIn("config file", err.pgerror)


def _raw_login_error(port, user, password, db="pgbouncer"):
    """The ErrorResponse fields a raw md5 login (to the admin database by
    default) gets."""
    from tests.support import error_fields
    from pgcat_tw.auth import md5 as md5_auth

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(startup_packet(user, db))
        msgs, _ = read_messages(s, until=b"E")
        for t, body in msgs:
            if t == b"R" and body[:4] == b"\x00\x00\x00\x05":
                resp = md5_auth.client_response(user, password, body[4:8])
                payload = resp if resp.endswith(b"\x00") else resp + b"\x00"
                s.sendall(b"p" + (len(payload) + 4).to_bytes(4, "big") + payload)
                msgs, _ = read_messages(s, until=b"E")
            if t == b"R" and body[:4] == b"\x00\x00\x00\x0a":
                # SCRAM offered: answer with garbage is not what we test here.
                break
        for t, body in msgs:
            if t == b"E":
                return error_fields(body)
        return {}
    finally:
        s.close()


class PauseUnderLoadTests(PoolerTestCase, PgbenchMixin):
    pool_size = 2
    general = "connect_timeout = 2000"
    timeout = 120

    @defer.inlineCallbacks
    def test_pause_resume_during_pgbench_loses_nothing(self):
        yield self._init_pgbench()
        bench = self.pooler.pgbench("-S", "-n", "-c", "8", "-j", "2", "-T", "8")
        yield sleep(1.5)
        yield in_thread(admin, self.pooler.port, "PAUSE")
        # Longer than connect_timeout: paused clients wait, they do not fail.
        yield sleep(3.0)
        cols, pools = yield in_thread(admin, self.pooler.port, "SHOW POOLS")
        self.assertEqual(pools[0]["sv_active"], 0)
        yield in_thread(admin, self.pooler.port, "RESUME")
        out, err, code = yield bench
        self.assertEqual(code, 0, err)
        self.assertIn("number of failed transactions: 0 ", out.decode())


class AdminAuthTests(PoolerTestCase):
    """SCRAM for the admin user (the client picks it when the secret is a
    SCRAM one, or with admin_auth_type), and trust."""

    general = 'admin_auth_type = "scram-sha-256"'

    @defer.inlineCallbacks
    def test_scram_admin_login(self):
        cols, rows = yield in_thread(admin, self.pooler.port, "SHOW STATE")
        self.assertEqual(rows[0], {"key": "active", "value": "yes"})
        err = yield self.failUnlessFailure(
            in_thread(admin, self.pooler.port, "SHOW STATE", password="bad"), psycopg2.Error)
        self.assertIn("password authentication failed", str(err))

    @defer.inlineCallbacks
    def test_trust_admin_login(self):
        yield self.pooler.stop()
        yield self.start_pooler(general='admin_auth_type = "trust"')
        cols, rows = yield in_thread(admin, self.pooler.port, "SHOW STATE", password="")
        self.assertEqual(rows[0]["value"], "yes")


class DrainTests(PoolerTestCase):
    """A graceful shutdown (SIGINT's drain): the admin console keeps working
    and new admin sessions are accepted; other new clients get 57P03."""

    @defer.inlineCallbacks
    def test_admin_during_drain(self):
        conn = yield in_thread(admin_conn, self.pooler.port)
        self.addCleanup(in_thread, conn.close)
        holder = yield in_thread(psycopg.connect, self.pooler.dsn(), prepare_threshold=None)
        self.addCleanup(in_thread, holder.close)
        yield in_thread(holder.execute, "select 1")   # inside a transaction
        stopped = []
        self.pooler.service.drain(lambda: stopped.append(True))
        cur = conn.cursor()
        yield in_thread(cur.execute, "SHOW STATE")
        self.assertEqual((yield in_thread(cur.fetchall))[0], ("active", "no"))
        cols, rows = yield in_thread(admin, self.pooler.port, "SHOW CLIENTS")
        self.assertEqual(len(rows), 1)
        err = yield self.failUnlessFailure(
            in_thread(psycopg.connect, self.pooler.dsn()), psycopg.Error)
        self.assertIn("shutting down", str(err))
        yield in_thread(holder.rollback)
        for _ in range(100):
            if stopped:
                break
            yield sleep(0.05)
        # The admin session did not hold the shutdown up.
        self.assertEqual(stopped, [True])


class AccountingTests(PoolerTestCase):
    """Counts stay right where poolers get them wrong: whatever a client
    does, when it is gone cl_* and sv_* are as before it came."""

    pool_size = 2
    users = {"pgcat_md5": "pool_size = 2\nmin_pool_size = 2"}
    general = "connect_timeout = 1000"

    def pools(self):
        return in_thread(admin, self.pooler.port, "SHOW POOLS")

    @defer.inlineCallbacks
    def settled(self, expected, timeout=10.0):
        """SHOW POOLS's counts once they equal ``expected`` (or the last
        seen after ``timeout``: the janitor reopens what min_pool_size needs
        once a second)."""
        deadline = time.monotonic() + timeout
        while True:
            cols, rows = yield self.pools()
            counts = self.counts(rows[0])
            if counts == expected or time.monotonic() > deadline:
                return counts
            yield sleep(0.2)

    @staticmethod
    def counts(p):
        return {k: p[k] for k in ("cl_idle", "cl_active", "cl_waiting", "sv_active",
                                  "sv_idle", "sv_tested", "sv_login")}

    @defer.inlineCallbacks
    def baseline(self):
        expected = {"cl_idle": 0, "cl_active": 0, "cl_waiting": 0, "sv_active": 0,
                    "sv_idle": 2, "sv_tested": 0, "sv_login": 0}
        self.assertEqual((yield self.settled(expected)), expected)
        return expected

    @defer.inlineCallbacks
    def test_failed_logins_are_not_clients(self):
        expected = yield self.baseline()
        for pw in ("wrong", "also wrong"):
            yield self.failUnlessFailure(
                in_thread(psycopg.connect, self.pooler.dsn(password=pw)), psycopg.Error)
        cols, lists = yield in_thread(admin, self.pooler.port, "SHOW LISTS")
        items = {r["list"]: r["items"] for r in lists}
        self.assertEqual((items["used_clients"], items["free_clients"]), (0, 0))
        self.assertEqual((yield self.settled(expected)), expected)

    @defer.inlineCallbacks
    def test_sigkilled_client_mid_query(self):
        expected = yield self.baseline()
        env = self.pooler.env()
        proc = subprocess.Popen(
            ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.pooler.port), "-U", "pgcat_md5",
             "-d", "pgcat_test", "-c", "begin; select pg_sleep(30)"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        for _ in range(100):
            cols, rows = yield self.pools()
            if rows[0]["cl_active"] == 1:
                break
            yield sleep(0.1)
        self.assertEqual(rows[0]["cl_active"], 1)
        os.kill(proc.pid, signal.SIGKILL)
        yield in_thread(proc.wait)
        self.assertEqual((yield self.settled(expected)), expected)

    @defer.inlineCallbacks
    def test_client_gone_inside_a_transaction(self):
        expected = yield self.baseline()

        def go():
            conn = psycopg.connect(self.pooler.dsn(), prepare_threshold=None)
            conn.execute("create temp table if not exists gone (x int)")
            conn.execute("insert into gone values (1)")
            conn.pgconn.finish()   # no ROLLBACK, no Terminate: just gone

        yield in_thread(go)
        self.assertEqual((yield self.settled(expected)), expected)

    @defer.inlineCallbacks
    def test_client_timed_out_waiting(self):
        expected = yield self.baseline()
        holders = []
        for _ in range(2):
            c = yield in_thread(psycopg.connect, self.pooler.dsn(), prepare_threshold=None)
            yield in_thread(c.execute, "select 1")
            holders.append(c)
        def wait_in_vain():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                conn.execute("select 1")

        err = yield self.failUnlessFailure(in_thread(wait_in_vain), psycopg.Error)
        self.assertIn("pool exhausted", str(err))
        for c in holders:
            yield in_thread(c.close)
        self.assertEqual((yield self.settled(expected)), expected)


class ManyClientsOneServerTests(PoolerTestCase):
    pool_size = 1
    general = "connect_timeout = 20000"
    timeout = 180

    @defer.inlineCallbacks
    def test_forty_clients_leave_nothing_behind(self):
        def client(i):
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                for j in range(5):
                    conn.execute("select %s::int + %s::int", (i, j)).fetchone()

        yield defer.gatherResults([in_thread(client, i) for i in range(40)],
                                  consumeErrors=True)
        cols, pools = yield in_thread(admin, self.pooler.port, "SHOW POOLS")
        p = pools[0]
        self.assertEqual((p["cl_idle"], p["cl_active"], p["cl_waiting"]), (0, 0, 0))
        self.assertEqual((p["sv_active"], p["sv_idle"]), (0, 1))
        cols, clients = yield in_thread(admin, self.pooler.port, "SHOW CLIENTS")
        self.assertEqual(clients, [])
        cols, servers = yield in_thread(admin, self.pooler.port, "SHOW SERVERS")
        self.assertEqual([(s["type"], s["state"]) for s in servers], [("pool", "idle")])
        self.assertEqual(servers[0]["transaction_count"], 200)
        cols, stats = yield in_thread(admin, self.pooler.port, "SHOW STATS")
        self.assertEqual(stats[0]["total_xact_count"], 200)
        cols, totals = yield in_thread(admin, self.pooler.port, "SHOW STATS_TOTALS")
        self.assertEqual(totals[0]["xact_count"], 200)


from tests.test_replicas import ReplicaTestCase  # noqa: E402


class BanTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_ban_shows_in_bans_and_databases_then_unban(self):
        yield self.start_pooler()
        port = self.pooler.port
        target = f"127.0.0.1:{self.r1.port}"
        cols, rows = yield in_thread(admin, port, f"BAN {target} 120")
        self.assertEqual(rows, [{"db": "pgcat_test", "user": "pgcat_md5", "role": "replica",
                                 "host": target}])
        cols, bans = yield in_thread(admin, port, "SHOW BANS")
        self.assertEqual([(b["host"], b["role"], b["ban_duration_seconds"]) for b in bans],
                         [(target, "replica", 120)])
        self.assertGreater(bans[0]["ban_remaining_seconds"], 100)
        cols, dbs = yield in_thread(admin, port, "SHOW DATABASES")
        disabled = {(d["name"], d["port"]): d["disabled"] for d in dbs}
        self.assertEqual(disabled[("pgcat_test_shard_0_replica_0", str(self.r1.port))], 1)
        self.assertEqual(disabled[("pgcat_test_shard_0_replica_1", str(self.r2.port))], 0)
        self.assertEqual(disabled[("pgcat_test_shard_0_primary", str(self.primary.port))], 0)
        # Reads skip it while banned.
        ports = yield self.reads(10, setup=["SET SERVER ROLE TO 'replica'"])
        self.assertEqual(set(ports), {self.r2.port})
        yield in_thread(admin, port, f"UNBAN {target}")
        cols, bans = yield in_thread(admin, port, "SHOW BANS")
        self.assertEqual(bans, [])
