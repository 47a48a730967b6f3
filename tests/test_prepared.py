"""Named prepared statements in transaction mode (prepared_statements_cache_size):
real drivers, more clients than servers, statements shared across clients."""

import asyncio
import socket
import struct

import psycopg
from psycopg import pq
from twisted.internet import defer

from tests.support import PoolerTestCase, error_fields, in_thread, read_messages, startup_packet


def _table_sql(name):
    return (f"drop table if exists {name}; create table {name}(id int primary key, v text); "
            f"insert into {name} select g, 'v' || g from generate_series(1, 100) g; "
            f"grant all on {name} to public")


class PreparedTestCase(PoolerTestCase):
    pool_mode = "transaction"
    pool_size = 2
    pool_extra = "prepared_statements_cache_size = 100"

    def count_prepared(self, like):
        """pg_prepared_statements on the server a transaction lands on."""
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as c:
                return c.execute(
                    "select count(*) from pg_prepared_statements where statement like %s",
                    (like,), prepare=False).fetchone()[0]
        return in_thread(go)


class DriverTests(PreparedTestCase):
    @defer.inlineCallbacks
    def test_asyncpg_default_statement_cache(self):
        yield self.primary_sql(_table_sql("prep_a"))
        port = self.pooler.port

        async def main():
            import asyncpg

            async def task(i):
                conn = await asyncpg.connect(host="127.0.0.1", port=port, user="pgcat_md5",
                                             password="md5_pw", database="pgcat_test")
                try:
                    out = []
                    for j in range(20):
                        k = (i * 20 + j) % 100 + 1
                        out.append(await conn.fetchval("select v from prep_a where id = $1", k)
                                   == f"v{k}")
                        out.append(await conn.fetchval("select $1::int * 2", j) == 2 * j)
                        async with conn.transaction():
                            out.append(await conn.fetchval(
                                "select count(*) from prep_a where id <= $1", k) == k)
                    return all(out)
                finally:
                    await conn.close()
            return await asyncio.gather(*(task(i) for i in range(32)))

        results = yield in_thread(asyncio.run, main())
        self.assertEqual(results, [True] * 32)
        self.assertLessEqual(self.pooler.cluster.server_connections(), 2)

    @defer.inlineCallbacks
    def test_psycopg_prepare_threshold_zero_and_pipeline(self):
        yield self.primary_sql(_table_sql("prep_b"))

        def go(i):
            with psycopg.connect(self.pooler.dsn(), prepare_threshold=0) as conn:
                ok = []
                for j in range(30):
                    k = (i + j) % 100 + 1
                    ok.append(conn.execute("select v from prep_b where id = %s",
                                           (k,)).fetchone()[0] == f"v{k}")
                    conn.commit()
                with conn.pipeline():
                    curs = [conn.execute("select v from prep_b where id = %s", (k,))
                            for k in range(1, 11)]
                    curs.append(conn.execute("select %s::int + 1", (i,)))
                ok.extend(c.fetchone()[0] == f"v{k}" for c, k in zip(curs, range(1, 11)))
                ok.append(curs[-1].fetchone()[0] == i + 1)
                conn.commit()
                return all(ok)

        results = yield defer.gatherResults([in_thread(go, i) for i in range(8)])
        self.assertEqual(results, [True] * 8)

    @defer.inlineCallbacks
    def test_pgbench_prepared(self):
        from tests.test_pooling import _pgbench_ready
        if not _pgbench_ready:
            out, err, code = yield self.pooler.pgbench("-i", "-s", "1", "-q")
            self.assertEqual(code, 0, err)
            _pgbench_ready.append(True)
        out, err, code = yield self.pooler.pgbench("-M", "prepared", "-c", "16", "-j", "2",
                                                   "-t", "100", "-n")
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("number of transactions actually processed: 1600/", text)
        self.assertIn("number of failed transactions: 0 ", text)


class SharingTests(PreparedTestCase):
    pool_size = 1

    @defer.inlineCallbacks
    def test_same_sql_under_ten_names_is_one_server_statement(self):
        sql = "select 'shared-sql-marker', $1::int"

        def client(i):
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                pg = conn.pgconn
                name = f"client_{i}_stmt".encode()
                r = pg.prepare(name, sql.encode())
                assert r.status == pq.ExecStatus.COMMAND_OK, r.error_message
                r = pg.exec_prepared(name, [str(i).encode()])
                assert r.status == pq.ExecStatus.TUPLES_OK, r.error_message
                return r.get_value(0, 1).decode()

        values = []
        for i in range(10):
            values.append((yield in_thread(client, i)))
        self.assertEqual(values, [str(i) for i in range(10)])
        n = yield self.count_prepared("%shared-sql-marker%")
        self.assertEqual(n, 1)

class EvictionTests(PreparedTestCase):
    pool_size = 1
    pool_extra = "prepared_statements_cache_size = 1"

    @defer.inlineCallbacks
    def test_cache_size_one_five_statements(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                pg = conn.pgconn
                out = []
                for i in range(5):
                    name = f"e{i}".encode()
                    assert pg.prepare(name, f"select 'evict-marker', {i}".encode()).status == \
                        pq.ExecStatus.COMMAND_OK
                for i in range(5):  # every one still works: re-prepared when evicted
                    r = pg.exec_prepared(f"e{i}".encode(), [])
                    assert r.status == pq.ExecStatus.TUPLES_OK, r.error_message
                    out.append(int(r.get_value(0, 1)))
                return out
        self.assertEqual((yield in_thread(go)), [0, 1, 2, 3, 4])
        n = yield self.count_prepared("%evict-marker%")
        self.assertEqual(n, 1)
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        server = list(up.server_pool().idle)[0]
        self.assertGreaterEqual(server.stmts.evictions, 4)
        self.assertGreaterEqual(server.stmts.misses, 5)


def _msg(t, body):
    return t + struct.pack("!i", len(body) + 4) + body


def read_segments(sock, n, timeout=5.0):
    """Read backend messages up to the n-th ReadyForQuery; one list of
    message types per segment (keeps bytes across segments)."""
    sock.settimeout(timeout)
    buf = b""
    segs, cur = [], []
    while len(segs) < n:
        while len(buf) >= 5:
            (ln,) = struct.unpack("!i", buf[1:5])
            if len(buf) < 1 + ln:
                break
            t, body, buf = buf[:1], buf[5:1 + ln], buf[1 + ln:]
            cur.append((t, body))
            if t == b"Z":
                segs.append(cur)
                cur = []
                if len(segs) == n:
                    return segs
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return segs


class RawProtocolTests(PreparedTestCase):
    def _login(self):
        import hashlib
        s = socket.create_connection(("127.0.0.1", self.pooler.port), timeout=5)
        s.sendall(startup_packet("pgcat_md5", "pgcat_test"))
        msgs, _ = read_messages(s, until=b"R")
        salt = msgs[-1][1][4:8]
        inner = hashlib.md5(b"md5_pwpgcat_md5").hexdigest()
        resp = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"
        s.sendall(_msg(b"p", resp))
        read_messages(s, until=b"Z")
        return s

    @defer.inlineCallbacks
    def test_parse_describe_flush_answers_without_sync(self):
        def go():
            s = self._login()
            try:
                s.sendall(_msg(b"P", b"flush_stmt\0select $1::int + 1\0\0\0")
                          + _msg(b"D", b"Sflush_stmt\0") + _msg(b"H", b""))
                msgs, closed = read_messages(s, until=b"T", timeout=5)
                first = [t for t, _ in msgs]
                # Now execute it, still without a Sync in between, then Sync.
                s.sendall(_msg(b"B", b"\0flush_stmt\0\0\0\0\x01\0\0\0\x0241\0\0")
                          + _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b""))
                msgs, closed = read_messages(s, until=b"Z", timeout=5)
                rows = [b for t, b in msgs if t == b"D"]
                return first, [t for t, _ in msgs], rows
            finally:
                s.close()
        first, second, rows = yield in_thread(go)
        self.assertEqual(first, [b"1", b"t", b"T"])
        self.assertEqual(second, [b"2", b"D", b"C", b"Z"])
        self.assertEqual(rows[0][-2:], b"42")

    @defer.inlineCallbacks
    def test_error_in_pipeline_skips_to_sync(self):
        def go():
            s = self._login()
            try:
                s.sendall(
                    _msg(b"P", b"ok1\0select 1\0\0\0")
                    + _msg(b"P", b"bad\0select nonsense_column\0\0\0")   # fails
                    + _msg(b"P", b"ok2\0select 2\0\0\0")                 # skipped
                    + _msg(b"S", b"")
                    + _msg(b"P", b"ok3\0select 3\0\0\0")
                    + _msg(b"B", b"\0ok3\0\0\0\0\0\0\0") + _msg(b"E", b"\0\0\0\0\0")
                    + _msg(b"S", b""))
                segs = read_segments(s, 2)
                seg1 = [t for t, _ in segs[0]]
                seg2 = [t for t, _ in segs[1]]
                # ok2 was never prepared: binding it is an error, as in PostgreSQL.
                s.sendall(_msg(b"B", b"\0ok2\0\0\0\0\0\0\0") + _msg(b"S", b""))
                msgs, _ = read_messages(s, until=b"Z", timeout=5)
                err = [error_fields(b).get("C") for t, b in msgs if t == b"E"]
                return seg1, seg2, err
            finally:
                s.close()
        seg1, seg2, err = yield in_thread(go)
        self.assertEqual(seg1, [b"1", b"E", b"Z"])
        self.assertEqual(seg2, [b"1", b"2", b"D", b"C", b"Z"])
        self.assertEqual(err, ["26000"])


class CloseTests(RawProtocolTests):
    pool_size = 1

    @defer.inlineCallbacks
    def test_close_keeps_shared_statement(self):
        def go():
            s = self._login()
            try:
                def rt(data):
                    s.sendall(data)
                    msgs, _ = read_messages(s, until=b"Z", timeout=5)
                    return [t for t, _ in msgs]
                out = [rt(_msg(b"P", b"s1\0select 'close-marker'\0\0\0") + _msg(b"S", b"")),
                       rt(_msg(b"C", b"Ss1\0") + _msg(b"S", b"")),
                       rt(_msg(b"B", b"\0s1\0\0\0\0\0\0\0") + _msg(b"E", b"\0\0\0\0\0")
                          + _msg(b"S", b"")),
                       rt(_msg(b"P", b"s2\0select 'close-marker'\0\0\0") + _msg(b"S", b"")),
                       rt(_msg(b"B", b"\0s2\0\0\0\0\0\0\0") + _msg(b"E", b"\0\0\0\0\0")
                          + _msg(b"S", b""))]
                return out
            finally:
                s.close()
        out = yield in_thread(go)
        self.assertEqual(out, [[b"1", b"Z"], [b"3", b"Z"], [b"E", b"Z"], [b"1", b"Z"],
                               [b"2", b"D", b"C", b"Z"]])
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        server = list(up.server_pool().idle)[0]
        # s2 reused the shared statement: the server prepared the SQL once.
        self.assertEqual(server.stmts.misses, 1)
        self.assertEqual(len(server.stmts.names), 1)


class DDLTests(PreparedTestCase):
    pool_size = 1

    @defer.inlineCallbacks
    def test_cached_plan_error_recovers(self):
        yield self.primary_sql(_table_sql("prep_ddl"))
        conn = yield in_thread(psycopg.connect, self.pooler.dsn(), autocommit=True)
        self.addCleanup(conn.close)
        pg = conn.pgconn

        def prepare_and_run():
            assert pg.prepare(b"q", b"select * from prep_ddl where id = 1").status == \
                pq.ExecStatus.COMMAND_OK
            return pg.exec_prepared(b"q", []).nfields

        self.assertEqual((yield in_thread(prepare_and_run)), 2)
        yield self.primary_sql("alter table prep_ddl add column extra int default 7")

        def run():
            r = pg.exec_prepared(b"q", [])
            return r.status, r.error_field(pq.DiagnosticField.SQLSTATE), r.nfields
        status, code, _ = yield in_thread(run)
        if status == pq.ExecStatus.FATAL_ERROR:
            # What PostgreSQL itself answers after such DDL...
            self.assertEqual(code, b"0A000")
            # ...but through the pooler the next execution works again.
            status, code, nfields = yield in_thread(run)
        else:
            nfields = _
        self.assertEqual(status, pq.ExecStatus.TUPLES_OK)
        self.assertEqual(nfields, 3)


class SqlLevelTests(PreparedTestCase):
    def test_sql_prepare_inside_a_transaction(self):
        """Inside an explicit transaction the server is the client's until it
        ends: SQL PREPARE/EXECUTE/DEALLOCATE run there, and the server is
        reset before its next client."""
        def go():
            with psycopg.connect(self.pooler.dsn()) as conn:
                conn.execute("PREPARE in_tx AS select 40 + 2", prepare=False)
                got = conn.execute("EXECUTE in_tx", prepare=False).fetchone()[0]
                conn.execute("DEALLOCATE in_tx", prepare=False)
                conn.execute("PREPARE in_tx2 AS select 1", prepare=False)
                conn.commit()
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                left = conn.execute("select count(*) from pg_prepared_statements "
                                    "where name like 'in_tx%'", prepare=False).fetchone()[0]
            return got, left

        def check(result):
            self.assertEqual(result, (42, 0))

        return in_thread(go).addCallback(check)

    @defer.inlineCallbacks
    def test_sql_prepare_across_transactions_mapped(self):
        """With the cache on, SQL PREPARE/EXECUTE work across transactions
        (each may land on another server): the client's name is mapped onto
        the shared statement, prepared where it is missing; an EXECUTE's
        answer is a simple Query's (no ParseComplete, BindComplete or
        NoData reaches the client)."""
        yield self.primary_sql("create table if not exists sql_prep_t (x int); "
                               "truncate sql_prep_t; grant all on sql_prep_t to public")

        def go():
            out = {}
            holder = psycopg.connect(self.pooler.dsn())   # keeps one server busy at times
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn, \
                    psycopg.connect(self.pooler.dsn(), autocommit=True) as other:
                pg = conn.pgconn
                out["prepare"] = pg.exec_(b"PREPARE add_one (int) AS select $1 + 1 as n") \
                    .command_status
                out["ins"] = pg.exec_(b"prepare Ins AS insert into sql_prep_t values ($1)") \
                    .command_status
                results = []
                for i in range(20):
                    if i % 3 == 0:
                        holder.execute("select 1")         # a transaction left open
                    elif i % 3 == 2:
                        holder.commit()
                    r = pg.exec_(b"EXECUTE add_one(%d)" % i)
                    results.append((r.status, r.ntuples and int(r.get_value(0, 0)),
                                    r.fname(0)))
                    tag = pg.exec_(b"execute ins(%d);" % i).command_status
                holder.rollback()
                out["results"] = results
                out["tag"] = tag
                out["bad"] = pg.exec_(b"EXECUTE add_one('x')").error_field(
                    pq.DiagnosticField.SQLSTATE)
                out["dup"] = pg.exec_(b"PREPARE add_one AS select 2").error_field(
                    pq.DiagnosticField.SQLSTATE)
                # Another client preparing the same text shares the statement.
                other.pgconn.exec_(b"PREPARE mine (integer) AS select $1 + 1 as n")
                out["other"] = other.execute("EXECUTE mine(1)", prepare=False).fetchone()[0]
                out["dealloc"] = pg.exec_(b"DEALLOCATE add_one").command_status
                out["gone"] = pg.exec_(b"EXECUTE add_one(1)").error_field(
                    pq.DiagnosticField.SQLSTATE)
                out["in_tx"] = None
                with conn.transaction():
                    out["in_tx"] = conn.execute("EXECUTE ins(100)", prepare=False).rowcount
            holder.close()
            return out

        out = yield in_thread(go)
        self.assertEqual((out["prepare"], out["ins"]), (b"PREPARE", b"PREPARE"))
        self.assertEqual(out["results"],
                         [(pq.ExecStatus.TUPLES_OK, i + 1, b"n") for i in range(20)])
        self.assertEqual(out["tag"], b"INSERT 0 1")
        self.assertEqual(out["bad"], b"22P02")
        self.assertEqual(out["dup"], b"42P05")
        self.assertEqual(out["other"], 2)
        self.assertEqual((out["dealloc"], out["gone"]), (b"DEALLOCATE", b"26000"))
        self.assertEqual(out["in_tx"], 1)
        count = yield self.primary_sql("select count(*) from sql_prep_t")
        self.assertEqual(count, "21")
        shared = yield self.count_prepared("%$1 + 1%")
        self.assertLessEqual(shared, 1)     # one statement per server, not one per client

    @defer.inlineCallbacks
    def test_sql_prepare_refused_deallocate_answered(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                out = []
                try:
                    # Not one PREPARE alone: cannot be mapped, refused.
                    conn.execute("PREPARE p1 AS select 1; select 2", prepare=False)
                except psycopg.Error as e:
                    out.append((e.sqlstate, "alone" in str(e.diag.message_hint)))
                try:
                    conn.execute("EXECUTE p1", prepare=False)
                except psycopg.Error as e:
                    out.append(e.sqlstate)
                pg = conn.pgconn
                assert pg.prepare(b"mine", b"select 'dealloc'").status == pq.ExecStatus.COMMAND_OK
                r = pg.exec_(b"DEALLOCATE mine")
                out.append((r.status == pq.ExecStatus.COMMAND_OK, r.command_status))
                out.append(pg.exec_prepared(b"mine", []).status == pq.ExecStatus.FATAL_ERROR)
                r = pg.exec_(b"DEALLOCATE ALL")
                out.append(r.command_status)
                # DISCARD ALL runs on the server and empties the client's view.
                assert pg.prepare(b"kept", b"select 'discard'").status == \
                    pq.ExecStatus.COMMAND_OK
                r = pg.exec_(b"DISCARD ALL")
                out.append(r.command_status)
                out.append(pg.exec_prepared(b"kept", []).error_field(
                    pq.DiagnosticField.SQLSTATE))
                # The connection is fine and two-phase PREPARE TRANSACTION is not refused.
                out.append(conn.execute("select 5", prepare=False).fetchone()[0])
                return out
        out = yield in_thread(go)
        self.assertEqual(out, [("0A000", True), "26000", (True, b"DEALLOCATE"), True,
                               b"DEALLOCATE ALL", b"DISCARD ALL", b"26000", 5])


class CacheOffTests(PoolerTestCase):
    pool_mode = "transaction"

    @defer.inlineCallbacks
    def test_named_parse_gets_clear_error(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True) as conn:
                pg = conn.pgconn
                r = pg.prepare(b"named", b"select 1")
                msg = (r.error_message or b"").decode()
                ok_after = conn.execute("select 2", prepare=False).fetchone()[0]
                unnamed = conn.execute("select %s::int", (3,), prepare=False).fetchone()[0]
                return r.status, msg, ok_after, unnamed
        status, msg, ok_after, unnamed = yield in_thread(go)
        self.assertEqual(status, pq.ExecStatus.FATAL_ERROR)
        self.assertIn("prepared_statements_cache_size", msg)
        self.assertEqual((ok_after, unnamed), (2, 3))
