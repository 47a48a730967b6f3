"""Balancer and health monitor (pgcat_tw.balancer, pgcat_tw.health) on a
Clock: routes by role, load balancing, bans and their expiry, probes of
banned servers, role discovery and replica lag. A real UserPool is built
from a config; its pools connect to fake servers instead of PostgreSQL.
"""

import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw import balancer as balancer_mod
from pgcat_tw.backend import QueryResult
from pgcat_tw.cluster import Cluster, UserPool
from pgcat_tw.config import parse
from pgcat_tw.errors import PoolTimeout, ServerConnectionFailed
from pgcat_tw.health import RECOVERY_SQL


def toml(general="", pool="", roles=("primary", "replica", "replica")):
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
servers = [["10.0.0.1", 5432, "{roles[0]}"], ["10.0.0.2", 5432, "{roles[1]}"],
           ["10.0.0.3", 5432, "{roles[2]}"]]
"""


class FakeServer:
    """What one address answers: up or down (refuses), hanging (never
    answers), in recovery or not, whether it streamed WAL as a standby since
    it started (pg_last_wal_receive_lsn() not NULL), its WAL position."""

    def __init__(self, in_recovery):
        self.up = True
        self.hang = False
        self.in_recovery = in_recovery
        self.streamed = in_recovery
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
        rec, streamed = ("t" if s.in_recovery else "f"), ("t" if s.streamed else "f")
        r.rows = [(rec, streamed) if queries == [RECOVERY_SQL] else (rec, lsn, streamed)]
        r.tag = "SELECT 1"
        return defer.succeed([r])

    def close(self):
        self.closed = True


class Base(SynchronousTestCase):
    def make(self, general="", pool="", seed=1, roles=("primary", "replica", "replica")):
        balancer_mod._random = random.Random(seed).random
        self.addCleanup(setattr, balancer_mod, "_random", random.random)
        self.clock = Clock()
        self.clock.advance(1000)
        config, warnings = parse(toml(general, pool, roles))
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
        self.servers[self.R2].in_recovery = False  # not in recovery when we connected
        self.warm(self.R2)
        self.assertEqual(self.R2.health.role, "primary")
        # The configured primary answers for all we know: it keeps the
        # writes; R2 serves reads (the role rules: RoleRuleTests).
        self.assertEqual(self.bal.route(0, "primary", False), (self.P,))
        self.assertEqual(self.bal.route(0, "replica", False), (self.R1, self.R2))

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

    def test_promoted_while_primary_answers_primary_keeps_writes(self):
        self.make(general="healthcheck_interval = 1000")
        self.warm(self.P)
        self.warm(self.R1)
        self.tick()
        self.servers[self.R1].in_recovery = False  # promoted, old primary still up
        self.tick()
        # Never two primaries: the one that answers keeps the writes.
        self.assertEqual(self.bal.route(0, "primary", False), (self.P,))
        self.assertIn(self.R1, self.bal.route(0, "replica", False))

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


P_ADDR, R1_ADDR, R2_ADDR = "10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"


def warnings_about(logs, addr):
    """The warning lines (formatted) that name ``addr``."""
    texts = [formatEvent(e) for e in logs if getattr(e.get("log_level"), "name", "") == "warn"]
    return [t for t in texts if addr in t]


class RoleRuleTests(Base):
    """Issue 13: the configured roles are the truth until a failover shows
    otherwise (balancer module docstring, "Roles")."""

    def make_all(self, general="healthcheck_interval = 1000", standalone=None, **kw):
        """Every server connected and checked once; ``standalone``: the
        index of a replica that is a standalone server (not in recovery,
        never was)."""
        self.make(general=general, **kw)
        if standalone is not None:
            server = self.servers[self.up.address_pools[standalone]]
            server.in_recovery = server.streamed = False
        for p in (self.P, self.R1, self.R2):
            self.warm(p)
        self.tick()

    def start_with_primary_down(self):
        """Started while the configured primary is unreachable; R1 is a
        standalone server."""
        self.make(general="healthcheck_interval = 1000")
        self.servers[self.R1].in_recovery = self.servers[self.R1].streamed = False
        self.servers[self.P].up = False
        self.up.server_failed(self.P, ServerConnectionFailed("Connection refused"))
        self.tick()

    def assert_primary(self, pool):
        route = self.bal.route(0, "primary", False)
        self.assertEqual(route, (pool,) if pool is not None else ())

    def fail_primary(self):
        """The primary goes away; its next check fails."""
        self.servers[self.P].up = False
        self.tick()

    # --- a standalone server configured as a replica ---------------------------------

    def test_standalone_replica_stays_replica_with_one_warning(self):
        with capturedLogs() as logs:
            self.make_all(standalone=1)
            for _ in range(4):
                self.tick()
        self.assertGreater(self.servers[self.R1].checks, 3)
        self.assert_primary(self.P)
        self.assertEqual(self.bal.route(0, "replica", False), (self.R1, self.R2))
        warned = warnings_about(logs, R1_ADDR)
        self.assertEqual(len(warned), 1, warned)
        self.assertIn("never seen in recovery", warned[0])
        self.assertIn("stays a replica", warned[0])
        self.assertFalse([e for e in logs if "is now a" in formatEvent(e)])
        # It is a replica: a failure bans it (the primary is never banned).
        self.assertTrue(self.bal.ban(self.R1, "x"))
        self.assertEqual(self.bal.route(0, "replica", False), (self.R2,))

    def test_standalone_replica_does_not_take_over_a_failed_primary(self):
        self.make_all(standalone=1)
        with capturedLogs() as logs:
            self.fail_primary()
            for _ in range(3):
                self.tick()
        # Writes still go to the configured primary (and get its error).
        self.assert_primary(self.P)
        self.assertIn(0, self.bal.discovering)
        last = ServerConnectionFailed("could not connect to server 10.0.0.1: refused")
        err = self.bal.unavailable_error(0, "primary", False, last)
        self.assertIn("refused", err.message)
        self.assertIn(f"{R1_ADDR} is not in recovery but never seen leaving it", err.message)
        self.assertEqual(len(warnings_about(logs, R1_ADDR)), 1)
        # A real promotion of R2 takes over; R1 stays a replica.
        self.servers[self.R2].in_recovery = False
        self.tick()
        self.assert_primary(self.R2)
        self.assertEqual(self.bal.route(0, "replica", False), (self.R1,))

    def test_shard_without_configured_primary_gets_no_writes_from_a_standalone(self):
        self.make("healthcheck_interval = 1000", roles=("replica", "replica", "replica"))
        self.servers[self.P].in_recovery = self.servers[self.P].streamed = False
        for p in (self.P, self.R1, self.R2):
            self.warm(p)
        self.tick()
        self.assert_primary(None)
        self.assertEqual(self.bal.route(0, "replica", False), (self.P, self.R1, self.R2))
        err = self.bal.unavailable_error(0, "primary", False)
        self.assertIn(f"{P_ADDR} is not in recovery but never seen leaving it", err.message)

    # --- promotion -------------------------------------------------------------------------

    def test_promotion_waits_until_the_primary_is_gone(self):
        self.make_all()
        with capturedLogs() as logs:
            self.servers[self.R1].in_recovery = False   # pg_ctl promote
            for _ in range(3):
                self.tick()
        self.assert_primary(self.P)
        self.assertIn(self.R1, self.bal.route(0, "replica", False))
        warned = warnings_about(logs, R1_ADDR)
        self.assertEqual(len(warned), 1, warned)
        self.assertIn("left recovery", warned[0])
        with capturedLogs() as logs:
            self.fail_primary()
        self.assert_primary(self.R1)
        # The old primary (gone, last seen as a primary) serves nothing.
        self.assertEqual(self.bal.route(0, "any", False), (self.R2, self.R1))
        self.assertEqual([formatEvent(e) for e in logs if "is now a" in formatEvent(e)],
                         [f'pool "app" user "u": server {R1_ADDR} is now a primary (was '
                          'replica): routing follows'])

    def test_promotion_when_the_primary_enters_recovery(self):
        self.make_all()
        self.servers[self.P].in_recovery = True      # demoted: a standby now
        self.tick()
        self.assert_primary(None)
        self.servers[self.R2].in_recovery = False    # promoted
        self.tick()
        self.assert_primary(self.R2)
        self.assertEqual(self.bal.route(0, "replica", False), (self.P, self.R1))

    def test_contested_primary_is_checked_on_a_new_connection(self):
        self.make_all()
        for conn in list(self.P.idle):     # no idle connection left to check
            self.P.discard(conn)
        self.servers[self.R1].in_recovery = False
        self.tick()
        self.assertIn(0, self.bal.contested)
        connects = self.servers[self.P].connects
        self.servers[self.P].up = False
        self.tick()
        self.assertGreater(self.servers[self.P].connects, connects)
        self.assert_primary(self.R1)
        self.assertNotIn(0, self.bal.contested)

    def test_standby_that_streamed_counts_as_promoted(self):
        """A promoted standby the pooler never saw in recovery: it says it
        streamed WAL since it started (pg_last_wal_receive_lsn())."""
        self.make(general="healthcheck_interval = 1000")
        self.warm(self.P)
        self.tick()
        self.servers[self.R1].in_recovery = False    # promoted, never contacted
        self.servers[self.P].up = False
        self.up.server_failed(self.P, ServerConnectionFailed("Connection refused"))
        self.tick()   # every server is asked
        self.assert_primary(self.R1)
        self.assertNotIn(0, self.bal.discovering)

    def test_two_replicas_left_recovery_no_guess(self):
        self.make_all()
        self.servers[self.R1].in_recovery = False
        self.servers[self.R2].in_recovery = False
        self.tick()
        self.assert_primary(self.P)
        with capturedLogs() as logs:
            self.fail_primary()
            self.tick()
        self.assert_primary(self.P)  # gone, and nobody qualifies alone
        last = ServerConnectionFailed("could not connect: refused")
        err = self.bal.unavailable_error(0, "primary", False, last)
        self.assertIn(f"{R1_ADDR}, {R2_ADDR} are all left recovery: not choosing one",
                      err.message)
        noted = [formatEvent(e) for e in logs if "no server takes over" in formatEvent(e)]
        self.assertEqual(len(noted), 1, noted)
        # One of them rejoins as a standby: the other takes over.
        self.servers[self.R2].in_recovery = True
        self.tick()
        self.assert_primary(self.R1)

    # --- split brain ------------------------------------------------------------------------

    def test_former_primary_back_not_in_recovery_gets_nothing(self):
        self.make_all(general="healthcheck_interval = 1000\nban_probe_interval = 1000")
        self.fail_primary()
        self.servers[self.R1].in_recovery = False
        self.tick()
        self.assert_primary(self.R1)
        with capturedLogs() as logs:
            self.servers[self.P].up = True   # back, still a standalone primary
            for _ in range(6):
                self.tick()
                self.assertEqual(self.bal.route(0, "primary", False), (self.R1,))
        self.assertEqual(self.P.health.role, "primary")   # it answered
        self.assertFalse(self.P.health.banned)
        for role in ("replica", "any"):
            self.assertNotIn(self.P, self.bal.route(0, role, False))
            self.assertNotIn(self.P, self.bal.route(0, role, True))
        warned = [w for w in warnings_about(logs, P_ADDR) if "former primary" in w]
        self.assertEqual(len(warned), 1, warnings_about(logs, P_ADDR))
        self.assertIn("split brain", warned[0])
        self.assertIn(R1_ADDR, warned[0])
        # The new primary dies too: the former one still gets nothing.
        self.servers[self.R1].up = False
        self.tick()
        self.tick()
        self.assert_primary(self.R1)
        self.assertNotIn(self.P, self.bal.route(0, "any", False))
        self.servers[self.R1].up = True
        self.tick()
        # It rejoins as a standby (pg_rewind): a replica like the others.
        self.servers[self.P].in_recovery = True
        self.tick()
        self.assertEqual(self.bal.route(0, "replica", False), (self.P, self.R2))
        self.assert_primary(self.R1)

    # --- started after a failover -----------------------------------------------------------

    def start_after_failover(self, r1_out=True, r2_out=False):
        self.make(general="healthcheck_interval = 1000")
        self.servers[self.P].in_recovery = True      # rejoined as a standby
        for r, out in ((self.R1, r1_out), (self.R2, r2_out)):
            self.servers[r].in_recovery = not out
            self.servers[r].streamed = False         # e.g. restarted since
        self.warm(self.P)

    def test_started_after_failover_the_only_server_out_of_recovery_takes_over(self):
        self.start_after_failover()
        self.assert_primary(None)
        err = self.bal.unavailable_error(0, "primary", False)
        self.assertIn("waiting for", err.message)
        self.warm(self.R1)
        self.assert_primary(None)   # R2 has not reported yet
        self.warm(self.R2)
        self.assert_primary(self.R1)
        self.assertEqual(self.bal.route(0, "replica", False), (self.P, self.R2))
        # Once it answered as the primary, that rule is over: a standalone
        # server would not take over from it.
        self.assertIn(0, self.bal.confirmed)

    def test_started_after_failover_two_candidates_no_primary(self):
        self.start_after_failover(r2_out=True)
        self.warm(self.R1)
        self.warm(self.R2)
        self.tick()
        self.assert_primary(None)
        self.assertIsNone(self.bal.choose(0, "primary", False))
        err = self.bal.unavailable_error(0, "primary", False)
        self.assertIn("no primary is available for shard 0", err.message)
        self.assertIn(f"{R1_ADDR}, {R2_ADDR} are all not in recovery while {P_ADDR} is",
                      err.message)
        # Both serve reads meanwhile.
        self.assertEqual(self.bal.route(0, "replica", False), (self.P, self.R1, self.R2))

    def test_started_with_primary_unreachable_is_no_proof(self):
        self.start_with_primary_down()
        self.tick()
        self.assertEqual(self.R1.health.role, "primary")
        self.assert_primary(self.P)
        # It comes back as the primary it was (a restart): nothing changed.
        self.servers[self.P].up = True
        self.tick()
        self.assert_primary(self.P)
        self.assertNotIn(0, self.bal.discovering)
        self.assertIn(self.R1, self.bal.route(0, "replica", False))

    def test_started_with_primary_unreachable_then_back_as_standby(self):
        self.start_with_primary_down()
        self.assert_primary(self.P)
        self.servers[self.P].up = True
        self.servers[self.P].in_recovery = True   # that proves the failover
        self.tick()
        self.assert_primary(self.R1)

    # --- reload -------------------------------------------------------------------------------

    def test_reload_keeps_what_was_learned_when_the_servers_are_unchanged(self):
        clock = Clock()
        config, _ = parse(toml())
        old = Cluster(clock, config)
        bal = old.user_pools[("app", "u")].balancer
        P, R1, R2 = bal.pools
        for p in (P, R1, R2):
            bal.set_role(p, p is not P)
        bal.server_down(P)
        bal.set_role(R1, False)
        self.assertIs(bal.primary(0), R1)
        # Another pool setting changed: a new UserPool, same servers.
        config2, _ = parse(toml(pool='default_role = "replica"'))
        new = Cluster(clock, config2, previous=old)
        nbal = new.user_pools[("app", "u")].balancer
        self.assertIsNot(nbal, bal)
        self.assertEqual(nbal.route(0, "primary", False), (nbal.pools[1],))
        self.assertNotIn(nbal.pools[0], nbal.route(0, "any", False))
        # The roles changed in the file: the file is the truth again.
        config3, _ = parse(toml(roles=("replica", "primary", "replica")))
        newer = Cluster(clock, config3, previous=new)
        b3 = newer.user_pools[("app", "u")].balancer
        self.assertEqual(b3.route(0, "primary", False), (b3.pools[1],))
        self.assertEqual(b3.route(0, "replica", False), (b3.pools[0], b3.pools[2]))
        for c in (old, new, newer):
            c.close()


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
