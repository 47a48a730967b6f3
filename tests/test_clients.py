"""Protocol coverage through the pooler with real client libraries
(psycopg 3, asyncpg, psycopg2) against the run's real PostgreSQL primary.

Most tests live in ``ClientTestsMixin`` and run in both transaction and
session mode. Blocking clients run in the reactor's thread pool
(``in_thread``) so that the pooler, which runs in trial's reactor, keeps
serving; asyncpg runs its own event loop inside such a thread.

psycopg 3 connections use ``prepare_threshold=None`` in transaction mode:
its automatic server-side prepared statements are named and do not survive
a transaction boundary (the pooler resets the server with DISCARD ALL), the
same restriction PgBouncer/PgCat place on clients without prepared
statement support.
"""

import asyncio
import concurrent.futures
import io
import threading
import uuid

import asyncpg
import psycopg
import psycopg2
from psycopg import errors as pgerr
from twisted.internet import defer

from tests.pgharness import USERS
from tests.support import PoolerTestCase, in_thread


def unique(prefix="t"):
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


class ClientTestMixin:
    """Helpers shared by the test classes of this module."""

    def pg(self, autocommit=True, **extra):
        """A psycopg 3 connection through the pooler (call in a thread)."""
        kw = {}
        if self.pool_mode == "transaction":
            kw["prepare_threshold"] = None
        return psycopg.connect(self.pooler.dsn(**extra), autocommit=autocommit, **kw)

    @defer.inlineCallbacks
    def make_table(self, cols="a int, b text"):
        """A fresh table owned by the test user, dropped after the test."""
        name = unique()
        yield self.primary_sql(f"CREATE TABLE {name} ({cols}); "
                               f"ALTER TABLE {name} OWNER TO pgcat_md5")
        self.addCleanup(self.primary_sql, f"DROP TABLE IF EXISTS {name}")
        return name

    def asyncpg_kwargs(self, **kw):
        base = dict(host="127.0.0.1", port=self.pooler.port, user="pgcat_md5",
                    password=USERS["pgcat_md5"], database="pgcat_test", ssl=False,
                    timeout=10)
        base.update(kw)
        return base


class ClientTestsMixin(ClientTestMixin):
    """Behaviour that must hold in both pool modes."""

    # --- psycopg 3: basics ---------------------------------------------------

    @defer.inlineCallbacks
    def test_psycopg_autocommit_queries(self):
        def run():
            with self.pg() as conn:
                out = [conn.execute("select 40 + 2").fetchone()[0]]
                out.append(conn.execute("select %s::text || %s::text", ("a", "b")).fetchone()[0])
                out.append(conn.execute("select count(*) from generate_series(1, 1000)")
                           .fetchone()[0])
                out.append(conn.info.transaction_status)
                return out

        out = yield in_thread(run)
        self.assertEqual(out, [42, "ab", 1000, psycopg.pq.TransactionStatus.IDLE])

    @defer.inlineCallbacks
    def test_psycopg_commit_and_rollback(self):
        t = yield self.make_table()

        def run():
            with self.pg(autocommit=False) as conn:
                conn.execute(f"insert into {t} values (1, 'committed')")
                in_tx = conn.info.transaction_status
                conn.commit()
                conn.execute(f"insert into {t} values (2, 'rolled back')")
                # Visible inside its own transaction...
                inside = conn.execute(f"select count(*) from {t}").fetchone()[0]
                conn.rollback()
            # ...and afterwards only the committed row, seen from another client.
            with self.pg() as other:
                rows = other.execute(f"select a, b from {t} order by a").fetchall()
            return in_tx, inside, rows

        in_tx, inside, rows = yield in_thread(run)
        self.assertEqual(in_tx, psycopg.pq.TransactionStatus.INTRANS)
        self.assertEqual(inside, 2)
        self.assertEqual(rows, [(1, "committed")])
        direct = yield self.primary_sql(f"select string_agg(a::text, ',') from {t}")
        self.assertEqual(direct, "1")

    @defer.inlineCallbacks
    def test_psycopg_uncommitted_data_invisible_to_others(self):
        t = yield self.make_table()

        def run():
            with self.pg(autocommit=False) as a, self.pg() as b:
                a.execute(f"insert into {t} values (1, 'x')")
                seen_before = b.execute(f"select count(*) from {t}").fetchone()[0]
                a.commit()
                seen_after = b.execute(f"select count(*) from {t}").fetchone()[0]
                return seen_before, seen_after

        self.assertEqual((yield in_thread(run)), (0, 1))

    @defer.inlineCallbacks
    def test_psycopg_error_outside_transaction(self):
        def run():
            with self.pg() as conn:
                try:
                    conn.execute("select 1/0")
                except pgerr.DivisionByZero as e:
                    err = e.sqlstate
                else:
                    err = None
                try:
                    conn.execute("select * from no_such_table_here")
                except pgerr.UndefinedTable as e:
                    err2 = e.sqlstate
                else:
                    err2 = None
                return err, err2, conn.execute("select 'still fine'").fetchone()[0]

        self.assertEqual((yield in_thread(run)), ("22012", "42P01", "still fine"))

    @defer.inlineCallbacks
    def test_psycopg_error_inside_transaction(self):
        t = yield self.make_table()

        def run():
            out = []
            with self.pg(autocommit=False) as conn:
                conn.execute(f"insert into {t} values (1, 'lost')")
                try:
                    conn.execute("select 1/0")
                except pgerr.DivisionByZero:
                    out.append("div0")
                out.append(conn.info.transaction_status)
                try:
                    conn.execute("select 1")
                except pgerr.InFailedSqlTransaction as e:
                    out.append(e.sqlstate)
                conn.rollback()
                out.append(conn.execute("select 2").fetchone()[0])
                conn.commit()
                out.append(conn.execute(f"select count(*) from {t}").fetchone()[0])
            return out

        out = yield in_thread(run)
        self.assertEqual(out, ["div0", psycopg.pq.TransactionStatus.INERROR, "25P02", 2, 0])

    @defer.inlineCallbacks
    def test_psycopg_multi_statement_string(self):
        t = yield self.make_table("a int")

        def run():
            with self.pg() as conn:
                cur = conn.cursor()
                # No parameters: psycopg sends this as one simple Query.
                cur.execute(f"insert into {t} values (1); insert into {t} values (2), (3); "
                            f"select sum(a) from {t}; select 'last'")
                results = []
                while True:
                    results.append(cur.fetchall() if cur.description else cur.statusmessage)
                    if not cur.nextset():
                        break
                # A multi-statement string is one implicit transaction.
                try:
                    conn.execute(f"insert into {t} values (10); select 1/0")
                except pgerr.DivisionByZero:
                    failed = True
                else:
                    failed = False
                total = conn.execute(f"select sum(a) from {t}").fetchone()[0]
                return results, failed, total

        results, failed, total = yield in_thread(run)
        self.assertEqual(results, ["INSERT 0 1", "INSERT 0 2", [(6,)], [("last",)]])
        self.assertTrue(failed)
        self.assertEqual(total, 6)

    @defer.inlineCallbacks
    def test_psycopg_extended_protocol_unprepared(self):
        def run():
            with self.pg() as conn:
                cur = conn.cursor()
                out = []
                for i in range(20):
                    cur.execute("select %s::int * 2, %s::text", (i, f"v{i}"), prepare=False)
                    out.append(cur.fetchone())
                cur.execute("select %s::int", (None,), prepare=False)
                out.append(cur.fetchone())
                # binary parameters and results
                cur = conn.cursor(binary=True)
                cur.execute("select %b::bytea", (b"\x00\x01\xff",), prepare=False)
                out.append(cur.fetchone())
                return out

        out = yield in_thread(run)
        self.assertEqual(out[:20], [(i * 2, f"v{i}") for i in range(20)])
        self.assertEqual(out[20], (None,))
        self.assertEqual(out[21], (b"\x00\x01\xff",))

    @defer.inlineCallbacks
    def test_psycopg_executemany(self):
        t = yield self.make_table()

        def run():
            with self.pg() as conn:
                conn.cursor().executemany(f"insert into {t} values (%s, %s)",
                                          [(i, f"r{i}") for i in range(100)])
                return conn.execute(f"select count(*), sum(a) from {t}").fetchone()

        self.assertEqual((yield in_thread(run)), (100, sum(range(100))))

    # --- pipeline mode (Flush/Sync paths) --------------------------------------

    @defer.inlineCallbacks
    def test_psycopg_pipeline(self):
        t = yield self.make_table()

        def run():
            with self.pg() as conn:
                with conn.pipeline() as p:
                    c1 = conn.execute("select 1")
                    c2 = conn.execute("select %s::int + 1", (1,))
                    c3 = conn.execute(f"insert into {t} values (%s, %s)", (1, "one"))
                    # Results are fetched with a Flush before any Sync.
                    r1 = c1.fetchone()
                    p.sync()
                    r2 = c2.fetchone()
                    conn.execute(f"insert into {t} values (%s, %s)", (2, "two"))
                    c4 = conn.execute(f"select count(*) from {t}")
                r4 = c4.fetchone()
                after = conn.execute("select 'after'").fetchone()[0]
                return r1, r2, c3.rowcount, r4, after

        self.assertEqual((yield in_thread(run)), ((1,), (2,), 1, (2,), "after"))

    @defer.inlineCallbacks
    def test_psycopg_pipeline_with_error(self):
        t = yield self.make_table()

        def run():
            out = {}
            with self.pg() as conn:
                try:
                    with conn.pipeline() as p:
                        conn.execute(f"insert into {t} values (%s, 'kept')", (1,))
                        p.sync()
                        conn.execute(f"insert into {t} values (%s, 'aborted')", (2,))
                        conn.execute("select 1/0")
                        conn.execute(f"insert into {t} values (%s, 'skipped')", (3,))
                        p.sync()
                        conn.execute(f"insert into {t} values (%s, 'never')", (4,))
                except pgerr.DivisionByZero:
                    out["error"] = "div0"
                out["status"] = conn.info.transaction_status
                out["rows"] = conn.execute(f"select a from {t} order by a").fetchall()
                # The connection keeps working, in and out of pipeline mode.
                with conn.pipeline():
                    c = conn.execute("select %s::text", ("ok",))
                out["again"] = c.fetchone()[0]
            return out

        out = yield in_thread(run)
        self.assertEqual(out["error"], "div0")
        self.assertEqual(out["status"], psycopg.pq.TransactionStatus.IDLE)
        self.assertEqual(out["rows"], [(1,)])
        self.assertEqual(out["again"], "ok")

    @defer.inlineCallbacks
    def test_psycopg_pipeline_in_transaction(self):
        t = yield self.make_table()

        def run():
            with self.pg(autocommit=False) as conn:
                with conn.pipeline() as p:
                    for i in range(50):
                        conn.execute(f"insert into {t} values (%s, 'p')", (i,))
                    p.sync()
                    c = conn.execute(f"select count(*) from {t}")
                n_inside = c.fetchone()[0]
                conn.rollback()
                n_after = conn.execute(f"select count(*) from {t}").fetchone()[0]
                conn.rollback()
                return n_inside, n_after

        self.assertEqual((yield in_thread(run)), (50, 0))

    # --- server-side cursor ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_psycopg_server_side_cursor(self):
        def run():
            chunks = []
            with self.pg(autocommit=False) as conn:
                with conn.transaction():
                    with conn.cursor(name="ssc_" + uuid.uuid4().hex[:6]) as cur:
                        cur.execute("select g, repeat('y', 10) from generate_series(1, 1000) g")
                        while True:
                            rows = cur.fetchmany(128)
                            if not rows:
                                break
                            chunks.append(rows)
                status = conn.info.transaction_status
                again = conn.execute("select 'next'").fetchone()[0]
                conn.commit()
            return chunks, status, again

        chunks, status, again = yield in_thread(run)
        self.assertEqual([len(c) for c in chunks], [128] * 7 + [104])
        rows = [r for c in chunks for r in c]
        self.assertEqual([r[0] for r in rows], list(range(1, 1001)))
        self.assertEqual(rows[0][1], "y" * 10)
        self.assertEqual(status, psycopg.pq.TransactionStatus.IDLE)
        self.assertEqual(again, "next")

    # --- NOTICE / NOTIFY ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_notice_pass_through(self):
        def run():
            notices = []
            with self.pg() as conn:
                conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
                conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
                conn.execute("DO $$ BEGIN RAISE WARNING 'careful %', 'now'; END $$")
                follow = conn.execute("select 1").fetchone()[0]
            return notices, follow

        notices, follow = yield in_thread(run)
        self.assertEqual(notices, [("NOTICE", "hello 42"), ("WARNING", "careful now")])
        self.assertEqual(follow, 1)

    @defer.inlineCallbacks
    def test_notify_within_own_transaction(self):
        channel = unique("ch")

        def run():
            got = []
            with self.pg(autocommit=False) as conn:
                conn.add_notify_handler(lambda n: got.append((n.channel, n.payload)))
                conn.execute(f"LISTEN {channel}")
                conn.execute(f"NOTIFY {channel}, 'x'")
                conn.commit()   # delivered with the COMMIT's answer
                conn.execute("select 1")
                conn.commit()
            return got

        self.assertEqual((yield in_thread(run)), [(channel, "x")])

    # --- COPY ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_copy_from_stdin(self):
        t = yield self.make_table()

        def run():
            with self.pg() as conn:
                cur = conn.cursor()
                with cur.copy(f"COPY {t} (a, b) FROM STDIN") as copy:
                    for i in range(10000):
                        copy.write_row((i, f"row {i}\tx"))
                n = cur.rowcount
                agg = conn.execute(f"select count(*), sum(a), max(b) from {t}").fetchone()
                return n, agg

        n, agg = yield in_thread(run)
        self.assertEqual(n, 10000)
        self.assertEqual(agg, (10000, sum(range(10000)), "row 9999\tx"))

    @defer.inlineCallbacks
    def test_copy_to_stdout(self):
        def run():
            with self.pg() as conn:
                cur = conn.cursor()
                with cur.copy("COPY (select g, 'v' || g, null from generate_series(1, 5000) g) "
                              "TO STDOUT") as copy:
                    rows = list(copy.rows())
                # raw bytes, CSV format
                data = bytearray()
                with cur.copy("COPY (select g from generate_series(1, 3) g) TO STDOUT "
                              "(FORMAT csv)") as copy:
                    for block in copy:
                        data += block
                return rows, bytes(data), conn.execute("select 'ok'").fetchone()[0]

        rows, data, ok = yield in_thread(run)
        self.assertEqual(rows, [(str(g), f"v{g}", None) for g in range(1, 5001)])
        self.assertEqual(data, b"1\n2\n3\n")
        self.assertEqual(ok, "ok")

    @defer.inlineCallbacks
    def test_copy_with_bad_data(self):
        t = yield self.make_table()

        def run():
            with self.pg() as conn:
                cur = conn.cursor()
                try:
                    with cur.copy(f"COPY {t} (a, b) FROM STDIN") as copy:
                        copy.write(b"1\tfine\nnot_an_int\tbad\n3\tfine\n")
                except pgerr.InvalidTextRepresentation as e:
                    err = e.sqlstate
                else:
                    err = None
                status = conn.info.transaction_status
                count = conn.execute(f"select count(*) from {t}").fetchone()[0]
                # and COPY works again on the same connection
                with cur.copy(f"COPY {t} (a, b) FROM STDIN") as copy:
                    copy.write_row((7, "seven"))
                rows = conn.execute(f"select a, b from {t}").fetchall()
                return err, status, count, rows

        err, status, count, rows = yield in_thread(run)
        self.assertEqual(err, "22P02")
        self.assertEqual(status, psycopg.pq.TransactionStatus.IDLE)
        self.assertEqual(count, 0)
        self.assertEqual(rows, [(7, "seven")])

    # --- concurrency ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_concurrent_transactions(self):
        t = yield self.make_table("thread int, i int, pid int")
        threads, per_thread = 8, 50

        def worker(n):
            pids = set()
            with self.pg(autocommit=False) as conn:
                for i in range(per_thread):
                    with conn.transaction():
                        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
                        conn.execute(f"insert into {t} values (%s, %s, %s)", (n, i, pid))
                        pids.add(pid)
            return pids

        def run():
            with concurrent.futures.ThreadPoolExecutor(threads) as ex:
                return list(ex.map(worker, range(threads)))

        per = yield in_thread(run)
        all_pids = set().union(*per)
        self.assertLessEqual(len(all_pids), self.pool_size, all_pids)
        if self.pool_mode == "session":
            # A session keeps its server for its whole life.
            self.assertEqual([len(p) for p in per], [1] * threads)
        out = yield self.primary_sql(
            f"select count(*), count(distinct (thread, i)), count(distinct pid) from {t}")
        count, distinct, npids = map(int, out.split("|"))
        self.assertEqual((count, distinct), (threads * per_thread, threads * per_thread))
        self.assertEqual(npids, len(all_pids))

    # --- asyncpg ----------------------------------------------------------------------------

    def asyncpg_options(self):
        """Transaction mode needs asyncpg's statement cache off; session mode
        works with its default (named, cached statements)."""
        return {"statement_cache_size": 0} if self.pool_mode == "transaction" else {}

    @defer.inlineCallbacks
    def test_asyncpg_concurrent_fetchval(self):
        kw = self.asyncpg_kwargs(**self.asyncpg_options())
        ntasks = 32 if self.pool_mode == "transaction" else 8

        async def one(i):
            conn = await asyncpg.connect(**kw)
            try:
                out = []
                for j in range(3):
                    out.append(await conn.fetchval("select $1::int + 1", i * 10 + j))
                return out
            finally:
                await conn.close()

        async def main():
            return await asyncio.gather(*(one(i) for i in range(ntasks)))

        res = yield in_thread(asyncio.run, main())
        self.assertEqual(res, [[i * 10 + j + 1 for j in range(3)] for i in range(ntasks)])

    @defer.inlineCallbacks
    def test_asyncpg_transaction_and_copy(self):
        t = yield self.make_table()
        kw = self.asyncpg_kwargs(**self.asyncpg_options())

        async def main():
            out = {}
            conn = await asyncpg.connect(**kw)
            try:
                tr = conn.transaction()
                await tr.start()
                await conn.execute(f"insert into {t} values ($1, $2)", 1, "rolled back")
                out["inside"] = await conn.fetchval(f"select count(*) from {t}")
                await tr.rollback()
                out["after_rollback"] = await conn.fetchval(f"select count(*) from {t}")
                async with conn.transaction():
                    await conn.execute(f"insert into {t} values ($1, $2)", 2, "committed")
                out["after_commit"] = await conn.fetchval(f"select count(*) from {t}")
                try:
                    async with conn.transaction():
                        await conn.execute(f"insert into {t} values ($1, $2)", 3, "boom")
                        await conn.execute("select 1/0")
                except asyncpg.DivisionByZeroError:
                    out["error"] = True
                res = await conn.copy_records_to_table(
                    t, records=[(i, f"c{i}") for i in range(100, 1100)], columns=["a", "b"])
                out["copy_in"] = res
                buf = io.BytesIO()
                await conn.copy_from_query(
                    f"select a, b from {t} where a >= $1 order by a", 100, output=buf)
                out["copy_out"] = buf.getvalue()
                out["rows"] = await conn.fetch(f"select a from {t} where a < 100 order by a")
            finally:
                await conn.close()
            return out

        out = yield in_thread(asyncio.run, main())
        self.assertEqual(out["inside"], 1)
        self.assertEqual(out["after_rollback"], 0)
        self.assertEqual(out["after_commit"], 1)
        self.assertTrue(out.get("error"))
        self.assertEqual(out["copy_in"], "COPY 1000")
        expected = "".join(f"{i}\tc{i}\n" for i in range(100, 1100)).encode()
        self.assertEqual(out["copy_out"], expected)
        self.assertEqual([r["a"] for r in out["rows"]], [2])

    # --- psycopg2 ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_psycopg2_smoke(self):
        t = yield self.make_table()

        def run():
            conn = psycopg2.connect(self.pooler.dsn())
            try:
                cur = conn.cursor()
                cur.execute("select %s + 1, %s", (41, "x"))
                first = cur.fetchone()
                cur.execute(f"insert into {t} values (%s, %s)", (1, "kept"))
                conn.commit()
                cur.execute(f"insert into {t} values (%s, %s)", (2, "dropped"))
                conn.rollback()
                try:
                    cur.execute("select 1/0")
                except psycopg2.errors.DivisionByZero:
                    conn.rollback()
                    err = True
                else:
                    err = False
                cur.execute(f"select a, b from {t}")
                rows = cur.fetchall()
                conn.commit()
                conn.autocommit = True
                cur.execute("select current_database()")
                db = cur.fetchone()[0]
                return first, err, rows, db
            finally:
                conn.close()

        first, err, rows, db = yield in_thread(run)
        self.assertEqual(first, (42, "x"))
        self.assertTrue(err)
        self.assertEqual(rows, [(1, "kept")])
        self.assertEqual(db, "pgcat_test")

    # --- ParameterStatus -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_parameter_status_from_real_server(self):
        version = yield self.primary_sql("show server_version")

        def run():
            with self.pg() as conn:
                ps = conn.info.parameter_status
                return {k: ps(k) for k in ("server_version", "integer_datetimes",
                                           "server_encoding", "client_encoding",
                                           "standard_conforming_strings", "DateStyle",
                                           "TimeZone")}, conn.info.server_version

        ps, numeric = yield in_thread(run)
        self.assertEqual(ps["server_version"], version)
        self.assertEqual(ps["integer_datetimes"], "on")
        self.assertEqual(ps["server_encoding"], "UTF8")
        self.assertEqual(ps["client_encoding"], "UTF8")
        self.assertEqual(ps["standard_conforming_strings"], "on")
        self.assertIsNotNone(ps["DateStyle"])
        self.assertIsNotNone(ps["TimeZone"])
        self.assertEqual(numeric // 10000, int(version.split(".")[0]))


class TransactionClientTests(ClientTestsMixin, PoolerTestCase):
    pool_mode = "transaction"
    pool_size = 2


class SessionClientTests(ClientTestsMixin, PoolerTestCase):
    pool_mode = "session"
    pool_size = 2

    @defer.inlineCallbacks
    def test_listen_notify_between_connections(self):
        channel = unique("ch")

        def run():
            with self.pg() as a, self.pg() as b:
                a.execute(f"LISTEN {channel}")
                b.execute(f"NOTIFY {channel}, 'payload'")
                got = [(n.channel, n.payload) for n in a.notifies(timeout=5, stop_after=1)]
                return got

        self.assertEqual((yield in_thread(run)), [(channel, "payload")])

    @defer.inlineCallbacks
    def test_asyncpg_session_prepared_statements(self):
        """The default statement cache (named statements) and explicit
        prepared statements keep working across transactions in a session."""
        kw = self.asyncpg_kwargs()

        async def main():
            conn = await asyncpg.connect(**kw)
            try:
                stmt = await conn.prepare("select $1::int * 3")
                out = []
                for i in range(10):
                    out.append(await stmt.fetchval(i))
                    out.append(await conn.fetchval("select $1::int + 100", i))
                    async with conn.transaction():
                        out.append(await conn.fetchval("select $1::text", str(i)))
                return out
            finally:
                await conn.close()

        out = yield in_thread(asyncio.run, main())
        expected = []
        for i in range(10):
            expected += [i * 3, i + 100, str(i)]
        self.assertEqual(out, expected)

    @defer.inlineCallbacks
    def test_session_state_kept_and_reset(self):
        """A session keeps its SET/PREPARE/temp tables; the next session
        on the same server starts clean (DISCARD ALL at disconnect)."""

        def run():
            with self.pg() as conn:
                pid = conn.execute("select pg_backend_pid()").fetchone()[0]
                conn.execute("SET search_path TO pg_catalog")
                conn.execute("create temp table session_tmp(x int)")
                conn.execute("PREPARE p1 AS select 5")
                kept = (conn.execute("show search_path").fetchone()[0],
                        conn.execute("EXECUTE p1").fetchone()[0])
            with self.pg() as conn2:
                pid2 = conn2.execute("select pg_backend_pid()").fetchone()[0]
                sp = conn2.execute("show search_path").fetchone()[0]
                tmp = conn2.execute("select count(*) from pg_class where relname = "
                                    "'session_tmp' and relpersistence = 't'").fetchone()[0]
                prepared = conn2.execute("select count(*) from pg_prepared_statements"
                                         ).fetchone()[0]
            return pid, kept, pid2, sp, tmp, prepared

        pid, kept, pid2, sp, tmp, prepared = yield in_thread(run)
        self.assertEqual(kept, ("pg_catalog", 5))
        self.assertEqual(sp, '"$user", public')
        self.assertEqual((tmp, prepared), (0, 0))
        self.assertIsInstance(pid2, int)


class TransactionSharedServerTests(ClientTestMixin, PoolerTestCase):
    """Transaction mode with one server connection that every client shares:
    per-client state must follow the client, and nothing else may leak."""

    pool_mode = "transaction"
    pool_size = 1

    @defer.inlineCallbacks
    def test_tracked_parameters_follow_the_client(self):
        def run():
            q = ("select current_setting('TimeZone'), current_setting('application_name'), "
                 "current_setting('DateStyle'), pg_backend_pid()")
            out = []
            with self.pg(application_name="appA") as a, \
                    self.pg(application_name="appB") as b:
                a.execute("SET TimeZone = 'Asia/Tokyo'")
                b.execute("SET TimeZone = 'UTC'")
                a.execute("SET DateStyle = 'German, DMY'")
                # A SET undone by ROLLBACK must not stick to A either.
                a.execute("BEGIN")
                a.execute("SET TimeZone = 'Europe/Paris'")
                a.execute("ROLLBACK")
                for _ in range(3):
                    out.append(("A",) + a.execute(q).fetchone())
                    out.append(("B",) + b.execute(q).fetchone())
                # What the client libraries were told (ParameterStatus).
                told = (a.info.parameter_status("TimeZone"),
                        b.info.parameter_status("TimeZone"),
                        a.info.parameter_status("application_name"),
                        b.info.parameter_status("application_name"))
                dates = (a.execute("select '2024-01-31'::date::text").fetchone()[0],
                         b.execute("select '2024-01-31'::date::text").fetchone()[0])
            return out, told, dates

        out, told, dates = yield in_thread(run)
        pids = {row[4] for row in out}
        self.assertEqual(len(pids), 1, "pool_size 1: every client shares one server")
        for who, tz, app, ds, _pid in out:
            if who == "A":
                self.assertEqual((tz, app, ds), ("Asia/Tokyo", "appA", "German, DMY"))
            else:
                self.assertEqual((tz, app, ds), ("UTC", "appB", "ISO, MDY"))
        self.assertEqual(told, ("Asia/Tokyo", "UTC", "appA", "appB"))
        self.assertEqual(dates, ("31.01.2024", "2024-01-31"))

    @defer.inlineCallbacks
    def test_client_encoding_startup_parameter(self):
        def run():
            out = []
            with self.pg(client_encoding="LATIN1") as a, self.pg() as b:
                for _ in range(2):
                    out.append(a.execute("show client_encoding").fetchone()[0])
                    out.append(b.execute("show client_encoding").fetchone()[0])
                # LATIN1 round trip through the shared server
                out.append(a.execute("select %s::text", ("caf\u00e9",)).fetchone()[0])
                out.append(a.execute("select convert_to(%s::text, 'UTF8')",
                                     ("\u00e9",)).fetchone()[0])
                out.append(a.info.encoding)
            return out

        out = yield in_thread(run)
        self.assertEqual(out[:4], ["LATIN1", "UTF8"] * 2)
        self.assertEqual(out[4], "caf\u00e9")
        self.assertEqual(bytes(out[5]), b"\xc3\xa9")
        self.assertEqual(out[6], "iso8859-1")

    @defer.inlineCallbacks
    def test_untracked_setting_does_not_leak(self):
        def run():
            with self.pg() as a, self.pg() as b:
                pid_a = a.execute("select pg_backend_pid()").fetchone()[0]
                a.execute("SET search_path TO pg_catalog")
                a.execute("SET work_mem = '77MB'")
                sp, wm, pid_b = b.execute(
                    "select current_setting('search_path'), current_setting('work_mem'), "
                    "pg_backend_pid()").fetchone()
            return pid_a, pid_b, sp, wm

        pid_a, pid_b, sp, wm = yield in_thread(run)
        self.assertEqual(pid_a, pid_b)
        self.assertEqual(sp, '"$user", public')
        self.assertEqual(wm, "4MB")

    @defer.inlineCallbacks
    def test_other_client_waits_for_transaction(self):
        """With one server, a second client's query waits for the first
        client's transaction and then runs on the same backend."""
        t = yield self.make_table("a int")

        def run():
            started = threading.Event()
            with self.pg(autocommit=False) as a, self.pg() as b:
                a.execute(f"insert into {t} values (1)")
                pid_a = a.execute("select pg_backend_pid()").fetchone()[0]
                result = {}

                def other():
                    started.set()
                    result["b"] = b.execute(f"select count(*), pg_backend_pid() from {t}"
                                            ).fetchone()
                th = threading.Thread(target=other)
                th.start()
                started.wait(5)
                th.join(0.3)
                blocked = th.is_alive()
                a.commit()
                th.join(10)
                return pid_a, blocked, result.get("b")

        pid_a, blocked, b = yield in_thread(run)
        self.assertTrue(blocked, "B must wait while A holds the only server in a transaction")
        self.assertEqual(b, (1, pid_a))

    @defer.inlineCallbacks
    def test_failed_copy_releases_server(self):
        """A COPY FROM STDIN that fails early (bad first row) while the client
        still streams megabytes: the server answers ErrorResponse +
        ReadyForQuery at once and ignores the rest of the copy data. Once the
        client has finished and is idle, another client must get the (only)
        server."""
        t = yield self.make_table()

        def run():
            with self.pg() as a, self.pg() as b:
                try:
                    with a.cursor().copy(f"COPY {t} (a, b) FROM STDIN") as copy:
                        copy.write(b"bad\trow\n")
                        line = b"1\t" + b"z" * 1000 + b"\n"
                        for _ in range(5000):
                            copy.write(line)
                except pgerr.InvalidTextRepresentation:
                    err = True
                else:
                    err = False
                # A is idle outside any transaction now; B must be served.
                try:
                    res = b.execute("select 'b served'").fetchone()[0]
                except psycopg.Error as e:
                    res = f"{type(e).__name__}: {e}"
                again = a.execute("select 'a works'").fetchone()[0]
                return err, res, again

        err, res, again = yield in_thread(run)
        self.assertTrue(err)
        self.assertEqual(res, "b served")
        self.assertEqual(again, "a works")
