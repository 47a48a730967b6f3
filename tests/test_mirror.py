"""Mirroring (``mirrors = [[host, port, index]]``) against real PostgreSQL:
the main traffic loses nothing whether the mirror is up, unreachable or
stopped midway; when it is up, it gets the same statements (the rows the
main server got land there too)."""

import psycopg
from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.pgharness import topology
from tests.support import Pooler, free_port, in_thread, pooler_toml
from tests.test_admin import admin
from tests.test_roles import sleep, standalone_servers, wait_for

DB = "pgcat_test"
USER = "pgcat_md5"


def toml(primary_port, mirror_port, pool_size=2):
    text = pooler_toml(free_port(), [(primary_port, "primary")], pool_size=pool_size)
    return text.rstrip("\n") + f'\nmirrors = [["127.0.0.1", {mirror_port}, 0]]\n'


def insert_rows(pooler, n, tag):
    with psycopg.connect(pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for i in range(n):
            conn.execute("insert into mirrored (tag, i) values (%s, %s)", (tag, i))


class MirrorTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        self.primary = (yield threads.deferToThread(topology)).primary
        self.mirror = (yield threads.deferToThread(standalone_servers))[0]
        for node in (self.primary, self.mirror):
            yield threads.deferToThread(
                node.psql, "drop table if exists mirrored; "
                           "create table mirrored (tag text, i int)", db=DB, user=USER)

    @defer.inlineCallbacks
    def start(self, mirror_port):
        self.pooler = yield Pooler(toml(self.primary.port, mirror_port)).start()
        self.addCleanup(self.pooler.stop)

    def count(self, node, tag):
        return threads.deferToThread(
            lambda: int(node.psql(f"select count(*) from mirrored where tag = '{tag}'",
                                  db=DB, user=USER)))

    @defer.inlineCallbacks
    def test_mirror_gets_the_traffic(self):
        yield self.start(self.mirror.port)
        yield in_thread(insert_rows, self.pooler, 1000, "up")
        self.assertEqual((yield self.count(self.primary, "up")), 1000)
        mirrored = []

        def seen():
            return mirrored and mirrored[-1] == 1000

        for _ in range(100):
            mirrored.append((yield self.count(self.mirror, "up")))
            if seen():
                break
            yield sleep(0.1)
        self.assertEqual(mirrored[-1], 1000)
        stats = self.pooler.cluster.user_pools[(DB, USER)].address_pools[0].mirrors.stats[0]
        self.assertEqual((stats.dropped, stats.connected >= 1), (0, True))

    @defer.inlineCallbacks
    def test_reload_adds_and_removes_the_mirror_of_live_connections(self):
        """The same client (its server connection kept by the pool) is
        mirrored after a reload adds the mirror, and no longer after one
        removes it."""
        import os
        from tests.test_reload import FilePooler
        path = os.path.abspath(self.mktemp()) + ".toml"
        plain = pooler_toml(free_port(), [(self.primary.port, "primary")], pool_size=1)
        self.pooler = yield FilePooler(path, plain).start()
        self.addCleanup(self.pooler.stop)
        conn = yield in_thread(psycopg.connect, self.pooler.dsn(), autocommit=True,
                               prepare_threshold=None)
        self.addCleanup(conn.close)

        def insert(tag, n):
            for i in range(n):
                conn.execute("insert into mirrored (tag, i) values (%s, %s)", (tag, i))

        def reload(text):
            self.pooler.write(text)
            self.assertIsNone(self.pooler.service.reload_problem())

        yield in_thread(insert, "before", 20)
        pool = self.pooler.cluster.user_pools[(DB, USER)].address_pools[0]
        (server,) = list(pool.idle)
        mirrored = plain.rstrip("\n") + f'\nmirrors = [["127.0.0.1", {self.mirror.port}, 0]]\n'
        reload(mirrored)
        yield in_thread(insert, "during", 50)
        self.assertEqual(list(pool.idle), [server])      # the same server connection
        yield wait_for(lambda: pool.mirrors.stats[0].sent >= 50, 10, "mirrored chunks")
        for _ in range(100):
            if (yield self.count(self.mirror, "during")) == 50:
                break
            yield sleep(0.1)
        self.assertEqual((yield self.count(self.mirror, "during")), 50)
        reload(plain)
        self.assertIsNone(pool.mirrors)
        yield in_thread(insert, "after", 20)
        yield sleep(0.3)
        self.assertEqual((yield self.count(self.mirror, "before")), 0)
        self.assertEqual((yield self.count(self.mirror, "after")), 0)
        self.assertEqual((yield self.count(self.primary, "after")), 20)
        self.assertEqual(server.mirrors, ())

    @defer.inlineCallbacks
    def test_unreachable_mirror_loses_nothing(self):
        yield self.start(free_port())   # nothing listens there
        yield in_thread(insert_rows, self.pooler, 300, "down")
        self.assertEqual((yield self.count(self.primary, "down")), 300)
        stats = self.pooler.cluster.user_pools[(DB, USER)].address_pools[0].mirrors.stats[0]
        self.assertGreater(stats.failures, 0)
        self.assertEqual(stats.connected, 0)

    @defer.inlineCallbacks
    def test_mirror_stopped_midway(self):
        yield self.start(self.mirror.port)
        yield in_thread(insert_rows, self.pooler, 200, "mid1")
        yield threads.deferToThread(self.mirror.stop)
        self.addCleanup(threads.deferToThread, self.mirror.start)
        yield in_thread(insert_rows, self.pooler, 300, "mid2")
        self.assertEqual((yield self.count(self.primary, "mid1")), 200)
        self.assertEqual((yield self.count(self.primary, "mid2")), 300)
        stats = self.pooler.cluster.user_pools[(DB, USER)].address_pools[0].mirrors.stats[0]
        yield wait_for(lambda: stats.connected == 0, 10, "the mirror to be seen down")
        cols, rows = yield in_thread(admin, self.pooler.port, "SHOW MIRRORS")
        self.assertEqual(rows[0]["host"], "127.0.0.1")
        self.assertEqual(rows[0]["port"], self.mirror.port)
