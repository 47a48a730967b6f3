"""Balancer and health monitor (pgcat_tw.balancer, pgcat_tw.health) on a
Clock: routes by role, load balancing, bans and their expiry, probes of
banned servers, role discovery and replica lag. A real UserPool is built
from a config; its pools connect to fake servers instead of PostgreSQL.
"""

import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw import balancer as balancer_mod
from pgcat_tw.backend import QueryResult
from pgcat_tw.cluster import UserPool
from pgcat_tw.config import parse
from pgcat_tw.errors import PoolTimeout, ServerConnectionFailed


def toml(general="", pool=""):
    if "ban_time" not in general:
        general += "\nban_time = 60"
    return f"""
[general]
admin_username = "a"
admin_password = "a"
connect_timeout = 1000
{general}
[pools.app]
{pool}
[pools.app.users.0]
username = "u"
password = "p"
pool_size = 2
[pools.app.shards.0]
database = "db"
servers = [["10.0.0.1", 5432, "primary"], ["10.0.0.2", 5432, "replica"],
           ["10.0.0.3", 5432, "replica"]]
"""


class FakeServer:
    """What one address answers: up or down (refuses), hanging (never
    answers), in recovery or not, its WAL position."""

    def __init__(self, in_recovery):
        self.up = True
        self.hang = False
        self.in_recovery = in_recovery
        self.lsn = 0
        self.connects = 0
        self.checks = 0


class FakeConn:
    def __init__(self, clock, server):
        self.clock = clock
        self.server = server
        self.created_at = clock.seconds()
        self.last_used = clock.seconds()
        self.pool = None
        self.closed = False
        self.params = {"in_hot_standby": "on" if server.in_recovery else "off"}

    def run(self, queries, timeout=None):
        s = self.server
        s.checks += 1
        if s.hang:
            d = defer.Deferred()
            d.addTimeout(timeout, self.clock)
            return d
        if not s.up or self.closed:
            return defer.fail(ServerConnectionFailed("server closed the connection"))
        self.params["in_hot_standby"] = "on" if s.in_recovery else "off"
        r = QueryResult()
        lsn = f"{s.lsn >> 32:X}/{s.lsn & 0xFFFFFFFF:X}"
        r.rows = [("t" if s.in_recovery else "f", lsn)]
        r.tag = "SELECT 1"
        return defer.succeed([r])

    def close(self):
        self.closed = True


class Base(SynchronousTestCase):
    def make(self, general="", pool="", seed=1):
        balancer_mod._random = random.Random(seed).random
        self.addCleanup(setattr, balancer_mod, "_random", random.random)
        self.clock = Clock()
        self.clock.advance(1000)
        config, warnings = parse(toml(general, pool))
        self.assertEqual(warnings, [])
        pool_cfg = config.pools[0]
        self.up = UserPool(self.clock, config, pool_cfg, pool_cfg.users[0])
        self.bal = self.up.balancer
        self.P, self.R1, self.R2 = self.up.address_pools
        self.servers = {}
        for p in self.up.address_pools:
            server = FakeServer(in_recovery=p.address.role == "replica")
            self.servers[p] = server
            p._connect = self._connector(p, server)
        return self.up

    def _connector(self, pool, server):
        def connect():
            server.connects += 1
            if server.hang:
                d = defer.Deferred()
                d.addTimeout(1.0, self.clock)
                return d.addErrback(lambda f: (_ for _ in ()).throw(
                    ServerConnectionFailed("could not connect: timed out")))
            if not server.up:
                return defer.fail(ServerConnectionFailed(
                    f"could not connect to server {pool.address.host}: Connection refused"))
            conn = FakeConn(self.clock, server)
            return defer.maybeDeferred(self.up._learn_role, conn, pool)
        return connect

    def tick(self, seconds=1.0):
        """Advance the clock and run the janitor's tick."""
        self.clock.advance(seconds)
        self.up.reap(self.clock.seconds())

    def warm(self, pool, n=1):
        """Open n connections in ``pool`` and leave them idle."""
        got = []
        for _ in range(n):
            r = pool.acquire()
            got.append(r if not isinstance(r, defer.Deferred) else self.successResultOf(r))
        for c in got:
            pool.release(c)
        return got


class RouteTests(Base):
    def test_routes_by_role(self):
        self.make()
        P, R1, R2 = self.P, self.R1, self.R2
        self.assertEqual(self.bal.route(0, "primary", False), (P,))
        self.assertEqual(self.bal.route(0, "replica", False), (R1, R2))
        self.assertEqual(self.bal.route(0, "replica", True), (R1, R2, P))
        self.assertEqual(self.bal.route(0, "any", False), (R1, R2, P))
        self.assertEqual(self.bal.route(0, "auto", False), (R1, R2, P))
        self.assertEqual(self.bal.route(1, "any", False), ())

    def test_default_role(self):
        self.make(pool='default_role = "replica"')
        self.assertEqual(self.bal.route(0, None, False), (self.R1, self.R2))
        self.assertEqual(self.bal.route(0, "default", False), (self.R1, self.R2))

    def test_random_spreads_evenly(self):
        self.make()
        self.warm(self.R1, 2)
        self.warm(self.R2, 2)
        counts = {self.R1: 0, self.R2: 0}
        for _ in range(2000):
            conn = self.bal.take_idle("replica", False, 0)
            counts[conn.pool] += 1
            conn.pool.release(conn)
        for n in counts.values():
            self.assertTrue(700 <= n <= 1300, counts)

    def test_loc_prefers_least_busy(self):
        self.make(pool='load_balancing_mode = "loc"')
        self.warm(self.R1, 2)
        self.warm(self.R2, 2)
        held = self.R1.take_idle()  # one transaction running on R1
        for _ in range(50):
            conn = self.bal.take_idle("replica", False, 0)
            self.assertIs(conn.pool, self.R2)
            self.R2.release(conn)
        self.R1.release(held)
        # Equal load: both are used.
        seen = set()
        for _ in range(50):
            conn = self.bal.take_idle("replica", False, 0)
            seen.add(conn.pool)
            conn.pool.release(conn)
        self.assertEqual(seen, {self.R1, self.R2})

    def test_stale_idle_server_is_left_for_the_health_check(self):
        self.make(general="healthcheck_delay = 30000")
        (conn,) = self.warm(self.P)
        self.tick(10)
        self.assertIs(self.bal.take_idle("primary", False, 0), conn)
        self.P.release(conn)
        self.tick(31)
        self.assertIsNone(self.bal.take_idle("primary", False, 0))
        self.assertTrue(self.P.is_stale(conn))
        self.assertIs(self.P.take_idle_any(), conn)


class BanTests(Base):
    def test_ban_excludes_replica_until_ban_time(self):
        self.make(general="ban_probe_interval = 0")
        self.assertTrue(self.bal.ban(self.R1, "connect failed"))
        self.assertEqual(self.bal.route(0, "replica", False), (self.R2,))
        self.tick(59)
        self.assertTrue(self.R1.health.banned)
        self.tick(1)
        self.assertFalse(self.R1.health.banned)
        self.assertEqual(self.bal.route(0, "replica", False), (self.R1, self.R2))

    def test_primary_is_never_banned(self):
        self.make()
        self.assertFalse(self.bal.ban(self.P, "connect failed"))
        self.assertFalse(self.P.health.banned)
        self.assertEqual(self.P.health.errors, 1)
        self.assertEqual(self.bal.route(0, "primary", False), (self.P,))

    def test_ban_sends_queued_clients_elsewhere_at_once(self):
        self.make()
        self.servers[self.R1].hang = True
        d = self.R1.acquire()
        self.bal.ban(self.R1, "health check failed")
        f = self.failureResultOf(d, ServerConnectionFailed)
        self.assertIn("banned", f.value.message)

    def test_all_replicas_banned_bans_cleared_when_nowhere_else(self):
        self.make()
        self.bal.ban(self.R1, "x")
        self.bal.ban(self.R2, "x")
        self.assertEqual(self.bal.route(0, "replica", False), ())
        # With primary reads the primary serves: the bans stay.
        self.assertIs(self.bal.choose(0, "replica", True), self.P)
        self.assertTrue(self.R1.health.banned and self.R2.health.banned)
        # Without, PgCat's rule: the shard's bans are cleared.
        self.assertIn(self.bal.choose(0, "replica", False), (self.R1, self.R2))
        self.assertFalse(self.R1.health.banned or self.R2.health.banned)
        # ... but a checkout never tries an address twice.
        self.bal.ban(self.R1, "x")
        self.bal.ban(self.R2, "x")
        self.assertIsNone(self.bal.choose(0, "replica", False, [self.R1, self.R2]))

    def test_unavailable_error_names_the_replicas(self):
        self.make()
        self.bal.ban(self.R1, "connection refused")
        self.bal.ban(self.R2, "connection refused")
        err = self.bal.unavailable_error(0, "replica", False)
        self.assertIsInstance(err, ServerConnectionFailed)
        self.assertIn("10.0.0.2:5432 banned: connection refused", err.message)
        self.assertIn("primary reads are off", err.message)

    def test_server_failed_bans_replica_and_looks_for_primary(self):
        self.make()
        self.up.server_failed(self.R1, ServerConnectionFailed("refused"))
        self.assertTrue(self.R1.health.banned)
        self.up.server_failed(self.P, ServerConnectionFailed("refused"))
        self.assertFalse(self.P.health.banned)
        self.assertIn(0, self.bal.discovering)


class ProbeTests(Base):
    def test_banned_replica_back_as_soon_as_it_answers(self):
        self.make(general="ban_probe_interval = 1000")
        server = self.servers[self.R1]
        server.up = False
        self.bal.ban(self.R1, "connect failed")
        self.tick()
        self.tick()
        self.assertTrue(self.R1.health.banned)
        self.assertGreaterEqual(server.connects, 1)
        server.up = True
        self.tick()
        self.assertFalse(self.R1.health.banned)
        self.assertEqual(self.bal.route(0, "replica", False), (self.R1, self.R2))
        # The probe's connection joined the pool.
        self.assertEqual(len(self.R1.idle), 1)
        self.assertEqual(self.up.monitor.connections(), 0)

    def test_probe_interval(self):
        self.make(general="ban_probe_interval = 3000")
        server = self.servers[self.R1]
        server.up = False
        self.bal.ban(self.R1, "connect failed")
        for _ in range(9):
            self.tick()
        self.assertEqual(server.connects, 3)

    def test_ban_renewed_while_probes_fail(self):
        self.make(general="ban_probe_interval = 1000\nban_time = 5")
        server = self.servers[self.R1]
        server.up = False
        self.bal.ban(self.R1, "connect failed")
        for _ in range(12):
            self.tick()
            self.assertTrue(self.R1.health.banned)
        server.up = True
        self.tick()
        self.assertFalse(self.R1.health.banned)

    def test_hanging_probe_does_not_pile_up(self):
        self.make(general="ban_probe_interval = 1000\nhealthcheck_timeout = 500")
        server = self.servers[self.R1]
        server.hang = True
        self.bal.ban(self.R1, "connect timed out")
        self.tick()
        self.assertEqual(server.connects, 1)
        self.clock.advance(0.5)
        self.up.reap(self.clock.seconds())
        self.assertEqual(server.connects, 1)  # still running: no second probe
        self.clock.advance(0.5)  # the connect times out
        self.tick()
        self.assertTrue(self.R1.health.banned)
        self.assertLessEqual(server.connects, 2)

    def test_close_cancels_probes(self):
        self.make()
        self.servers[self.R1].hang = True
        self.bal.ban(self.R1, "x")
        self.tick()
        self.up.close()
        self.assertEqual(self.up.monitor.connections(), 0)
        self.tick(10)


class HealthCheckTests(Base):
    def test_periodic_check_bans_replica_that_stops_answering(self):
        self.make(general="healthcheck_interval = 2000\nhealthcheck_timeout = 500")
        (conn,) = self.warm(self.R1)
        self.servers[self.R1].hang = True
        self.tick(2)
        self.assertFalse(self.R1.health.banned)
        self.clock.advance(0.5)
        self.assertTrue(self.R1.health.banned)
        self.assertIn("health check failed", self.R1.health.ban_reason)

    def test_check_keeps_idle_timeout(self):
        self.make(general="healthcheck_interval = 1000")
        (conn,) = self.warm(self.R1)
        used = conn.last_used
        for _ in range(5):
            self.tick()
        self.assertGreater(self.servers[self.R1].checks, 3)
        self.assertEqual(conn.last_used, used)

    def test_busy_address_not_checked(self):
        self.make(general="healthcheck_interval = 1000")
        (conn,) = self.warm(self.R1)
        taken = self.R1.take_idle()
        self.tick(5)
        self.assertEqual(self.servers[self.R1].checks, 0)
        self.R1.release(taken)


class RoleDiscoveryTests(Base):
    def test_role_reported_at_connect(self):
        self.make()
        self.servers[self.R2].in_recovery = False  # promoted before we connected
        self.warm(self.R2)
        self.assertEqual(self.R2.health.role, "primary")
        self.assertEqual(self.bal.route(0, "primary", False), (self.R2,))

    def test_promoted_replica_takes_writes_former_primary_none(self):
        self.make(general="healthcheck_interval = 1000")
        self.warm(self.P)
        self.warm(self.R1)
        self.warm(self.R2)
        self.tick()
        self.assertEqual(self.bal.route(0, "primary", False), (self.P,))
        # Failover: R1 promoted, the old primary comes back as a standby.
        self.servers[self.R1].in_recovery = False
        self.servers[self.P].in_recovery = True
        self.tick()
        self.assertEqual(self.bal.route(0, "primary", False), (self.R1,))
        self.assertEqual(self.bal.route(0, "replica", False), (self.P, self.R2))
        self.assertEqual(self.P.health.effective_role, "replica")

    def test_newest_primary_wins_split_brain(self):
        self.make(general="healthcheck_interval = 1000")
        self.warm(self.P)
        self.warm(self.R1)
        self.tick()
        self.servers[self.R1].in_recovery = False  # promoted, old primary still up
        self.tick()
        self.assertEqual(self.bal.route(0, "primary", False), (self.R1,))
        # The old primary serves nothing while it claims to be a primary.
        self.assertNotIn(self.P, self.bal.route(0, "any", False))

    def test_discovery_when_primary_fails(self):
        self.make(general="healthcheck_interval = 0")
        self.servers[self.P].up = False
        self.up.server_failed(self.P, ServerConnectionFailed("Connection refused"))
        self.tick()
        # Every server was asked (connections opened as needed).
        self.assertEqual(self.servers[self.R1].checks + self.servers[self.R2].checks, 2)
        self.assertEqual(self.bal.route(0, "primary", False), (self.P,))
        self.servers[self.R2].in_recovery = False  # pg_ctl promote
        self.tick()
        self.assertEqual(self.bal.route(0, "primary", False), (self.R2,))
        self.assertNotIn(0, self.bal.discovering)
        checks = self.servers[self.R1].checks
        self.tick()
        self.assertEqual(self.servers[self.R1].checks, checks)  # discovery over

    def test_no_primary_error(self):
        self.make()
        self.bal.set_role(self.P, True)
        self.assertEqual(self.bal.route(0, "primary", False), ())
        self.assertIsNone(self.bal.choose(0, "primary", False))
        self.assertIn(0, self.bal.discovering)
        err = self.bal.unavailable_error(0, "primary", False)
        self.assertIn("no primary", err.message)


class LagTests(Base):
    def make_lag(self):
        self.make(general="healthcheck_interval = 1000", pool="max_replica_lag = 100")
        for p in (self.P, self.R1, self.R2):
            self.warm(p)
        self.servers[self.P].lsn = 1000
        self.servers[self.R1].lsn = 1000
        self.servers[self.R2].lsn = 1000
        self.tick()

    def test_lagging_replica_ineligible_until_it_catches_up(self):
        self.make_lag()
        self.assertEqual(self.bal.route(0, "replica", False), (self.R1, self.R2))
        self.servers[self.P].lsn = 5000
        self.servers[self.R1].lsn = 4950   # 50 behind: fine
        self.servers[self.R2].lsn = 2000   # 3000 behind
        self.tick()
        self.assertEqual(self.R2.health.lag, 3000)
        self.assertEqual(self.bal.route(0, "replica", False), (self.R1,))
        self.servers[self.R2].lsn = 5000
        self.tick()
        self.assertEqual(self.bal.route(0, "replica", False), (self.R1, self.R2))

    def test_every_replica_lagging_reads_go_to_primary(self):
        self.make_lag()
        self.servers[self.P].lsn = 9000
        self.tick()
        self.assertEqual(self.bal.route(0, "replica", False), (self.P,))
        self.assertEqual(self.bal.route(0, "any", False), (self.P,))

    def test_no_limit_by_default(self):
        self.make(general="healthcheck_interval = 1000")
        for p in (self.P, self.R1):
            self.warm(p)
        self.servers[self.P].lsn = 10 ** 9
        self.tick()
        self.assertIn(self.R1, self.bal.route(0, "replica", False))

    def test_lsn_parsing(self):
        from pgcat_tw.health import parse_lsn
        self.assertEqual(parse_lsn("0/3000060"), 0x3000060)
        self.assertEqual(parse_lsn("16/B374D848"), (0x16 << 32) | 0xB374D848)
        self.assertIsNone(parse_lsn(None))
        self.assertIsNone(parse_lsn("junk"))


class PoolTimeoutKindTests(Base):
    """Exhaustion is not a server failure: it must not ban; a hanging
    connect is one."""

    def test_exhausted_pool_times_out_with_pool_timeout(self):
        self.make()
        self.warm(self.R1, 2)
        a, b = self.R1.take_idle(), self.R1.take_idle()
        d = self.R1.acquire()
        self.clock.advance(1.0)
        f = self.failureResultOf(d, PoolTimeout)
        self.assertIn("exhausted", f.value.message)
        self.R1.release(a)
        self.R1.release(b)

    def test_hanging_connect_times_out_as_server_failure(self):
        self.make()
        self.servers[self.R1].hang = True
        d = self.R1.acquire()
        self.clock.advance(1.0)
        f = self.failureResultOf(d, ServerConnectionFailed)
        self.assertNotIsInstance(f.value, PoolTimeout)
        self.assertIn("connect", f.value.message)


class RunTimeoutTests(SynchronousTestCase):
    """A pooler query (health check) that gets no answer in time fails; it
    must not look like a success (the check would pass)."""

    def test_run_timeout_fails_and_closes(self):
        from twisted.internet.testing import StringTransport

        from pgcat_tw.backend import ServerConnection

        clock = Clock()
        server = ServerConnection(clock, "127.0.0.1", 5432, "u", "p", "db")
        server.makeConnection(StringTransport())
        server.state = "idle"
        server.dataReceived = server._idle_data
        server.ready.callback(server)
        d = server.run([";"], timeout=0.5)
        clock.advance(0.5)
        f = self.failureResultOf(d, ServerConnectionFailed)
        self.assertIn("no answer within", f.value.message)
        self.assertTrue(server.closed)
