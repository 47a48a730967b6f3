"""The PostgreSQL test harness itself: servers answer, auth methods are the
ones the pooler tests rely on, replicas stream, nodes survive kill/restart."""

import time
import uuid

import psycopg
from twisted.trial import unittest

from tests import pgharness
from tests.pgharness import USERS, topology


def _connect(node, user, password, dbname="pgcat_test"):
    kw = dict(host=node.host, port=node.port, user=user, dbname=dbname,
              connect_timeout=10, autocommit=True)
    if password is not None:
        kw["password"] = password
    return psycopg.connect(**kw)


class PrimaryTests(unittest.TestCase):
    def test_primary_answers(self):
        topo = topology()
        self.assertIs(topology(), topo)
        p = topo.primary
        self.assertTrue(p.is_running())
        self.assertEqual(p.host, "127.0.0.1")
        self.assertEqual(p.psql("select 1"), "1")
        self.assertEqual(p.psql("select pg_is_in_recovery()"), "f")
        dbs = set(p.psql("select datname from pg_database").split("\n"))
        self.assertTrue({"pgcat_test", "shard0", "shard1", "shard2"} <= dbs)
        with psycopg.connect(p.dsn()) as conn:
            self.assertEqual(conn.execute("select current_user").fetchone()[0], "postgres")

    def test_psql_error(self):
        p = topology().primary
        with self.assertRaises(RuntimeError) as cm:
            p.psql("select * from no_such_table")
        self.assertIn("no_such_table", str(cm.exception))

    def test_users_login(self):
        p = topology().primary
        methods = {}
        for user, pw in USERS.items():
            with _connect(p, user, pw) as conn:
                self.assertEqual(conn.execute("select current_user").fetchone()[0], user)
                # every user may create objects in pgcat_test
                conn.execute(f"create temp table t_{user} (x int)")
            dsn = p.dsn(user=user, db="shard1", password=pw)
            with psycopg.connect(dsn) as conn:
                self.assertEqual(conn.execute("select current_database()").fetchone()[0], "shard1")
            self.assertEqual(p.psql("select current_user", db="shard2", user=user), user)
            methods[user] = p.psql(
                "select auth_method from pg_hba_file_rules "
                f"where {pgharness._sql_lit(user)} = any(user_name)"
            )
        self.assertEqual(methods, {
            "pgcat_md5": "md5", "pgcat_scram": "scram-sha-256",
            "pgcat_clear": "password", "pgcat_trust": "trust",
        })
        stored = dict(
            line.split("|") for line in p.psql(
                "select rolname, left(coalesce(rolpassword, ''), 14) from pg_authid "
                "where rolname like 'pgcat_%'").split("\n")
        )
        self.assertTrue(stored["pgcat_md5"].startswith("md5"))
        self.assertEqual(stored["pgcat_scram"], "SCRAM-SHA-256$")
        self.assertEqual(stored["pgcat_clear"], "SCRAM-SHA-256$")
        self.assertEqual(stored["pgcat_trust"], "")

    def test_wrong_password_fails(self):
        p = topology().primary
        for user, pw in USERS.items():
            if pw is None:
                continue
            with self.assertRaises(psycopg.OperationalError, msg=user) as cm:
                _connect(p, user, pw + "x")
            self.assertIn("password authentication failed", str(cm.exception))
        # unknown users are rejected by the final pg_hba line
        with self.assertRaises(psycopg.OperationalError):
            _connect(p, "nobody", "x")

    def test_kill_restart(self):
        p = topology().primary
        conn = psycopg.connect(p.dsn(), autocommit=True)
        try:
            p.kill()
            self.assertFalse(p.is_running())
            with self.assertRaises(psycopg.OperationalError):
                conn.execute("select 1")
        finally:
            conn.close()
        p.start()
        self.assertTrue(p.is_running())
        self.assertEqual(p.psql("select 1"), "1")
        port = p.port
        p.restart()
        self.assertEqual(p.port, port)
        self.assertEqual(p.psql("select 2"), "2")
        p.stop()
        self.assertFalse(p.is_running())
        # topology() brings a stopped primary back
        self.assertTrue(topology().primary.is_running())


class ReplicaTests(unittest.TestCase):
    def test_replica_streams(self):
        topo = topology(replicas=1)
        # (Other tests of the run may have asked for more replicas.)
        self.assertGreaterEqual(len(topo.replicas), 1)
        count = len(topo.replicas)
        r = topo.replicas[0]
        self.assertNotEqual(r.port, topo.primary.port)
        self.assertEqual(r.psql("select pg_is_in_recovery()"), "t")
        tag = uuid.uuid4().hex
        topo.primary.psql(
            "create table if not exists harness_repl (tag text); "
            f"insert into harness_repl values ('{tag}')",
            db="pgcat_test", user="pgcat_md5",
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                got = r.psql(f"select count(*) from harness_repl where tag = '{tag}'",
                             db="pgcat_test")
            except RuntimeError:  # table not replayed yet
                got = "0"
            if got == "1":
                break
            self.assertLess(time.monotonic(), deadline, "row not replicated")
            time.sleep(0.05)
        with self.assertRaises(psycopg.errors.ReadOnlySqlTransaction):
            with psycopg.connect(r.dsn(user="pgcat_scram", db="pgcat_test",
                                       password=USERS["pgcat_scram"])) as conn:
                conn.execute("insert into harness_repl values ('x')")
        self.assertIs(topology(replicas=1), topo)
        self.assertEqual(len(topo.replicas), count)  # asking again adds none
