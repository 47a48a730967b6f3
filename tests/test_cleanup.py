"""PgCat's ``cleanup_server_connections`` against real PostgreSQL: true
(the default) resets what a client left on its server before the next
client gets it; false leaves session state (SET) for the next client, in
transaction and in session mode, but an open transaction is still rolled
back."""

import time

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


class SessionModeResetWhenDirty(PoolerTestCase):
    """Session mode, PgCat's rule: a session that changed no state gives its
    server back without DISCARD ALL; one that did (a SET-like tag, a named
    prepared statement, text calling set_config, an advisory lock) is reset.
    Evidence: the server's own last statement (pg_stat_activity), and what
    the next client sees."""

    pool_mode = "session"
    pool_size = 1

    def _session(self, statements, prepare=False):
        """Run ``statements`` in one session through the pooler -> its
        server's pid; then watch that backend for up to 1.5 s -> whether it
        ran DISCARD ALL after the session."""
        with psycopg.connect(self.pooler.dsn(), autocommit=True,
                             prepare_threshold=5 if prepare else None) as c:
            pid = c.execute("select pg_backend_pid()").fetchone()[0]
            for sql in statements:
                c.execute(sql, prepare=prepare)
        with psycopg.connect(self.primary.dsn(), autocommit=True) as d:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                q = d.execute("select query from pg_stat_activity where pid = %s",
                              (pid,)).fetchone()[0]
                if q == "DISCARD ALL":
                    return pid, True
                time.sleep(0.05)
        return pid, False

    def _next(self, sql):
        with psycopg.connect(self.pooler.dsn(), autocommit=True,
                             prepare_threshold=None) as c:
            return c.execute("select pg_backend_pid()").fetchone()[0], \
                c.execute(sql).fetchone()[0]

    def test_clean_session_not_reset(self):
        def go():
            pid, reset = self._session(["select 1", "select count(*) from pg_class"])
            return pid, reset, self._next("show work_mem")
        def check(r):
            pid, reset, (pid2, _) = r
            self.assertFalse(reset)
            self.assertEqual(pid, pid2)       # the same server, kept as it was
        return in_thread(go).addCallback(check)

    def test_set_config_in_select_is_reset(self):
        def go():
            pid, reset = self._session(["select set_config('work_mem', '7777kB', false)"])
            return reset, self._next("show work_mem")
        def check(r):
            reset, (_, work_mem) = r
            self.assertTrue(reset)
            self.assertNotEqual(work_mem, "7777kB")
        return in_thread(go).addCallback(check)

    def test_advisory_lock_is_released(self):
        def go():
            pid, reset = self._session(["SELECT PG_ADVISORY_LOCK(424242)"])
            with psycopg.connect(self.primary.dsn(), autocommit=True) as d:
                free = d.execute("select pg_try_advisory_lock(424242)").fetchone()[0]
            return reset, free
        def check(r):
            self.assertEqual(r, (True, True))
        return in_thread(go).addCallback(check)

    def test_named_prepared_statement_is_reset(self):
        def go():
            pid, reset = self._session(["select 41 + 1"], prepare=True)
            return reset, self._next(
                "select count(*) from pg_prepared_statements")
        def check(r):
            reset, (_, n) = r
            self.assertTrue(reset)
            self.assertEqual(n, 0)
        return in_thread(go).addCallback(check)

    def test_tagged_state_is_reset(self):
        def go():
            return [self._session([sql])[1] for sql in (
                "reset work_mem", "listen cleanup_channel",
                "create temp table cleanup_tagged (x int)")]
        return in_thread(go).addCallback(self.assertEqual, [True, True, True])
