"""Graceful shutdown of the real ``twistd pgcat`` (SIGINT and the admin
console's SHUTDOWN) and SIGTERM's quick stop (issue 16, item 3)."""

import signal
import time

import psycopg
import psycopg2

from tests.test_twistd import TwistdTestCase, in_thread, psql, wait_for


def admin_conn(port):
    conn = psycopg2.connect(host="127.0.0.1", port=port, dbname="pgbouncer", user="admin",
                            password="admin_pw", sslmode="disable", connect_timeout=10)
    conn.autocommit = True
    return conn


def client(port):
    return psycopg.connect(f"host=127.0.0.1 port={port} user=pgcat_md5 password=md5_pw "
                           "dbname=pgcat_test sslmode=disable connect_timeout=10",
                           prepare_threshold=None)


class ShutdownTests(TwistdTestCase):
    def _drain(self, stop):
        """Open a transaction, start the drain with ``stop(child, admin)``,
        check what the service does meanwhile, then commit."""
        config, port = self.write_config(pool_size=2,
                                         general="shutdown_timeout = 20000")
        child = self.start_foreground(config, port)
        admin = admin_conn(port)
        tx = client(port)
        tx.execute("create table if not exists shutdown_t (x int)")
        tx.commit()
        tx.execute("insert into shutdown_t values (1)")   # inside a transaction
        stop(child, admin)
        wait_for(lambda: "graceful shutdown" in child.output(), 10, "the drain to start",
                 child.output)
        # New clients are refused at once; admin sessions are accepted and work.
        code, out, err = psql(port)
        self.assertNotEqual(code, 0)
        self.assertIn("shutting down", err)
        second = admin_conn(port)
        cur = second.cursor()
        cur.execute("SHOW STATE")
        self.assertEqual(dict(cur.fetchall())["active"], "no")
        cur = admin.cursor()
        cur.execute("SHOW CLIENTS")
        self.assertEqual(len(cur.fetchall()), 1)
        self.assertIsNone(child.proc.poll())
        # The open transaction may finish: it commits, then the client is told.
        tx.commit()
        self.assertRaises(psycopg.Error, tx.execute, "select 1")
        tx.close()
        code = child.wait(15)
        self.assertIn(code, (0, -signal.SIGINT, -signal.SIGTERM), child.output())
        self.assert_no_traceback(child.output())
        second.close()
        admin.close()
        # It committed on the server.
        n = self.primary.psql("select count(*) from shutdown_t", db="pgcat_test")
        self.primary.psql("drop table shutdown_t", db="pgcat_test")
        self.assertEqual(n.strip(), "1")

    def test_sigint_drains(self):
        return in_thread(self._drain, lambda child, admin: child.proc.send_signal(signal.SIGINT))

    def test_admin_shutdown_drains(self):
        def stop(child, admin):
            cur = admin.cursor()
            cur.execute("SHUTDOWN")
            self.assertEqual(cur.fetchall(), [("t",)])
        return in_thread(self._drain, stop)

    def test_sigterm_exits_within_two_seconds(self):
        def go():
            config, port = self.write_config(pool_size=2)
            child = self.start_foreground(config, port)
            tx = client(port)
            tx.execute("select 1")   # a transaction open does not hold SIGTERM up
            t0 = time.monotonic()
            child.proc.send_signal(signal.SIGTERM)
            child.wait(5)
            took = time.monotonic() - t0
            tx.close()
            self.assertLess(took, 2.0, child.output())
        return in_thread(go)
