"""PgCat's plugins (issue 17): intercept, table_access, query_logger and
prewarmer (their pure parts: tests/test_plugins_unit.py), through real clients (psql, psycopg 3 in extended mode and in a
pipeline, asyncpg) against real PostgreSQL; a pool's plugins replace the
global ones; a reload enables and removes them for connected clients.
"""

import asyncio
import os

import asyncpg
import psycopg
from twisted.internet import defer, threads
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial import unittest

from tests.pgharness import USERS
from tests.support import PoolerTestCase, free_port, in_thread, pooler_toml
from tests.test_reload import FilePooler

PROBE = "select current_database() as a, current_schemas(false) as b"

PLUGINS = f"""
[pools.pgcat_test.plugins.query_logger]
enabled = true
[pools.pgcat_test.plugins.table_access]
enabled = true
tables = ["plugin_secret"]
[pools.pgcat_test.plugins.intercept]
enabled = true
[pools.pgcat_test.plugins.intercept.queries.0]
query = "{PROBE}"
schema = [["a", "text"], ["b", "text"]]
result = [["${{DATABASE}}", "{{public}}"]]
[pools.pgcat_test.plugins.intercept.queries.1]
query = "SELECT 'who'"
schema = [["user", "text"], ["n", "int4"], ["nothing", "text"]]
result = [["${{USER}}", "1", ""], ["again ${{USER}}", "2", "x"]]
[pools.pgcat_test.plugins.prewarmer]
enabled = true
queries = ["insert into plugin_prewarmed values (pg_backend_pid())"]
"""


class PluginTests(PoolerTestCase):
    # (TOML: the plugin tables may come before the pool's users and shards.)
    pool_extra = "query_parser_enabled = true\nprepared_statements_cache_size = 100\n" + PLUGINS

    @defer.inlineCallbacks
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        yield super().setUp()
        yield self.primary_sql(
            "create table if not exists plugin_secret (id int); "
            "create table if not exists plugin_prewarmed (pid int); "
            "grant all on plugin_secret, plugin_prewarmed to public")

    def logged(self):
        return [formatEvent(e) for e in self.events]

    def connect(self, **kw):
        return psycopg.connect(self.pooler.dsn(), autocommit=True, **kw)

    @defer.inlineCallbacks
    def test_psql_intercept_and_table_access(self):
        out, err, code = yield self.pooler.psql(PROBE)
        self.assertEqual((out.decode().strip(), code), ("pgcat_test|{public}", 0), err)
        out, err, code = yield self.pooler.psql("select 'who'")
        self.assertEqual(out.decode().splitlines(), ["pgcat_md5|1|", "again pgcat_md5|2|x"])
        out, err, code = yield self.pooler.psql(
            "with x as (select * from plugin_secret) select count(*) from x")
        self.assertEqual(code, 1)
        self.assertIn('permission for table "plugin_secret" denied', err.decode())
        out, err, code = yield self.pooler.psql("select count(*) from plugin_prewarmed")
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_psycopg_extended_unnamed_and_prepared(self):
        def go():
            with self.connect() as conn:
                seen = []
                for prepare in (False, True, True, True):
                    seen.append(conn.execute(PROBE, prepare=prepare).fetchall())
                who = conn.execute("select 'who'", prepare=True).fetchall()
                with conn.cursor() as cur:
                    cur.execute(PROBE)
                    names = [d.name for d in cur.description]
                try:
                    conn.execute("select id from plugin_secret where id = %s", (1,))
                    refused = None
                except psycopg.errors.InsufficientPrivilege as e:
                    refused = str(e)
                # The session goes on, inside a transaction too.
                with conn.transaction():
                    in_tx = conn.execute(PROBE).fetchall()
                    try:
                        with conn.transaction():
                            conn.execute("select * from plugin_secret")
                    except psycopg.errors.InsufficientPrivilege:
                        pass
                    ok = conn.execute("select 41 + %s", (1,)).fetchone()[0]
                return seen, who, names, refused, in_tx, ok

        seen, who, names, refused, in_tx, ok = yield in_thread(go)
        self.assertEqual(seen, [[("pgcat_test", "{public}")]] * 4)
        self.assertEqual(who, [("pgcat_md5", 1, None), ("again pgcat_md5", 2, "x")])
        self.assertEqual(names, ["a", "b"])
        self.assertIn('permission for table "plugin_secret" denied', refused)
        self.assertEqual(in_tx, [("pgcat_test", "{public}")])
        self.assertEqual(ok, 42)

    @defer.inlineCallbacks
    def test_custom_commands_pass_table_access(self):
        """PgCat's own SQL is not read by the parser: it is answered; what
        follows it in a multi-statement string is still checked."""
        def go():
            with self.connect(prepare_threshold=None) as conn:
                conn.execute("SET SERVER ROLE TO 'primary'")
                role = conn.execute("SHOW SERVER ROLE").fetchone()[0]
                r = conn.pgconn.exec_(b"SET SHARD TO '0'; select * from plugin_secret")
                return role, r.error_message
        role, error = yield in_thread(go)
        self.assertEqual(role, "primary")
        self.assertIn(b'permission for table "plugin_secret" denied', error)

    @defer.inlineCallbacks
    def test_pipelined_refusal_keeps_order(self):
        def go():
            with self.connect() as conn:
                with conn.pipeline() as p:
                    c1 = conn.execute("select 1")
                    conn.execute("select * from plugin_secret")
                    try:
                        p.sync()
                    except psycopg.errors.InsufficientPrivilege as e:
                        err = str(e)
                    first = c1.fetchone()[0]
                return first, err, conn.execute("select 2").fetchone()[0]

        first, err, after = yield in_thread(go)
        self.assertEqual((first, after), (1, 2))
        self.assertIn('permission for table "plugin_secret" denied', err)

    @defer.inlineCallbacks
    def test_asyncpg(self):
        async def go():
            conn = await asyncpg.connect(host="127.0.0.1", port=self.pooler.port,
                                         user="pgcat_md5", password=USERS["pgcat_md5"],
                                         database="pgcat_test", ssl=False,
                                         statement_cache_size=0)
            try:
                rows = [tuple(r) for r in await conn.fetch(PROBE)]
                again = [tuple(r) for r in await conn.fetch(PROBE)]
                try:
                    await conn.fetch("select * from plugin_secret where id = $1", 1)
                    refused = None
                except asyncpg.InsufficientPrivilegeError as e:
                    refused = str(e)
                return rows, again, refused, await conn.fetchval("select 7")
            finally:
                await conn.close()

        rows, again, refused, seven = yield in_thread(lambda: asyncio.run(go()))
        self.assertEqual(rows, [("pgcat_test", "{public}")])
        self.assertEqual(again, rows)
        self.assertIn("plugin_secret", refused)
        self.assertEqual(seven, 7)

    @defer.inlineCallbacks
    def test_query_logger_logs_queries_never_parameters(self):
        def go():
            with self.connect() as conn:
                conn.execute("select %s::text as logged_query", ("param-value-4711",))
        yield in_thread(go)
        lines = [line for line in self.logged() if "logged_query" in line]
        self.assertTrue(lines)
        self.assertTrue(lines[0].startswith("[pool: pgcat_test][user: pgcat_md5] select $1"),
                        lines[0])
        events = [e for e in self.events if "logged_query" in formatEvent(e)]
        self.assertEqual((events[0]["pool"], events[0]["user"]), ("pgcat_test", "pgcat_md5"))
        self.assertFalse([line for line in self.logged() if "param-value-4711" in line])

    @defer.inlineCallbacks
    def test_prewarmer_runs_on_every_new_server_connection(self):
        def go():
            pids = set()
            conns = [self.connect() for _ in range(2)]
            try:
                for c in conns:
                    c.execute("begin")
                for c in conns:
                    pids.add(c.execute("select pg_backend_pid()").fetchone()[0])
                for c in conns:
                    c.execute("commit")
            finally:
                for c in conns:
                    c.close()
            return pids

        pids = yield in_thread(go)
        self.assertEqual(len(pids), 2)
        warmed = yield self.primary_sql("select string_agg(pid::text, ',') from plugin_prewarmed")
        self.assertTrue(pids <= {int(p) for p in warmed.split(",")}, (pids, warmed))

    @defer.inlineCallbacks
    def test_messages_split_across_chunks(self):
        """A Query cut anywhere, a header cut in two, and an intercepted
        extended group sent a byte at a time: each still goes through the
        plugins (raw socket, md5 login)."""
        import time
        from tests import test_bad_input as raw
        from tests.support import error_fields, read_messages

        def go():
            sock = raw.login(self.pooler.port, "pgcat_md5", USERS["pgcat_md5"], "pgcat_test")
            try:
                q = raw.query_msg("select * from plugin_secret")
                for cut in (1, 3, 9, len(q) - 1):
                    sock.sendall(q[:cut])
                    time.sleep(0.05)
                    sock.sendall(q[cut:])
                    msgs, _ = read_messages(sock)
                    assert msgs[0][0] == b"E", msgs
                    assert error_fields(msgs[0][1])["C"] == "42501", msgs
                # A refused Query and a good one in one write: both answered, in order.
                sock.sendall(q + raw.query_msg("select 7"))
                msgs, _ = read_messages(sock)
                assert [t for t, _ in msgs] == [b"E", b"Z"], msgs
                msgs, _ = read_messages(sock)
                assert raw.data_rows(msgs) == [["7"]], msgs
                name = PROBE.encode()
                group = (b"P" + (len(name) + 8).to_bytes(4, "big") + b"\0" + name + b"\0\0\0"
                         + b"B\0\0\0\x0c\0\0\0\0\0\0\0\0" + b"E\0\0\0\x09\0\0\0\0\0"
                         + b"S\0\0\0\x04")
                for i in range(len(group)):
                    sock.sendall(group[i:i + 1])
                msgs, _ = read_messages(sock)
                return [t for t, _ in msgs], raw.data_rows(msgs)
            finally:
                sock.close()

        types, rows = yield in_thread(go)
        self.assertEqual(types, [b"1", b"2", b"D", b"C", b"Z"])
        self.assertEqual(rows, [["pgcat_test", "{public}"]])

    def test_clients_of_pools_without_plugins_pay_nothing(self):
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        self.assertIsNotNone(up.plugins)
        return in_thread(self._check_entries)

    def _check_entries(self):
        with self.connect():
            (client,) = [c for c in self.pooler.service.factory.clients]
            self.assertEqual(client.dataReceived, client._plugin_data)


class NoPluginTests(PoolerTestCase):
    pool_extra = "query_parser_enabled = true\n"

    def test_work_data_directly(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True):
                (client,) = list(self.pooler.service.factory.clients)
                return client.dataReceived == client._work_data, client.user_pool.plugins
        return in_thread(go).addCallback(self.assertEqual, (True, None))


class PluginScopeAndReloadTests(unittest.TestCase):
    """Global plugins, a pool's own table replacing them, and a reload."""

    timeout = 120

    def toml(self, pool_plugins=""):
        from tests.pgharness import topology
        text = pooler_toml(self.port, [(topology().primary.port, "primary")],
                           pool_extra="query_parser_enabled = true")
        head, pools = text.split("[pools.", 1)
        return (head + '[plugins.table_access]\nenabled = true\ntables = ["plugin_secret"]\n'
                + "[pools." + pools + pool_plugins)

    @defer.inlineCallbacks
    def setUp(self):
        from tests.pgharness import topology
        yield threads.deferToThread(topology)
        yield threads.deferToThread(
            topology().primary.psql, "create table if not exists plugin_secret (id int); "
            "grant all on plugin_secret to public", db="pgcat_test")
        self.port = free_port()
        self.path = os.path.abspath(self.mktemp()) + ".toml"
        self.pooler = yield FilePooler(self.path, self.toml()).start()
        self.addCleanup(self.pooler.stop)

    def refused(self, conn):
        try:
            conn.execute("select count(*) from plugin_secret")
            return False
        except psycopg.errors.InsufficientPrivilege:
            return True

    @defer.inlineCallbacks
    def test_pool_table_replaces_global_and_reload_applies(self):
        conn = yield in_thread(psycopg.connect, self.pooler.dsn(), autocommit=True)
        self.addCleanup(conn.close)
        self.assertTrue((yield in_thread(self.refused, conn)))      # the global set
        # The pool's own [plugins] (only the logger) replaces the global one.
        self.pooler.write(self.toml(
            "[pools.pgcat_test.plugins.query_logger]\nenabled = true\n"))
        self.assertIsNone(self.pooler.service.reload_problem())
        self.assertFalse((yield in_thread(self.refused, conn)))
        # Back to the global table_access, for the same connected client.
        self.pooler.write(self.toml())
        self.assertIsNone(self.pooler.service.reload_problem())
        self.assertTrue((yield in_thread(self.refused, conn)))
        # No plugins at all: the client goes back to the plain entry.
        self.pooler.write(self.toml().replace("enabled = true", "enabled = false", 1))
        self.assertIsNone(self.pooler.service.reload_problem())
        self.assertFalse((yield in_thread(self.refused, conn)))
        (client,) = list(self.pooler.service.factory.clients)
        self.assertEqual(client.dataReceived, client._work_data)
