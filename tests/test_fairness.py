"""Newcomers under load: while pgbench keeps every server of a pool busy,
clients with other settings (psql, psycopg 3 with its own application_name,
client_encoding and TimeZone, asyncpg) are served in their turn.

A client that starts waiting for a server is handed one before any client
that started waiting after it, whatever its parameters: one whose values
differ pays for the SET, it does not lose its place (issue 13, part A).
"""

import asyncio
import time

import asyncpg
import psycopg
from twisted.internet import defer

from tests.support import PoolerTestCase, in_thread
from tests.test_pooling import PgbenchMixin

QUERIES = 20


def _psycopg_queries(dsn):
    """20 queries from psycopg 3 with settings no pgbench client has."""
    with psycopg.connect(dsn, application_name="fair-psycopg", client_encoding="LATIN1",
                         prepare_threshold=None, autocommit=True) as conn:
        # A tracked parameter set by the client: re-applied wherever its
        # next transactions land.
        conn.execute("SET TimeZone TO 'Asia/Tokyo'")
        out = []
        for i in range(QUERIES):
            row = conn.execute(
                "select %s::int, current_setting('application_name'), "
                "current_setting('TimeZone'), current_setting('client_encoding')",
                (i,)).fetchone()
            out.append(row)
        return out


def _asyncpg_queries(port, user, password, db):
    async def run():
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user,
                                     password=password, database=db, ssl=False,
                                     statement_cache_size=0,
                                     server_settings={"application_name": "fair-asyncpg",
                                                      "DateStyle": "SQL, DMY"})
        try:
            out = []
            for i in range(QUERIES):
                out.append(await conn.fetchrow(
                    "select $1::int, current_setting('application_name'), "
                    "current_setting('DateStyle')", i))
            return out
        finally:
            await conn.close()

    return asyncio.run(run())


class _Saturated(PgbenchMixin):
    """pgbench -S with ``clients`` clients on pool_size 4 keeps the pool
    saturated while the newcomers run."""

    pool_size = 4
    clients = 16
    general = "connect_timeout = 5000"
    timeout = 180

    @defer.inlineCallbacks
    def test_newcomers_are_served(self):
        """psql (fresh logins, then 20 queries in one session), psycopg 3
        and asyncpg, all at once, while pgbench keeps the pool busy."""
        from tests.pgharness import USERS

        yield self._init_pgbench()
        bench = self.pooler.pgbench("-S", "-n", "-c", str(self.clients), "-j", "2",
                                    "-T", "8")
        # Let pgbench connect and fill the pool first.
        yield in_thread(time.sleep, 1.0)
        sql = "; ".join(f"select {i} as n, current_setting('application_name')"
                        for i in range(QUERIES))
        args = (self.pooler.port, "pgcat_md5", USERS["pgcat_md5"], "pgcat_test")
        results = yield defer.gatherResults([
            self._psql_newcomer(sql),
            in_thread(_psycopg_queries, self.pooler.dsn()),
            in_thread(_asyncpg_queries, *args),
        ], consumeErrors=True)
        out, err, code = yield bench
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("number of failed transactions: 0 ", text)
        logins, session = results[0]
        for code, out, err in logins:
            self.assertEqual((code, out.strip()), (0, b"psql"), err)
        code, out, err = session
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().split(), [f"{i}|psql" for i in range(QUERIES)])
        rows = results[1]
        self.assertEqual([r[0] for r in rows], list(range(QUERIES)))
        for r in rows:
            self.assertEqual(r[1:], ("fair-psycopg", "Asia/Tokyo", "LATIN1"))
        rows = results[2]
        self.assertEqual([r[0] for r in rows], list(range(QUERIES)))
        for r in rows:
            self.assertEqual(tuple(r)[1:], ("fair-asyncpg", "SQL, DMY"))
        # pgbench really was running through the pool meanwhile.
        self.assertIn(f"number of clients: {self.clients}", text)

    @defer.inlineCallbacks
    def _psql_newcomer(self, sql):
        # Fresh logins too: the greeting's needs must not starve either.
        logins = []
        for _ in range(3):
            out, err, code = yield self.pooler.psql("select current_setting('application_name')")
            logins.append((code, out, err))
        out, err, code = yield self.pooler.psql(sql)
        return logins, (code, out, err)


class SaturatedBy16Tests(_Saturated, PoolerTestCase):
    clients = 16


class SaturatedBy4Tests(_Saturated, PoolerTestCase):
    """As many pgbench clients as servers: new clients still get in."""

    clients = 4
