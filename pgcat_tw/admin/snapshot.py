"""A snapshot of the service for the admin console and the metrics (L2).

``take(cluster, clients, now, ...)`` walks the live objects once (the pools of
every (pool, user), their server connections, the clients) and returns plain
records; ``tables`` (pure) and ``metrics`` turn the same records into rows and
samples. Nothing here changes what it reads.

Names follow PgCat: an address is ``<pool>_shard_<n>_primary`` or
``<pool>_shard_<n>_replica_<i>`` (its configured role and its place among the
shard's replicas); ids are ``0x%08X``.
"""

from pgcat_tw.stats import Totals

PRIMARY = "primary"


class AddressSnap:
    __slots__ = ("pool", "user", "shard", "index", "host", "port", "database", "name",
                 "configured_role", "role", "pool_size", "min_pool_size", "pool_mode",
                 "totals", "averages", "sv_active", "sv_idle", "sv_tested", "sv_login",
                 "current_connections", "banned", "ban_reason", "banned_until", "ban_time",
                 "paused", "maxwait", "cl_waiting")


class PoolSnap:
    """One (pool, user)."""

    __slots__ = ("database", "user", "pool_mode", "cl_idle", "cl_active", "cl_waiting",
                 "sv_active", "sv_idle", "sv_tested", "sv_login", "maxwait", "totals",
                 "averages", "pool_size", "paused", "addresses")


class ClientSnap:
    __slots__ = ("id", "database", "user", "application_name", "state", "xacts", "queries",
                 "errors", "age", "wait", "addr", "port", "local_addr", "local_port",
                 "connect_time", "tls", "prepared_statements", "received")


class ServerSnap:
    __slots__ = ("id", "database", "user", "address", "host", "port", "application_name",
                 "state", "xacts", "queries", "sent", "received", "age", "connect_time",
                 "tls", "pid", "kind", "prepare_hits", "prepare_misses", "prepare_evictions",
                 "prepare_size", "pool", "errors")


class MirrorSnap:
    __slots__ = ("pool", "user", "address", "host", "port", "connected", "sent",
                 "sent_bytes", "dropped", "dropped_bytes", "failures")


class Snapshot:
    __slots__ = ("now", "pools", "addresses", "clients", "servers", "login_clients",
                 "config", "mirrors")

    def pool(self, database, user):
        for p in self.pools:
            if p.database == database and p.user == user:
                return p
        return None


def address_name(pool_name, shard, addr, replica_index):
    if addr.role == PRIMARY:
        return f"{pool_name}_shard_{shard.index}_primary"
    return f"{pool_name}_shard_{shard.index}_replica_{replica_index}"


def _server_state(conn):
    state = getattr(conn, "state", "idle")
    if state == "internal":
        return "tested"
    return state if state in ("login", "active", "idle") else "idle"


def _peer(transport, which):
    try:
        a = transport.getPeer() if which == "peer" else transport.getHost()
        return getattr(a, "host", ""), getattr(a, "port", 0)
    except Exception:  # noqa: BLE001 - not a TCP transport (tests)
        return "", 0


def _server(conn, now, kind, pool_name, user, address):
    s = ServerSnap()
    ss = conn.scanner
    s.id = conn.id
    s.database = pool_name
    s.user = user
    s.address = address
    s.host, s.port = conn.host, conn.port
    s.application_name = conn.params.get("application_name", "")
    s.state = _server_state(conn)
    s.xacts, s.queries, s.errors = ss.xacts, ss.rfqs, ss.errors
    s.sent, s.received = ss.sent, ss.received
    s.connect_time = conn.created_at
    s.age = now - conn.created_at
    s.tls = conn.tls_state == "up"
    s.pid = conn.pid
    s.kind = kind
    st = conn.stmts
    s.prepare_hits = st.hits if st is not None else 0
    s.prepare_misses = st.misses if st is not None else 0
    s.prepare_evictions = st.evictions if st is not None else 0
    s.prepare_size = len(st.names) if st is not None else 0
    s.pool = pool_name
    return s


def _address(up, pool, replica_index, now):
    a = AddressSnap()
    addr, shard = pool.address, pool.shard
    a.pool, a.user = up.pool_cfg.name, up.user_cfg.username
    a.shard, a.index = shard.index, addr.index
    a.host, a.port, a.database = addr.host, addr.port, shard.database
    a.name = address_name(a.pool, shard, addr, replica_index)
    a.configured_role = addr.role
    a.role = PRIMARY if up.balancer.primary(shard.index) is pool else "replica"
    a.pool_size, a.min_pool_size = pool.pool_size, pool.min_pool_size
    a.pool_mode = up.mode
    a.totals = pool.current_totals()
    a.averages = pool.averages
    active = tested = 0
    for conn in pool.busy:
        if getattr(conn, "state", None) == "internal":
            tested += 1
        else:
            active += 1
    a.sv_active, a.sv_tested = active, tested
    a.sv_idle, a.sv_login = len(pool.idle), pool.connecting
    a.current_connections = pool.total
    h = pool.health
    a.banned = h is not None and h.banned_until is not None
    a.ban_reason = h.ban_reason if a.banned else None
    a.banned_until = h.banned_until if a.banned else None
    a.ban_time = getattr(h, "ban_duration", 0.0) or up.balancer.ban_time
    a.paused = pool.paused
    a.maxwait = pool.maxwait()
    a.cl_waiting = len(pool.waiters)
    return a


def _mirror(a, st):
    m = MirrorSnap()
    m.pool, m.user, m.address = a.pool, a.user, a.name
    m.host, m.port = st.host, st.port
    m.connected, m.sent, m.sent_bytes = st.connected, st.sent, st.sent_bytes
    m.dropped, m.dropped_bytes, m.failures = st.dropped, st.dropped_bytes, st.failures
    return m


def _addresses(up, now, servers, mirrors=None):
    out = []
    replicas = {}
    for pool in up.address_pools:
        shard = pool.shard.index
        i = 0
        if pool.address.role != PRIMARY:
            i = replicas[shard] = replicas.get(shard, -1) + 1
        a = _address(up, pool, i, now)
        out.append(a)
        if pool.mirrors is not None and mirrors is not None:
            for st in pool.mirrors.stats:
                mirrors.append(_mirror(a, st))
        for conn in list(pool.idle) + list(pool.busy):
            servers.append(_server(conn, now, "pool", a.pool, a.user, a.name))
    for conn in getattr(up.monitor, "_extra", ()):
        servers.append(_server(conn, now, "health", up.pool_cfg.name, up.user_cfg.username,
                               f"{conn.host}:{conn.port}"))
    return out


def _client(c, now):
    s = ClientSnap()
    s.id = c.id
    s.database, s.user = c.database, c.user
    sc = c.scanner
    s.application_name = sc.params.get("application_name", "") if sc is not None else ""
    if c.server is not None:
        s.state = "active"
    elif c._checking_out:
        s.state = "waiting"
    else:
        s.state = "idle"
    s.xacts = sc.xacts if sc is not None else 0
    s.queries = sc.queries if sc is not None else 0
    s.errors = sc.errors if sc is not None else 0
    s.received = sc.received if sc is not None else 0
    s.age = now - c.connected_at
    s.connect_time = c.connected_at
    s.wait = now - c._waiter.since if s.state == "waiting" and c._waiter is not None else 0.0
    s.addr, s.port = _peer(c.transport, "peer")
    s.local_addr, s.local_port = _peer(c.transport, "host")
    s.tls = bool(c.session is not None and c.session.tls)
    rw = c.rewriter
    s.prepared_statements = len(rw.statements) if rw is not None else 0
    return s


def _pool(up, addresses, clients):
    p = PoolSnap()
    p.database, p.user = up.pool_cfg.name, up.user_cfg.username
    p.pool_mode = up.mode
    mine = [c for c in clients if c.database == p.database and c.user == p.user]
    p.cl_active = sum(1 for c in mine if c.state == "active")
    p.cl_waiting = sum(1 for c in mine if c.state == "waiting")
    p.cl_idle = len(mine) - p.cl_active - p.cl_waiting
    p.sv_active = sum(a.sv_active for a in addresses)
    p.sv_idle = sum(a.sv_idle for a in addresses)
    p.sv_tested = sum(a.sv_tested for a in addresses)
    p.sv_login = sum(a.sv_login for a in addresses)
    p.maxwait = max([a.maxwait for a in addresses] + [c.wait for c in mine] + [0.0])
    t = Totals()
    for a in addresses:
        t.add(a.totals)
    t.login_count = up.logins
    p.totals = t
    p.averages = up.averages
    p.pool_size = up.user_cfg.pool_size
    p.paused = any(a.paused for a in addresses)
    p.addresses = addresses
    return p


def take(cluster, clients, now, auth_queries=None):
    """The service as it is now. ``clients``: the ClientProtocols (logged-in
    ones count as clients; the others as login clients)."""
    snap = Snapshot()
    snap.now = now
    snap.config = cluster.config
    snap.servers = []
    snap.clients = []
    snap.login_clients = 0
    for c in clients:
        if c.session is None or c.session.admin or c.scanner is None:
            if c.session is None:
                snap.login_clients += 1
            continue
        snap.clients.append(_client(c, now))
    snap.clients.sort(key=lambda c: c.id)
    snap.pools = []
    snap.addresses = []
    snap.mirrors = []
    for (pool_name, username), up in cluster.user_pools.items():
        addresses = _addresses(up, now, snap.servers, snap.mirrors)
        snap.addresses.extend(addresses)
        snap.pools.append(_pool(up, addresses, snap.clients))
    if auth_queries is not None:
        for runner in getattr(auth_queries, "_runners", {}).values():
            pool = runner.pool
            for conn in list(pool.idle) + list(pool.busy):
                snap.servers.append(_server(conn, now, "auth_query", conn.database, conn.user,
                                            runner.where))
    snap.servers.sort(key=lambda s: s.id)
    return snap

