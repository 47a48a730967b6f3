"""PgCat's ``cleanup_server_connections`` against real PostgreSQL: true
(the default) resets what a client left on its server before the next
client gets it; false leaves session state (SET) for the next client, in
transaction and in session mode, but an open transaction is still rolled
back."""

import psycopg
from tests.support import PoolerTestCase, in_thread


class _Cleanup:
    pool_size = 1          # the next client gets the same server
    expect_kept = False

    def test_state_left_behind(self):
        def go():
            with psycopg.connect(self.pooler.dsn(), prepare_threshold=None) as c:
                c.autocommit = True
                c.execute("SET work_mem = '7777kB'")
                c.autocommit = False
                c.execute("create temp table if not exists cleanup_probe (x int)")
                c.execute("insert into cleanup_probe values (1)")
                c.close()     # gone inside the transaction (the block would commit)
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as c:
                return (c.execute("SHOW work_mem").fetchone()[0],
                        c.execute("select pg_current_xact_id_if_assigned() is null")
                        .fetchone()[0],
                        c.execute("select count(*) from pg_class where relname = "
                                  "'cleanup_probe' and relnamespace = pg_my_temp_schema()").fetchone()[0])

        def check(result):
            work_mem, no_tx, temp = result
            self.assertTrue(no_tx)            # the open transaction was rolled back
            self.assertEqual(temp, 0)         # (its temp table with it)
            self.assertEqual(work_mem == "7777kB", self.expect_kept, work_mem)
        return in_thread(go).addCallback(check)


class TransactionModeDefault(_Cleanup, PoolerTestCase):
    pool_mode = "transaction"


class TransactionModeNoCleanup(_Cleanup, PoolerTestCase):
    pool_mode = "transaction"
    pool_extra = "cleanup_server_connections = false"
    expect_kept = True


class SessionModeDefault(_Cleanup, PoolerTestCase):
    pool_mode = "session"


class SessionModeNoCleanup(_Cleanup, PoolerTestCase):
    pool_mode = "session"
    pool_extra = "cleanup_server_connections = false"
    expect_kept = True
