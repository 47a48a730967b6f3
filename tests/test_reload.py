"""Reload under live traffic (SIGHUP's and admin RELOAD's path): pools are
reconfigured in place, nobody is dropped, a broken file changes nothing."""

import os

import psycopg
import psycopg2
from twisted.internet import defer, reactor, threads

from pgcat_tw.config import load
from pgcat_tw.service import PgCatService

from tests.pgharness import USERS, topology
from tests.support import Pooler, PoolerTestCase, free_port, in_thread, pooler_toml
from tests.test_admin import admin, sleep
from tests.test_pooling import PgbenchMixin
from tests.test_replicas import wait_caught_up


class _Only:
    """A topology view with only some replicas (those running)."""

    def __init__(self, primary, replicas):
        self.primary, self.replicas = primary, replicas


class FilePooler(Pooler):
    """A Pooler whose configuration is a file (so it can be reloaded)."""

    def __init__(self, path, text):
        self.path = path
        self.write(text)
        self.config, self.warnings = load(path)
        self.port = self.config.general.port
        self.service = PgCatService(reactor, self.config, config_path=path,
                                    warnings=self.warnings)

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)


class _FileConfigTestCase(PoolerTestCase, PgbenchMixin):
    """A pooler from a config file, in front of the primary and a replica."""

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        self.topo = yield threads.deferToThread(topology, 1)
        self.primary = self.topo.primary
        self.replica = self.topo.replicas[0]
        if not self.replica.is_running():
            yield threads.deferToThread(self.replica.start)
        self.port = free_port()
        self.path = os.path.join(os.path.abspath(self.mktemp()) + ".toml")
        self.pooler = yield FilePooler(self.path, self.toml()).start()
        self.addCleanup(self.pooler.stop)

    def toml(self, pool_size=2, password="md5_pw", replica=False, extra=""):
        servers = [(self.primary.port, "primary")]
        if replica:
            servers.append((self.replica.port, "replica"))
        return pooler_toml(self.port, servers, pool_size=pool_size,
                           users={"pgcat_md5": f'password = "{password}"'},
                           pool_extra=extra)

    def set_server_password(self, password):
        """On the primary; done once every running replica has replayed it
        (other tests log in to the replicas right after this one)."""
        def go():
            self.primary.psql_script(
                f"SET password_encryption = 'md5';\n"
                f"ALTER ROLE pgcat_md5 PASSWORD '{password}';\n")
            running = [r for r in self.topo.replicas if r.is_running()]
            wait_caught_up(_Only(self.topo.primary, running))
        return threads.deferToThread(go)

    def connect(self, password="md5_pw", **kw):
        return psycopg.connect(self.pooler.dsn(password=password), prepare_threshold=None,
                               **kw)


class ReloadTests(_FileConfigTestCase):

    @defer.inlineCallbacks
    def test_reload_under_pgbench_resizes_rekeys_and_adds_a_replica(self):
        yield self._init_pgbench()
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        primary_pool = up.address_pools[0]
        bench = self.pooler.pgbench("-S", "-n", "-c", "4", "-j", "2", "-T", "7")
        # A transaction open across the reload.
        tx = yield in_thread(self.connect)
        yield in_thread(tx.execute, "create table if not exists reload_t (x int)")
        yield in_thread(tx.commit)
        yield in_thread(tx.execute, "insert into reload_t values (42)")
        yield sleep(2.0)
        self.addCleanup(self.set_server_password, USERS["pgcat_md5"])
        yield self.set_server_password("md5_pw_2")
        self.pooler.write(self.toml(pool_size=3, password="md5_pw_2", replica=True))
        self.assertIsNone(self.pooler.service.reload_problem())
        # The same UserPool and the same pool for the primary, reconfigured.
        self.assertIs(self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")], up)
        self.assertIs(up.address_pools[0], primary_pool)
        self.assertEqual([p.pool_size for p in up.address_pools], [3, 3])
        self.assertEqual([p.address.port for p in up.address_pools],
                         [self.primary.port, self.replica.port])
        # The open transaction commits.
        yield in_thread(tx.commit)
        yield in_thread(tx.close)
        out, err, code = yield bench
        self.assertEqual(code, 0, err)
        self.assertIn("number of failed transactions: 0 ", out.decode())
        # New logins need the new password; the new pool size is used.
        yield self.failUnlessFailure(in_thread(self.connect, "md5_pw"), psycopg.Error)

        def with_new_password():
            with self.connect("md5_pw_2", autocommit=True) as c:
                c.execute("SET SERVER ROLE TO 'replica'")
                port = c.execute("select inet_server_port()").fetchone()[0]
                c.execute("SET SERVER ROLE TO 'primary'")
                n = c.execute("select count(*) from reload_t where x = 42").fetchone()[0]
                c.execute("drop table reload_t")
                return port, n

        port, n = yield in_thread(with_new_password)
        self.assertEqual((port, n), (self.replica.port, 1))

    def test_removed_address_is_drained(self):
        self.pooler.write(self.toml(replica=True))
        self.assertIsNone(self.pooler.service.reload_problem())
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        rpool = up.address_pools[1]
        self.pooler.write(self.toml())
        self.assertIsNone(self.pooler.service.reload_problem())
        self.assertTrue(rpool.closed)
        self.assertEqual(len(up.address_pools), 1)

    @defer.inlineCallbacks
    def test_broken_file_on_admin_reload_keeps_the_config(self):
        conn = yield in_thread(self.connect, autocommit=True)
        self.addCleanup(in_thread, conn.close)
        self.pooler.write(self.toml() + "\n[pools.pgcat_test.users.0]\npool_size = 'ten'\n")
        err = yield self.failUnlessFailure(
            in_thread(admin, self.pooler.port, "RELOAD"), psycopg2.Error)
        self.assertEqual(err.pgcode, "58000")
        self.assertIn(self.path, err.pgerror)
        # The config in force stays; connected clients are untouched.
        row = yield in_thread(lambda: conn.execute("select 1").fetchone())
        self.assertEqual(row, (1,))
        cols, rows = yield in_thread(admin, self.pooler.port, "SHOW USERS")
        self.assertEqual(rows, [{"name": "pgcat_md5", "pool_mode": "transaction"}])
        # A good file then reloads.
        self.pooler.write(self.toml(pool_size=5))
        yield in_thread(admin, self.pooler.port, "RELOAD")
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        self.assertEqual(up.address_pools[0].pool_size, 5)


class AutoreloadTests(_FileConfigTestCase):
    """``autoreload`` (ms): a changed file is picked up without a signal."""

    def toml(self, pool_size=2, password="md5_pw", replica=False, extra=""):
        text = _FileConfigTestCase.toml(self, pool_size, password, replica, extra)
        return text.replace("[general]\n", "[general]\nautoreload = 200\n", 1)

    @defer.inlineCallbacks
    def test_changed_file_is_reloaded(self):
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        self.pooler.write(self.toml(pool_size=7))
        for _ in range(50):
            if up.address_pools[0].pool_size == 7:
                break
            yield sleep(0.1)
        self.assertEqual(up.address_pools[0].pool_size, 7)
        # A broken file is logged once and changes nothing.
        self.pooler.write(self.toml(pool_size=7) + "\nnot toml [\n")
        yield sleep(0.6)
        self.assertEqual(up.address_pools[0].pool_size, 7)
        self.assertIs(self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")], up)
