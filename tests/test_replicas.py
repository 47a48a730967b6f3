"""Replicas through the pooler, against the run's real primary and two
streaming replicas (``topology(replicas=2)``, pg_basebackup -R), with the
fault-injecting proxy (tests/faultproxy.py) in front of replicas where a
test needs a broken link: load balancing, bans, failover that clients do not
notice, replica lag, and (on a throwaway primary + replica pair) primary
discovery after ``pg_ctl promote``.

Every test leaves the shared nodes running and streaming.
"""

import os
import time

import psycopg
import tomli
from twisted.internet import defer, reactor, task, threads, utils
from twisted.trial import unittest

from pgcat_tw.config import from_dict
from pgcat_tw.service import PgCatService
from tests.faultproxy import FaultProxy
from tests.pgharness import USERS, PgTopology, topology
from tests.support import PGBENCH, Pooler, free_port, in_thread, pooler_toml

HERE = os.path.dirname(os.path.abspath(__file__))
REPLICAS_TOML = os.path.join(os.path.dirname(HERE), "conf", "pgcat.replicas.toml")

PORT_SQL = "select inet_server_port()"


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_for(predicate, timeout, what, step=0.05):
    """Poll ``predicate()`` in the reactor until true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield sleep(step)
    return time.monotonic()


def wait_caught_up(topo, timeout=30):
    """Block until every replica replayed the primary's current WAL."""
    # insert, not write: with synchronous_commit off the commit record may
    # not have been written yet.
    lsn = topo.primary.psql("select pg_current_wal_insert_lsn()")
    deadline = time.monotonic() + timeout
    for r in topo.replicas:
        while r.psql(f"select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") != "t":
            if time.monotonic() > deadline:
                raise AssertionError(f"{r.name} did not catch up")
            time.sleep(0.05)


class ReplicaTestCase(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        self.topo = yield threads.deferToThread(topology, 2)
        self.primary = self.topo.primary
        self.r1, self.r2 = self.topo.replicas[:2]
        for node in (self.r1, self.r2):
            if not node.is_running():
                yield threads.deferToThread(node.start)

    @defer.inlineCallbacks
    def start_pooler(self, servers=None, general="", pool_extra="", pool_size=2,
                     pool_mode="transaction"):
        if servers is None:
            servers = [(self.primary.port, "primary"), (self.r1.port, "replica"),
                       (self.r2.port, "replica")]
        text = pooler_toml(free_port(), servers, pool_mode=pool_mode, pool_size=pool_size,
                           general=general, pool_extra=pool_extra)
        self.pooler = yield Pooler(text).start()
        self.addCleanup(self.pooler.stop)
        return self.pooler

    @defer.inlineCallbacks
    def proxy(self, node):
        p = yield FaultProxy("127.0.0.1", node.port).start()
        self.addCleanup(p.stop)
        return p

    @property
    def user_pool(self):
        return self.pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]

    def address(self, port):
        """The pooler's ConnectionPool for a configured port."""
        for p in self.user_pool.address_pools:
            if p.address.port == port:
                return p
        raise KeyError(port)

    def reads(self, n, setup=(), params=False):
        """n autocommit reads on one client connection (each its own
        transaction): the list of server ports that answered."""
        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
                for sql in setup:
                    conn.execute(sql)
                if params:
                    return [conn.execute("select inet_server_port() where %s", [True])
                            .fetchone()[0] for _ in range(n)]
                return [conn.execute(PORT_SQL).fetchone()[0] for _ in range(n)]
        return in_thread(go)


class LoadBalancingTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_random_spreads_reads_within_30_percent(self):
        yield self.start_pooler(pool_extra='default_role = "replica"')
        ports = yield self.reads(400)
        counts = {p: ports.count(p) for p in set(ports)}
        self.assertEqual(set(counts), {self.r1.port, self.r2.port}, counts)
        for port, n in counts.items():
            self.assertTrue(140 <= n <= 260, counts)  # 200 +- 30%

    @defer.inlineCallbacks
    def test_server_role_commands_route(self):
        yield self.start_pooler(pool_extra='default_role = "replica"')
        ports = yield self.reads(20, setup=["SET SERVER ROLE TO 'primary'"])
        self.assertEqual(set(ports), {self.primary.port})
        ports = yield self.reads(90, setup=["SET SERVER ROLE TO 'any'"])
        self.assertEqual(set(ports), {self.primary.port, self.r1.port, self.r2.port})
        ports = yield self.reads(60, setup=["SET SERVER ROLE TO 'replica'",
                                            "SET PRIMARY READS TO on"])
        self.assertEqual(set(ports), {self.primary.port, self.r1.port, self.r2.port})
        ports = yield self.reads(40, setup=["SET SERVER ROLE TO 'default'"])
        self.assertEqual(set(ports), {self.r1.port, self.r2.port})

    @defer.inlineCallbacks
    def test_writes_go_to_primary(self):
        yield self.start_pooler()  # default_role any: a write may land on a replica...

        def go():
            with psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
                conn.execute("SET SERVER ROLE TO 'primary'")
                conn.execute("create table if not exists repl_w (x int)")
                for i in range(20):
                    conn.execute("insert into repl_w values (%s)", [i])
                conn.execute("drop table repl_w")
        yield in_thread(go)

    @defer.inlineCallbacks
    def test_loc_prefers_the_idle_replica(self):
        yield self.start_pooler(pool_extra='default_role = "replica"\n'
                                           'load_balancing_mode = "loc"')

        def go():
            holder = psycopg.connect(self.pooler.dsn(), prepare_threshold=None)
            try:
                held = holder.execute(PORT_SQL).fetchone()[0]  # transaction stays open
                with psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
                    others = [conn.execute(PORT_SQL).fetchone()[0] for _ in range(30)]
                return held, others
            finally:
                holder.close()

        held, others = yield in_thread(go)
        other = self.r2.port if held == self.r1.port else self.r1.port
        self.assertEqual(set(others), {other})

    @defer.inlineCallbacks
    def test_session_mode_picks_per_session(self):
        yield self.start_pooler(pool_mode="session", pool_extra='default_role = "replica"')
        seen = set()
        for _ in range(12):
            ports = yield self.reads(5)
            self.assertEqual(len(set(ports)), 1)  # one server for the whole session
            seen.add(ports[0])
        self.assertEqual(seen, {self.r1.port, self.r2.port})


class BanTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_blackholed_replica_banned_within_connect_timeout(self):
        px = yield self.proxy(self.r1)
        px.set_mode("blackhole")
        yield self.start_pooler(
            servers=[(self.primary.port, "primary"), (px.listen_port, "replica"),
                     (self.r2.port, "replica")],
            general="ban_probe_interval = 0",
            pool_extra='default_role = "replica"\nconnect_timeout = 500')
        bad = self.address(px.listen_port)

        def go():
            times = []
            with psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
                for _ in range(30):
                    t0 = time.monotonic()
                    port = conn.execute(PORT_SQL).fetchone()[0]
                    times.append((time.monotonic() - t0, port))
            return times

        times = yield in_thread(go)
        self.assertEqual(px.accepted, 1)  # tried once, then skipped
        self.assertTrue(bad.health.banned)
        self.assertIn("connect", bad.health.ban_reason)
        self.assertEqual({port for _, port in times}, {self.r2.port})
        slow = [t for t, _ in times if t > 0.3]
        self.assertEqual(len(slow), 1, times)
        self.assertLess(slow[0], 0.5 + 0.5)

    @defer.inlineCallbacks
    def test_stale_server_health_checked_before_use(self):
        """A connection idle longer than healthcheck_delay is checked with
        ';' first; a replica that does not answer within healthcheck_timeout
        is banned and the read goes elsewhere, unnoticed."""
        px = yield self.proxy(self.r1)
        yield self.start_pooler(
            servers=[(self.primary.port, "primary"), (px.listen_port, "replica"),
                     (self.r2.port, "replica")],
            general="ban_probe_interval = 0\nhealthcheck_interval = 0\n"
                    "healthcheck_delay = 100\nhealthcheck_timeout = 300",
            pool_extra='default_role = "replica"')
        bad = self.address(px.listen_port)
        yield self.reads(20)
        self.assertGreater(len(bad.idle), 0)
        px.set_mode("blackhole")
        yield sleep(1.5)  # a janitor tick: the idle connections are stale now

        def go():
            times = []
            with psycopg.connect(self.pooler.dsn(), autocommit=True,
                                 prepare_threshold=None) as conn:
                for _ in range(20):
                    t0 = time.monotonic()
                    port = conn.execute(PORT_SQL).fetchone()[0]
                    times.append((time.monotonic() - t0, port))
            return times

        times = yield in_thread(go)
        self.assertTrue(bad.health.banned)
        self.assertIn("health check failed", bad.health.ban_reason)
        self.assertEqual({port for _, port in times}, {self.r2.port})
        slow = [t for t, _ in times if t > 0.2]
        self.assertEqual(len(slow), 1, times)
        self.assertLess(slow[0], 0.3 + 0.5)

    @defer.inlineCallbacks
    def test_all_replicas_down(self):
        p1 = yield self.proxy(self.r1)
        p2 = yield self.proxy(self.r2)
        p1.set_mode("reset")
        p2.set_mode("reset")
        yield self.start_pooler(
            servers=[(self.primary.port, "primary"), (p1.listen_port, "replica"),
                     (p2.listen_port, "replica")],
            general="ban_probe_interval = 0",
            pool_extra='default_role = "replica"\nprimary_reads_enabled = true')
        a1, a2 = self.address(p1.listen_port), self.address(p2.listen_port)
        # Primary reads on: the primary serves, the clients see no error.
        ports = yield self.reads(20)
        self.assertEqual(set(ports), {self.primary.port})
        self.assertTrue(a1.health.banned and a2.health.banned)
        tries = p1.accepted + p2.accepted

        # Primary reads off: a clear error, after PgCat's rule cleared the
        # bans and both replicas were tried again.
        def off():
            with psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
                conn.execute("SET PRIMARY READS TO off")
                try:
                    conn.execute(PORT_SQL)
                    err = None
                except psycopg.Error as e:
                    err = e
                # The connection stays usable.
                conn.execute("SET SERVER ROLE TO 'primary'")
                return err, conn.execute(PORT_SQL).fetchone()[0]

        err, port = yield in_thread(off)
        self.assertIsNotNone(err)
        self.assertEqual(err.sqlstate, "08006")
        self.assertIn("no replica of shard 0 is available", str(err))
        self.assertIn("primary reads are off", str(err))
        self.assertEqual(port, self.primary.port)
        self.assertEqual(p1.accepted + p2.accepted, tries + 2)

        # The replicas come back: the next read clears the bans and uses them.
        p1.set_mode("pass")
        p2.set_mode("pass")
        ports = yield self.reads(1, setup=["SET PRIMARY READS TO off"])
        self.assertIn(ports[0], (self.r1.port, self.r2.port))

    @defer.inlineCallbacks
    def test_exhausted_pool_bans_nobody(self):
        yield self.start_pooler(
            pool_size=1,
            pool_extra='default_role = "replica"\nload_balancing_mode = "loc"\n'
                       'connect_timeout = 400')

        def go():
            holders = [psycopg.connect(self.pooler.dsn(), prepare_threshold=None) for _ in range(2)]
            try:
                held = {h.execute(PORT_SQL).fetchone()[0] for h in holders}
                with psycopg.connect(self.pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
                    try:
                        conn.execute(PORT_SQL)
                        return held, None
                    except psycopg.Error as e:
                        return held, e
            finally:
                for h in holders:
                    h.close()

        held, err = yield in_thread(go)
        self.assertEqual(held, {self.r1.port, self.r2.port})
        self.assertIsNotNone(err)
        self.assertEqual(err.sqlstate, "53300")
        self.assertIn('pool "pgcat_test"', str(err))
        self.assertIn("exhausted", str(err))
        self.assertNotIn("AllServersDown", str(err))
        for pool in self.user_pool.address_pools:
            self.assertFalse(pool.health.banned, pool.name)


class ResendTests(ReplicaTestCase):
    """A standalone read whose replica dies before answering anything is
    re-sent elsewhere: simple and extended protocol."""

    @defer.inlineCallbacks
    def _resend(self, params):
        px = yield self.proxy(self.r1)
        yield self.start_pooler(
            servers=[(self.primary.port, "primary"), (px.listen_port, "replica"),
                     (self.r2.port, "replica")],
            general="ban_probe_interval = 0",
            pool_extra='default_role = "replica"')
        bad = self.address(px.listen_port)
        yield self.reads(10)  # warm: logins done
        self.assertGreater(len(bad.idle), 0)
        px.set_mode("mute")   # the query gets there, the answer never comes back
        sent = px.up_bytes

        results = []
        d = self.reads(20, params=params)
        d.addBoth(results.append)
        # Some read lands on the muted replica: it hangs until its link dies.
        yield wait_for(lambda: px.up_bytes > sent or results, 20, "a read on the replica")
        self.assertFalse(results, "every read avoided the muted replica")
        yield sleep(0.2)
        px.reset_links()
        yield wait_for(lambda: results, 20, "the reads to finish")
        ports = results[0]
        if isinstance(ports, Exception) or hasattr(ports, "raiseException"):
            ports.raiseException()
        self.assertEqual(len(ports), 20)
        self.assertTrue(bad.health.banned)
        self.assertEqual(set(ports[-5:]), {self.r2.port})

    def test_resend_simple(self):
        return self._resend(params=False)

    def test_resend_extended(self):
        return self._resend(params=True)

    @defer.inlineCallbacks
    def test_no_resend_inside_transaction(self):
        px = yield self.proxy(self.r1)
        yield self.start_pooler(
            servers=[(self.primary.port, "primary"), (px.listen_port, "replica")],
            general="ban_probe_interval = 0",
            pool_extra='default_role = "replica"')

        def go():
            conn = psycopg.connect(self.pooler.dsn(), prepare_threshold=None)
            try:
                conn.execute(PORT_SQL)  # BEGIN + read: a transaction is open
                self.reactor_call(px.set_mode, "mute")
                time.sleep(0.2)
                self.reactor_call(lambda: reactor.callLater(0.3, px.reset_links))
                try:
                    conn.execute(PORT_SQL)
                    return None
                except psycopg.OperationalError as e:
                    return e
            finally:
                conn.close()

        err = yield in_thread(go)
        self.assertIsNotNone(err, "a read inside a transaction must not be re-sent")

    def reactor_call(self, f, *args):
        threads.blockingCallFromThread(reactor, f, *args)


class FailoverUnderLoadTests(ReplicaTestCase):
    """pgbench -S with 8 clients on the replicas; one replica is SIGKILLed
    mid-run and restarted: no client sees an error, the replica is banned
    and back in rotation (probed) long before ban_time."""

    @defer.inlineCallbacks
    def _pgbench_init(self):
        env = dict(os.environ, PGPASSWORD=USERS["pgcat_md5"], PGSSLMODE="disable")
        out, err, code = yield utils.getProcessOutputAndValue(
            PGBENCH, ["-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "pgcat_md5",
                      "-i", "-s", "1", "-q", "pgcat_test"], env=env)
        self.assertEqual(code, 0, err)
        yield threads.deferToThread(wait_caught_up, self.topo)

    @defer.inlineCallbacks
    def test_replica_killed_during_read_load(self):
        yield self._pgbench_init()
        self.addCleanup(threads.deferToThread, self.r1.start)
        yield self.start_pooler(
            pool_size=4, general="ban_time = 60\nban_probe_interval = 1000",
            pool_extra='default_role = "replica"')
        r1 = self.address(self.r1.port)
        bench = self.pooler.pgbench("-S", "-c", "8", "-j", "2", "-T", "9", "-n")
        yield sleep(2.5)
        self.assertGreater(len(r1.busy) + len(r1.idle), 0, "replica 1 served nothing")
        yield threads.deferToThread(self.r1.kill)
        killed = time.monotonic()
        yield wait_for(lambda: r1.health.banned, 5, "the ban")
        yield sleep(1.0)
        yield threads.deferToThread(self.r1.start)
        out, err, code = yield bench
        text = out.decode()
        self.assertEqual(code, 0, (text, err))
        self.assertNotIn(b"aborted", err)
        self.assertIn("number of failed transactions: 0 ", text)
        back = yield wait_for(lambda: not r1.health.banned, 20, "the probe to unban")
        self.assertLess(back - killed, 30)  # ban_time is 60 s
        ports = yield self.reads(40)
        self.assertIn(self.r1.port, ports)


class LagTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_lagging_replica_gets_no_reads_until_it_catches_up(self):
        yield self.start_pooler(
            general="healthcheck_interval = 1000",
            pool_extra='default_role = "replica"\nmax_replica_lag = 65536')
        r2 = self.address(self.r2.port)
        yield self.reads(20)
        self.addCleanup(threads.deferToThread, self.r2.psql, "select pg_wal_replay_resume()")
        yield threads.deferToThread(self.r2.psql, "select pg_wal_replay_pause()")
        yield threads.deferToThread(
            self.primary.psql,
            "drop table if exists lag_t; create table lag_t as "
            "select g, repeat('x', 100) as pad from generate_series(1, 20000) g",
            db="pgcat_test", user="pgcat_md5")
        self.addCleanup(threads.deferToThread, self.primary.psql,
                        "drop table if exists lag_t", db="pgcat_test", user="pgcat_md5")
        yield wait_for(lambda: self.user_pool.balancer.lagging(r2), 10, "the lag to be seen")
        # r1 replays the same 2 MB of WAL: on a loaded machine it can lag
        # for a moment too (then the primary serves reads, as it should).
        r1 = self.address(self.r1.port)
        yield wait_for(lambda: not self.user_pool.balancer.lagging(r1), 20, "r1 to keep up")
        ports = yield self.reads(30)
        self.assertEqual(set(ports), {self.r1.port})
        yield threads.deferToThread(self.r2.psql, "select pg_wal_replay_resume()")
        yield wait_for(lambda: not self.user_pool.balancer.lagging(r2), 10, "the catch-up")
        ports = yield self.reads(40)
        self.assertIn(self.r2.port, ports)


class ExampleConfigTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_replicas_example_config(self):
        """conf/pgcat.replicas.toml, pointed at the harness's nodes."""
        with open(REPLICAS_TOML, "rb") as f:
            data = tomli.load(f)
        data["general"]["port"] = free_port()
        data["general"]["host"] = "127.0.0.1"
        (name, pool), = data["pools"].items()
        pool["users"] = {"0": {"username": "pgcat_md5", "password": USERS["pgcat_md5"],
                               "pool_size": 2}}
        shard = pool["shards"]["0"]
        shard["database"] = "pgcat_test"
        nodes = [self.primary, self.r1, self.r2]
        self.assertEqual([s[2] for s in shard["servers"]], ["primary", "replica", "replica"])
        shard["servers"] = [["127.0.0.1", n.port, s[2]] for n, s in zip(nodes, shard["servers"])]
        config, warnings = from_dict(data, REPLICAS_TOML)
        self.assertEqual(warnings, [])
        self.pooler = yield ConfigPooler(config).start()
        self.addCleanup(self.pooler.stop)

        def go():
            dsn = self.pooler.dsn(db=name)
            with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
                ports = {conn.execute(PORT_SQL).fetchone()[0] for _ in range(40)}
                conn.execute("SET SERVER ROLE TO 'primary'")
                conn.execute("create temp table ex(x int)")
                return ports

        ports = yield in_thread(go)
        self.assertLessEqual(ports, {self.r1.port, self.r2.port, self.primary.port})
        self.assertTrue(ports & {self.r1.port, self.r2.port})


class ConfigPooler(Pooler):
    """A Pooler from an already-parsed Config."""

    def __init__(self, config):
        self.config, self.warnings = config, []
        self.port = config.general.port
        self.service = PgCatService(reactor, config)


class PromotionTests(unittest.TestCase):
    """On a throwaway primary + replica: stop the primary, promote the
    replica; writes through the pooler succeed again with no config change."""

    timeout = 300

    @defer.inlineCallbacks
    def test_writes_follow_promotion(self):
        topo = yield threads.deferToThread(PgTopology)
        self.addCleanup(threads.deferToThread, topo.close)
        yield threads.deferToThread(topo._init_primary)
        replica = yield threads.deferToThread(topo.add_replica)
        primary = topo.primary
        text = pooler_toml(free_port(), [(primary.port, "primary"), (replica.port, "replica")],
                           general="healthcheck_interval = 1000",
                           pool_extra='default_role = "primary"\nconnect_timeout = 1000')
        pooler = yield Pooler(text).start()
        self.addCleanup(pooler.stop)
        up = pooler.cluster.user_pools[("pgcat_test", "pgcat_md5")]
        rpool = [p for p in up.address_pools if p.address.port == replica.port][0]

        def write(value):
            with psycopg.connect(pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
                conn.execute("create table if not exists promo (x int)")
                conn.execute("insert into promo values (%s)", [value])
                return conn.execute("select inet_server_port()").fetchone()[0]

        self.assertEqual((yield in_thread(write, 1)), primary.port)
        yield threads.deferToThread(primary.stop)
        yield threads.deferToThread(replica.promote)
        promoted = time.monotonic()
        errors = 0
        while True:
            try:
                port = yield in_thread(write, 2)
                break
            except psycopg.Error:
                errors += 1
                self.assertLess(time.monotonic() - promoted, 15, "writes never came back")
                yield sleep(0.25)
        took = time.monotonic() - promoted
        self.assertEqual(port, replica.port)
        self.assertLess(took, 5)  # a few health-check periods
        self.assertEqual(rpool.health.role, "primary")
        self.assertEqual(up.balancer.route(0, "primary", False), (rpool,))
        # Reads: no replica is left; with primary reads on the new primary
        # serves them.
        count = yield in_thread(lambda: _read_with_primary_reads(pooler))
        self.assertEqual(count, 2)


def _read_with_primary_reads(pooler):
    with psycopg.connect(pooler.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SET SERVER ROLE TO 'replica'")
        conn.execute("SET PRIMARY READS TO on")
        return conn.execute("select count(*) from promo").fetchone()[0]


class ResendAfterFatalTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_terminated_backend_read_is_resent(self):
        """A standby backend killed mid-query (FATAL 57P01 is its only
        answer): the read is run again on the other replica."""
        # Immutable: the planner runs it (no answer byte is sent before).
        yield threads.deferToThread(
            self.primary.psql,
            "create or replace function pgcat_sleepy(float8) returns int language plpgsql "
            "immutable as $$ begin perform pg_sleep($1); return 1; end $$",
            db="pgcat_test", user="pgcat_md5")
        yield threads.deferToThread(wait_caught_up, self.topo)
        yield self.start_pooler(general="ban_probe_interval = 1000",
                                pool_extra='default_role = "replica"')
        marker = "resend_fatal_marker"
        d = in_thread(self._slow_read, marker)
        victim = None
        deadline = time.monotonic() + 10
        while victim is None:
            for node in (self.r1, self.r2):
                pid = yield threads.deferToThread(
                    node.psql, "select pid from pg_stat_activity where query like "
                    f"'%{marker}%' and pid <> pg_backend_pid()")
                if pid:
                    victim = node, pid
            self.assertLess(time.monotonic(), deadline)
        node, pid = victim
        yield threads.deferToThread(node.psql, f"select pg_terminate_backend({pid})")
        port = yield d
        other = self.r2.port if node is self.r1 else self.r1.port
        self.assertEqual(port, other)

    def _slow_read(self, marker):
        with psycopg.connect(self.pooler.dsn(), autocommit=True,
                             prepare_threshold=None) as conn:
            return conn.execute(
                f"select inet_server_port(), pgcat_sleepy(1.5::float8) /* {marker} */").fetchone()[0]
