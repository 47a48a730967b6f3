"""Issue 13 part B against real PostgreSQL: the configured roles are the
truth until a failover shows otherwise (pgcat_tw.balancer, "Roles").

Two standalone servers (each its own cluster, ``initdb``'d by a throwaway
``PgTopology``: not in recovery, as a logical-replication subscriber or a
restored copy would be) are configured as replicas beside a primary and a
real streaming replica. They are built once for the module and shared by
its tests; the destructive test gets its own primary + streaming replica.

Where rows land is checked on each server directly, besides
``inet_server_port()`` through the pooler.
"""

import atexit
import threading
import time

import psycopg
from twisted.internet import defer, reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.pgharness import PgTopology, topology
from tests.support import Pooler, free_port, in_thread, pooler_toml

PORT_SQL = "select inet_server_port()"
USER = "pgcat_md5"
DB = "pgcat_test"

_standalone = []
_standalone_lock = threading.Lock()


def standalone_servers():
    """Two standalone servers (separate clusters, never in recovery) with
    the harness's users and databases; made once per run (blocking)."""
    with _standalone_lock:
        while len(_standalone) < 2:
            topo = PgTopology()
            atexit.register(topo.close)
            topo._init_primary()
            _standalone.append(topo.primary)
        for node in _standalone:
            if not node.is_running():
                node.start()
        return list(_standalone)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_for(predicate, timeout, what, step=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield sleep(step)


def create_table(nodes, table):
    """The same table on each node (blocking); a streaming replica gets it
    from its primary."""
    for node in nodes:
        node.psql(f"drop table if exists {table}; "
                  f"create table {table} (tag text, port int)", db=DB, user=USER)


def rows_on(node, table, tag):
    return int(node.psql(f"select count(*) from {table} where tag = '{tag}'", db=DB, user=USER))


class RoleTestCase(unittest.TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        self.s1, self.s2 = yield threads.deferToThread(standalone_servers)
        self.logs = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)

    @defer.inlineCallbacks
    def start_pooler(self, servers, general="", pool_extra='default_role = "primary"'):
        text = pooler_toml(
            free_port(), servers,
            general="healthcheck_interval = 500\nban_time = 2\nban_probe_interval = 500\n"
                    "connect_timeout = 1000\n" + general,
            pool_extra=pool_extra)
        self.pooler = yield Pooler(text).start()
        self.addCleanup(self.pooler.stop)
        self.up = self.pooler.cluster.user_pools[(DB, USER)]
        return self.pooler

    def address(self, node):
        for p in self.up.address_pools:
            if p.address.port == node.port:
                return p
        raise KeyError(node.port)

    def warnings_naming(self, node, words):
        addr = f"127.0.0.1:{node.port}"
        return [t for t in map(formatEvent, self.logs) if addr in t and words in t]

    def ports(self, n, setup=()):
        """n autocommit queries on one client connection: the ports that
        answered."""
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                for sql in setup:
                    conn.execute(sql)
                return [conn.execute(PORT_SQL).fetchone()[0] for _ in range(n)]
        return in_thread(go)

    def write(self, table, tag, n=1, setup=()):
        """n inserts through the pooler, each its own transaction: the ports
        that took them."""
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                for sql in setup:
                    conn.execute(sql)
                return [conn.execute(f"insert into {table} values (%s, inet_server_port()) "
                                     "returning port", [tag]).fetchone()[0]
                        for _ in range(n)]
        return in_thread(go)


class StandaloneReplicaTests(RoleTestCase):
    @defer.inlineCallbacks
    def test_standalone_replicas_serve_reads_only(self):
        """The issue's configuration: no server becomes a primary at start,
        reads reach only the replicas (both standalone ones too), writes
        (explicit and by default_role) only the primary."""
        topo = yield threads.deferToThread(topology, 1)
        primary, replica = topo.primary, topo.replicas[0]
        s1, s2 = self.s1, self.s2
        table = "roles_standalone"
        yield threads.deferToThread(create_table, [primary, s1, s2], table)
        self.addCleanup(threads.deferToThread, create_table, [primary, s1, s2], table)
        yield self.start_pooler([(primary.port, "primary"), (s1.port, "replica"),
                                 (replica.port, "replica"), (s2.port, "replica")])
        ports = yield self.ports(60, setup=["SET SERVER ROLE TO 'replica'"])
        self.assertEqual(set(ports), {s1.port, s2.port, replica.port})
        ports = yield self.write(table, "explicit", 10, setup=["SET SERVER ROLE TO 'primary'"])
        self.assertEqual(set(ports), {primary.port})
        ports = yield self.write(table, "default", 10)
        self.assertEqual(set(ports), {primary.port})
        # Several health-check periods: still the same.
        yield sleep(2.0)
        ports = yield self.ports(5, setup=["SET SERVER ROLE TO 'primary'"])
        self.assertEqual(set(ports), {primary.port})
        for tag in ("explicit", "default"):
            self.assertEqual((yield threads.deferToThread(rows_on, primary, table, tag)), 10)
            for node in (s1, s2):
                self.assertEqual((yield threads.deferToThread(rows_on, node, table, tag)), 0)
        for node in (s1, s2):
            pool = self.address(node)
            self.assertEqual(pool.health.role, "primary")   # it is not in recovery...
            self.assertFalse(self.warnings_naming(node, "is now a primary"))
            warned = self.warnings_naming(node, "stays a replica")
            self.assertEqual(len(warned), 1, warned)         # ...said once
        self.assertEqual(self.up.balancer.route(0, "primary", False),
                         (self.address(primary),))


class FailoverTests(RoleTestCase):
    @defer.inlineCallbacks
    def test_writes_follow_the_promoted_standby_not_the_standalones(self):
        topo = yield threads.deferToThread(PgTopology)
        self.addCleanup(threads.deferToThread, topo.close)
        yield threads.deferToThread(topo._init_primary)
        standby = yield threads.deferToThread(topo.add_replica)
        primary, s1, s2 = topo.primary, self.s1, self.s2
        table = "roles_failover"
        yield threads.deferToThread(create_table, [primary, s1, s2], table)
        self.addCleanup(threads.deferToThread, create_table, [s1, s2], table)
        yield self.start_pooler([(primary.port, "primary"), (s1.port, "replica"),
                                 (standby.port, "replica"), (s2.port, "replica")])
        ports = yield self.write(table, "before", 5)
        self.assertEqual(set(ports), {primary.port})
        ports = yield self.ports(60, setup=["SET SERVER ROLE TO 'replica'"])
        self.assertEqual(set(ports), {s1.port, s2.port, standby.port})

        yield threads.deferToThread(primary.stop)
        yield threads.deferToThread(standby.promote)
        promoted = time.monotonic()
        while True:
            try:
                ports = yield self.write(table, "after", 1)
                break
            except psycopg.Error:
                self.assertLess(time.monotonic() - promoted, 15, "writes never came back")
                yield sleep(0.25)
        self.assertEqual(ports, [standby.port])
        self.assertLess(time.monotonic() - promoted, 8)
        ports = yield self.write(table, "after", 9, setup=["SET SERVER ROLE TO 'primary'"])
        self.assertEqual(set(ports), {standby.port})
        bal = self.up.balancer
        self.assertEqual(bal.route(0, "primary", False), (self.address(standby),))
        self.assertEqual((yield threads.deferToThread(rows_on, standby, table, "after")), 10)
        self.assertEqual((yield threads.deferToThread(rows_on, standby, table, "before")), 5)
        for node in (s1, s2):
            for tag in ("before", "after"):
                self.assertEqual((yield threads.deferToThread(rows_on, node, table, tag)), 0)
            self.assertFalse(self.warnings_naming(node, "is now a primary"))

        # The old primary comes back: a standalone server, not in recovery.
        yield threads.deferToThread(primary.start)
        old = self.address(primary)
        yield wait_for(lambda: old.health.role == "primary" and not old.health.down
                       and not old.health.banned, 15, "the pooler to see the old primary")
        yield sleep(2.0)   # four health-check periods
        ports = yield self.write(table, "back", 10)
        self.assertEqual(set(ports), {standby.port})
        ports = yield self.ports(30, setup=["SET SERVER ROLE TO 'replica'"])
        self.assertEqual(set(ports), {s1.port, s2.port})   # it serves nothing
        ports = yield self.ports(40, setup=["SET SERVER ROLE TO 'any'"])
        self.assertNotIn(primary.port, ports)
        self.assertEqual((yield threads.deferToThread(rows_on, primary, table, "back")), 0)
        self.assertEqual((yield threads.deferToThread(rows_on, standby, table, "back")), 10)
        warned = self.warnings_naming(primary, "split brain")
        self.assertEqual(len(warned), 1, warned)
        self.assertIn(f"127.0.0.1:{standby.port} is the primary", warned[0])
