"""The pools of one configuration: (pool name, user) -> the server pools of
its addresses. Built from a Config; passed around, never global.

Each UserPool has one ConnectionPool per server address, a
``balancer.Balancer`` that picks the address of each transaction (roles,
load balancing, bans, lag) and a ``health.HealthMonitor`` that the janitor
ticks (probes of banned servers, role discovery, lag).
"""

from twisted.internet import defer
from twisted.logger import Logger

from pgcat_tw import backend
from pgcat_tw.balancer import Balancer
from pgcat_tw.health import RECOVERY_SQL, HealthMonitor
from pgcat_tw.config import User, resolve
from pgcat_tw.errors import ServerConnectionFailed
from pgcat_tw.mirror import MirrorSet
from pgcat_tw.pool import ConnectionPool, LoginGate
from pgcat_tw.prepared import StatementCache
from pgcat_tw.router.plugins import Plugins
from pgcat_tw.router.pool_router import PoolRouter
from pgcat_tw.stats import Averages, Totals

log = Logger()


def set_parameter_sql(name, value):
    """SET with the value dollar-quoted, so neither quotes nor backslashes
    (whatever standard_conforming_strings says) can break out of it."""
    tag = "pgcat"
    n = 0
    while f"${tag}$" in value or value.endswith("$"):
        n += 1
        tag = f"pgcat{n}"
        if n > 100:
            raise ValueError("unquotable parameter value")
    return f'SET "{name}" TO ${tag}${value}${tag}$'


class LoginGates:
    """The service's LoginGate per server address (kept across reloads)."""

    def __init__(self):
        self._gates = {}

    def gate(self, host, port, limit):
        g = self._gates.get((host, port))
        if g is None:
            g = self._gates[(host, port)] = LoginGate(limit)
        g.limit = limit
        return g


class UserPool:
    tls = None              # tls.TLSState of the service (server_tls)
    login_gates = None      # LoginGates of the service
    clock = None            # stats.EventClock of the service (server connections use it)
    dynamic = False         # a user found through auth_query, not listed
    password_learned = False  # server_password came from auth_query

    def __init__(self, reactor, config, pool_cfg, user_cfg, login_gates=None, clock=None):
        self.reactor = reactor
        self.clock = clock    # the service's stats.EventClock, or None
        self.login_gates = login_gates
        self.closed = False
        self.statement_cache = None
        self.reference_params = None   # ParameterStatus set shown to clients
        self.canonical = {}            # (param, value as sent) -> server's spelling
        # Statistics: client logins (a login counts once it is greeted), the
        # 15 s averages of the (pool, user).
        self.logins = 0
        self.averages = Averages(reactor.seconds())
        self.address_pools = []
        self.balancer = None
        self.monitor = None
        self.reconfigure(config, pool_cfg, user_cfg)

    def reconfigure(self, config, pool_cfg, user_cfg):
        """Apply a configuration (the first, or a reload) in place: settings
        and credentials for new connections; pools of addresses still
        configured keep their connections (resized, re-timed, re-roled);
        new addresses get pools, removed ones are drained and closed; the
        balancer and the health checks are rebuilt over the new list,
        keeping what was learned (bans, roles, lag)."""
        self.config = config
        self.pool_cfg = pool_cfg
        self.user_cfg = user_cfg
        self.settings = resolve(config, pool_cfg, user_cfg)
        self.mode = self.settings.pool_mode
        self._reconfigure_statements(pool_cfg.prepared_statements_cache_size)
        # The router of the pool's clients (None: the pool neither parses,
        # shards nor reads comment hints).
        self.router = PoolRouter(pool_cfg) if PoolRouter.needed(pool_cfg) else None
        # PgCat's plugins in force for the pool (None: none enabled; they
        # need the parser, which the config checks).
        self.plugins = Plugins.build(config.plugins_for(pool_cfg)) \
            if pool_cfg.query_parser_enabled else None
        g = config.general
        self.keepalive = (g.tcp_keepalives_idle, g.tcp_keepalives_interval,
                          g.tcp_keepalives_count, g.tcp_user_timeout)
        self.server_user = user_cfg.server_username or user_cfg.username
        password = (user_cfg.server_password if user_cfg.server_password is not None
                    else user_cfg.password)
        if password is not None or not self.password_learned:
            self.server_password = password
            self.password_learned = False
        old = dict(_address_keys((p.shard, p.address, p) for p in self.address_pools))
        old_primaries = _primaries(self.address_pools)
        pools = []
        for shard in pool_cfg.shards:
            for key, addr in _address_keys((shard, a, a) for a in shard.servers):
                pool = old.pop(key, None)
                if pool is None:
                    pool = self._make_pool(shard, addr)
                self._configure_pool(pool, shard, addr)
                pools.append(pool)
        for pool in old.values():
            pool.close()   # drained: busy servers close as they come back
        changed = {shard for shard, key in _primaries(pools).items()
                   if old_primaries.get(shard, key) != key}
        for pool in pools:
            if pool.shard.index in changed:
                # The primary was edited: the file is the truth again (what
                # was learned about roles there is forgotten).
                pool.health = None
        self.address_pools = pools
        self._rebuild_balancer()

    def _reconfigure_statements(self, size):
        cache = self.statement_cache
        if size > 0 and self.mode == "transaction":
            if cache is None:
                self.statement_cache = StatementCache(size)
            else:
                cache.size = size   # (clients keep using it: their names stay valid)
        else:
            self.statement_cache = None

    def _rebuild_balancer(self):
        g = self.config.general
        pool_cfg = self.pool_cfg
        old_balancer, old_monitor = self.balancer, self.monitor
        label = f'pool "{pool_cfg.name}" user "{self.user_cfg.username}"'
        self.balancer = Balancer(
            self.reactor, self.address_pools, mode=pool_cfg.load_balancing_mode,
            default_role=pool_cfg.default_role, ban_time=float(g.ban_time),
            max_lag=pool_cfg.max_replica_lag, probe_interval=g.ban_probe_interval / 1000.0,
            name=label)
        if old_balancer is not None:
            self.balancer.inherit(old_balancer)
        self.monitor = HealthMonitor(
            self.reactor, self.balancer, interval=g.healthcheck_interval / 1000.0,
            probe_interval=g.ban_probe_interval / 1000.0,
            timeout=g.healthcheck_timeout / 1000.0, on_failure=self.server_failed)
        if old_monitor is not None:
            old_monitor.close()

    def _make_pool(self, shard, addr):
        def connect():
            a, sh = pool.address, pool.shard
            d = backend.connect(self.reactor, a.host, a.port, self.server_user,
                                self.server_password, sh.database, pool.connect_timeout,
                                keepalive=self.keepalive, tls=self.tls, clock=self.clock)
            d.addCallback(self._learn_role, pool)
            return d.addCallback(self._prewarm, pool)

        pool = ConnectionPool(self.reactor, "", connect, pool_size=1)
        if self.clock is not None:
            pool.clock = self.clock

        def new_connection(conn):
            self._capture_params(conn)
            if pool.mirrors is not None:
                pool.mirrors.attach(conn, pool.shard.database)

        pool.on_new_connection = new_connection
        pool.on_connection_lost = MirrorSet.detach
        return pool

    def _configure_pool(self, pool, shard, addr):
        """Settings of one address's pool, from the configuration in force."""
        s = self.settings
        g = self.config.general
        pool.name = (f'pool "{self.pool_cfg.name}" user "{self.user_cfg.username}" '
                     f"server {addr.host}:{addr.port}")
        pool.pool_size = s.pool_size
        pool.min_pool_size = s.min_pool_size
        pool.connect_timeout = s.connect_timeout / 1000.0
        if g.query_wait_timeout is not None:
            pool.wait_timeout = g.query_wait_timeout / 1000.0
            pool.wait_timeout_name = "query_wait_timeout"
        else:
            pool.wait_timeout, pool.wait_timeout_name = pool.connect_timeout, "connect_timeout"
        if self.login_gates is not None:
            pool.login_gate = self.login_gates.gate(addr.host, addr.port,
                                                    g.server_login_limit)
        pool.idle_timeout = s.idle_timeout / 1000.0
        pool.server_lifetime = s.server_lifetime / 1000.0
        pool.round_robin = g.server_round_robin
        pool.healthcheck_delay = g.healthcheck_delay / 1000.0
        pool.healthcheck_timeout = g.healthcheck_timeout / 1000.0
        pool.address = addr
        pool.shard = shard
        targets = [(h, p, i) for h, p, i in shard.mirrors if i == addr.index]
        current = [] if pool.mirrors is None else \
            [(m.host, m.port, m.index) for m in pool.mirrors.stats]
        if targets != current:
            # A reload that changes the mirrors applies to the connections
            # the pool already has too.
            pool.mirrors = MirrorSet(self.reactor, targets, self) if targets else None
            MirrorSet.replace(list(pool.idle) + list(pool.busy), pool.mirrors, shard.database)
        if pool.health is not None:
            pool.health.configured = addr.role
        if pool.waiters or pool.total < pool.min_pool_size:
            pool._maybe_connect()

    def _learn_role(self, conn, pool):
        """Every new connection tells whether its server is in recovery:
        PostgreSQL 14+ reports ``in_hot_standby`` at login (and again when
        it changes); older servers are asked ``pg_is_in_recovery()``. The
        first time a server other than the acting primary says it is not in
        recovery, it is also asked whether it streamed WAL as a standby
        since it started (a promoted standby, for the role rules)."""
        hs = conn.params.get("in_hot_standby")
        bal = self.balancer
        if hs == "on" or (hs == "off" and (pool.health.role is not None
                                           or pool is bal.primary(pool.shard.index))):
            bal.set_role(pool, hs == "on")
            return conn
        d = conn.run([RECOVERY_SQL], timeout=pool.healthcheck_timeout)

        def ran(results):
            r = results[0]
            if not r.error and r.rows:
                row = r.rows[0]
                bal.set_role(pool, row[0] == "t", len(row) > 1 and row[1] == "t")
            return conn

        def failed(f):
            conn.close()
            return f

        return d.addCallbacks(ran, failed)

    def _prewarm(self, conn, pool):
        """PgCat's prewarmer: a new server connection runs the listed
        queries before its first client. A query's error is logged; the
        connection is kept (its session is clean: no transaction is left
        open by a failed simple query)."""
        plugins = self.plugins
        if plugins is None or not plugins.prewarm:
            return conn
        d = conn.run(list(plugins.prewarm), timeout=pool.connect_timeout or None)

        def ran(results):
            for sql, r in zip(plugins.prewarm, results):
                if r.error:
                    log.warn("prewarmer: {query} failed on {server}: {error}", query=sql,
                             server=pool.name, error=r.error.get("M", "?"))
            if conn.scanner.tx_status != 73:    # a BEGIN among them: not a clean server
                conn.close()
                raise ServerConnectionFailed(
                    f"{pool.name}: the prewarmer's queries left a transaction open")
            return conn

        def failed(f):
            conn.close()
            return f
        return d.addCallbacks(ran, failed)

    def note_role(self, server):
        """After a health check: the role the server reported with it."""
        hs = server.params.get("in_hot_standby")
        if hs is not None and server.pool is not None:
            self.balancer.set_role(server.pool, hs == "on")

    def server_failed(self, pool, reason):
        """A connect, health check or query on ``pool``'s server failed: it
        counts as gone for the role rules until it answers (a replica that
        left recovery may take over from it), and it is banned unless it is
        the acting primary (never banned): then every server is checked
        until a primary answers."""
        reason = getattr(reason, "message", None) or str(reason)
        bal = self.balancer
        shard = pool.shard.index
        if pool is bal.primary(shard) and shard not in bal.discovering:
            bal.discovering.add(shard)
            log.warn("{name}: primary {host}:{port} of shard {shard} failed ({reason}): "
                     "checking every server for a primary", name=bal.name,
                     host=pool.address.host, port=pool.address.port, shard=shard,
                     reason=reason)
        bal.server_down(pool)
        bal.ban(pool, reason)

    def _capture_params(self, conn):
        if self.reference_params is None:
            self.reference_params = dict(conn.params)

    def server_pool(self):
        """The pool for the pooler's own work (login parameters): shard 0's
        primary if there is one and it is not known to be down, else any
        available server."""
        bal = self.balancer
        primary = bal.primary(0)
        if primary is not None and 0 not in bal.discovering:
            return primary
        for role in ("replica", "any"):
            route = bal.route(0, role, True)
            if route:
                return route[0]
        return primary or self.address_pools[0]

    @defer.inlineCallbacks
    def get_reference_params(self):
        """The server parameters clients are greeted with, from a real server
        connection of this pool (one is made if none has been yet; if the
        primary does not answer, another server is asked)."""
        tried = []
        last = None
        while self.reference_params is None:
            pool = self.server_pool()
            if pool in tried:
                pool = next((p for p in self.address_pools if p not in tried), None)
                if pool is None:
                    raise last
            tried.append(pool)
            try:
                # A login waits for one transaction's turn at most, not
                # behind every queued client (pool.acquire's ``urgent``).
                conn = yield pool.acquire(urgent=True)
            except ServerConnectionFailed as e:
                last = e
                self.server_failed(pool, e)
                continue
            pool.release(conn)
            if self.reference_params is None:
                self.reference_params = dict(conn.params)
        return self.reference_params

    def current_totals(self):
        """Statistics of this (pool, user): its addresses' and its logins."""
        t = Totals()
        for p in self.address_pools:
            t.add(p.current_totals())
        t.login_count = self.logins
        return t

    def reap(self, now):
        for p in self.address_pools:
            p.reap(now)
        if self.averages.due(now):
            self.averages.tick(self.current_totals(), now)
        self.monitor.tick(now)

    def close(self):
        self.closed = True
        self.monitor.close()
        for p in self.address_pools:
            p.close()


def _address_key(shard, addr):
    """What identifies an address's pool across a reload: the same server
    and database (its role may change)."""
    return (shard.index, shard.database, addr.host, addr.port)


def _address_keys(items):
    """(key, item) for (shard, address, item) triples: the address key and
    its occurrence in the shard (PgCat lets a server be listed twice, in two
    roles: each listing has a pool of its own)."""
    seen = {}
    for shard, addr, item in items:
        k = _address_key(shard, addr)
        n = seen[k] = seen.get(k, -1) + 1
        yield k + (n,), item


def _primaries(pools):
    """shard index -> the address key of its configured primary."""
    return {p.shard.index: _address_key(p.shard, p.address) for p in pools
            if p.address.role == "primary"}


def auth_query_user(pool_cfg, username):
    """The settings of a user that auth_query knows and the pool does not
    list: no password of its own (auth_query supplies it), the pool's
    auth_query_pool_size, everything else from the pool and [general]."""
    return User(key=f"auth_query:{username}", username=username,
                pool_size=pool_cfg.auth_query_pool_size)


class Cluster:
    """Every UserPool of one Config."""

    def __init__(self, reactor, config, previous=None, tls=None, clock=None):
        """``previous``: the Cluster being replaced by a reload; its UserPools
        whose (pool, user) is still configured are kept and reconfigured in
        place (with their connections and clients); ``retire`` closes the
        others. ``tls``: the service's tls.TLSState (default: the previous
        one's)."""
        self.reactor = reactor
        self.config = config
        self.tls = tls if tls is not None else getattr(previous, "tls", None)
        self.clock = clock if clock is not None else getattr(previous, "clock", None)
        self.login_gates = getattr(previous, "login_gates", None) or LoginGates()
        self.user_pools = {}
        keep = previous.user_pools if previous is not None else {}
        for pool_cfg in config.pools:
            for user_cfg in pool_cfg.users:
                key = (pool_cfg.name, user_cfg.username)
                old = keep.get(key)
                if old is not None and not old.closed:
                    old.dynamic = False
                    old.reconfigure(config, pool_cfg, user_cfg)
                    self.user_pools[key] = old
                else:
                    self.user_pools[key] = self._new_user_pool(pool_cfg, user_cfg)
        self._keep_auth_query_users(keep)

    def _new_user_pool(self, pool_cfg, user_cfg, dynamic=False):
        up = UserPool(self.reactor, self.config, pool_cfg, user_cfg,
                      login_gates=self.login_gates, clock=self.clock)
        up.tls = self.tls
        up.dynamic = dynamic
        return up

    def _keep_auth_query_users(self, previous):
        """Users known through auth_query stay known across a reload while
        their pool still has auth_query and does not list them."""
        for (pool_name, username), old in previous.items():
            if not old.dynamic or old.closed:
                continue
            pool_cfg = self.config.pool(pool_name)
            if pool_cfg is None or not pool_cfg.auth_query_configured \
                    or pool_cfg.user(username) is not None:
                continue
            old.reconfigure(self.config, pool_cfg, auth_query_user(pool_cfg, username))
            self.user_pools[(pool_name, username)] = old

    def add_auth_query_user(self, pool_cfg, username):
        """The UserPool of a user that auth_query authenticated and the pool
        does not list (created at its first login)."""
        key = (pool_cfg.name, username)
        up = self.user_pools.get(key)
        if up is None:
            up = self.user_pools[key] = self._new_user_pool(
                pool_cfg, auth_query_user(pool_cfg, username), dynamic=True)
        return up

    def retire(self, replaced_by):
        """Close the pools the new Cluster did not take over."""
        kept = set(map(id, replaced_by.user_pools.values()))
        for up in self.user_pools.values():
            if id(up) not in kept:
                up.close()

    def find(self, database, username):
        """-> (pool config or None, user config or None, UserPool or None)"""
        pool_cfg = self.config.pool(database)
        if pool_cfg is None:
            return None, None, None
        up = self.user_pools.get((database, username))
        if up is None:
            return pool_cfg, None, None
        return pool_cfg, up.user_cfg, up

    def reap(self, now):
        for up in self.user_pools.values():
            up.reap(now)

    def server_connections(self):
        """Open or opening server connections, over every pool."""
        return sum(sum(p.total for p in up.address_pools) + up.monitor.connections()
                   for up in self.user_pools.values())

    def close(self):
        for up in self.user_pools.values():
            up.close()

