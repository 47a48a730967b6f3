"""The admin console's tables: pure functions from a ``snapshot.Snapshot``
to (columns, rows) (L0: no I/O).

Columns, their order, types and units are PgCat's where PgCat has the
command and PgBouncer's otherwise (shared/reference §2.2); pgcat_tw's extra
columns come after PgCat's. Units: SHOW STATS gives query and transaction
time in milliseconds and wait time in microseconds (PgCat's; PgCat never
records transaction time, pgcat_tw does); STATS_TOTALS and STATS_AVERAGES
(PgBouncer's) give every time in microseconds.

A column is (name, type oid); a value is a str, an int or None (NULL).
"""

TEXT = 25
INT8 = 20
NUMERIC = 1700

VERSION = "0.1.0"
VERSION_STRING = f"PgCat {VERSION} (pgcat_tw)"

HELP = [
    "SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION|LISTS|BANS|STATE",
    "SHOW STATS|STATS_TOTALS|STATS_AVERAGES|MIRRORS",
    "BAN host seconds",
    "UNBAN host",
    "PAUSE [db[,user]]",
    "RESUME [db[,user]]",
    "KILL_CLIENT id",
    "RELOAD",
    "SHUTDOWN",
    "SET key = value (accepted, ignored)",
]


def _cols(names, types=None, default=INT8):
    types = types or {}
    return [(n, types.get(n, default)) for n in names]


def client_id(i):
    return "0x%08X" % (i & 0xFFFFFFFF)


def _us(seconds):
    return int(round(seconds * 1_000_000))


def _ms(seconds):
    return int(round(seconds * 1000))


def _maxwait(seconds):
    """PgCat's maxwait (whole seconds) and maxwait_us (the microseconds part)."""
    us = _us(seconds)
    return us // 1_000_000, us % 1_000_000


# --- SHOW POOLS ------------------------------------------------------------------------

POOLS_COLUMNS = _cols(
    ["database", "user", "pool_mode", "cl_idle", "cl_active", "cl_waiting", "cl_cancel_req",
     "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us"],
    {"database": TEXT, "user": TEXT, "pool_mode": TEXT})


def show_pools(snap):
    rows = []
    for p in snap.pools:
        mw, mw_us = _maxwait(p.maxwait)
        rows.append([p.database, p.user, p.pool_mode, p.cl_idle, p.cl_active, p.cl_waiting,
                     0, p.sv_active, p.sv_idle, 0, p.sv_tested, p.sv_login, mw, mw_us])
    return POOLS_COLUMNS, rows


# --- SHOW STATS (PgCat), STATS_TOTALS and STATS_AVERAGES (PgBouncer) -----------------------

STATS_COLUMNS = _cols(
    ["instance", "database", "user", "total_xact_count", "total_query_count",
     "total_received", "total_sent", "total_xact_time", "total_query_time",
     "total_wait_time", "total_errors", "avg_xact_count", "avg_query_count", "avg_recv",
     "avg_sent", "avg_errors", "avg_xact_time", "avg_query_time", "avg_wait_time",
     # pgcat_tw: PgBouncer's pre-1.8 name for the query count, which
     # exporters still read (Debian's prometheus-pgbouncer-exporter 1.7).
     "total_requests"],
    {"instance": TEXT, "database": TEXT, "user": TEXT})


def show_stats(snap):
    rows = []
    for a in snap.addresses:
        t, v = a.totals, a.averages
        rows.append([a.name, a.pool, a.user, t.xact_count, t.query_count, t.received,
                     t.sent, _ms(t.xact_time), _ms(t.query_time), _us(t.wait_time),
                     t.errors, int(v.xact_count), int(v.query_count), int(v.received),
                     int(v.sent), int(v.errors), _ms(v.xact_time), _ms(v.query_time),
                     _us(v.wait_time), t.query_count])
    return STATS_COLUMNS, rows


_BOUNCER_STATS = ["database", "server_assignment_count", "xact_count", "query_count",
                  "bytes_received", "bytes_sent", "xact_time", "query_time", "wait_time",
                  "client_parse_count", "server_parse_count", "bind_count"]
STATS_TOTALS_COLUMNS = _cols(_BOUNCER_STATS, {"database": TEXT})
STATS_AVERAGES_COLUMNS = STATS_TOTALS_COLUMNS


def _by_database(snap):
    """(pool name, [PoolSnap]) in order: PgBouncer's rows are per database."""
    out = {}
    for p in snap.pools:
        out.setdefault(p.database, []).append(p)
    return out.items()


def show_stats_totals(snap):
    rows = []
    for db, pools in _by_database(snap):
        t = [p.totals for p in pools]
        rows.append([db, sum(x.assignments for x in t), sum(x.xact_count for x in t), sum(x.query_count for x in t),
                     sum(x.received for x in t), sum(x.sent for x in t),
                     _us(sum(x.xact_time for x in t)), _us(sum(x.query_time for x in t)),
                     _us(sum(x.wait_time for x in t)), 0, 0, 0])
    return STATS_TOTALS_COLUMNS, rows


def show_stats_averages(snap):
    rows = []
    for db, pools in _by_database(snap):
        v = [p.averages for p in pools]
        assignments = sum(x.assignments for x in v)
        xacts = sum(x.xact_count for x in v)
        queries = sum(x.query_count for x in v)
        # Means per item, weighted by each (pool, user)'s rate.
        xact_time = sum(x.xact_time * x.xact_count for x in v) / xacts if xacts else 0.0
        query_time = sum(x.query_time * x.query_count for x in v) / queries if queries else 0.0
        rows.append([db, int(assignments), int(xacts), int(queries),
                     int(sum(x.received for x in v)), int(sum(x.sent for x in v)),
                     _us(xact_time), _us(query_time), _us(sum(x.wait_time for x in v)),
                     0, 0, 0])
    return STATS_AVERAGES_COLUMNS, rows


# --- SHOW DATABASES, USERS, BANS ------------------------------------------------------------

DATABASES_COLUMNS = _cols(
    ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
     "reserve_pool", "pool_mode", "max_connections", "current_connections", "paused",
     "disabled"],
    {"name": TEXT, "host": TEXT, "port": TEXT, "database": TEXT, "force_user": TEXT,
     "pool_mode": TEXT})


def show_databases(snap):
    rows = []
    for a in snap.addresses:
        rows.append([a.name, a.host, str(a.port), a.database, a.user, a.pool_size,
                     a.min_pool_size, 0, a.pool_mode, a.pool_size, a.current_connections,
                     int(a.paused), int(a.banned)])
    return DATABASES_COLUMNS, rows


USERS_COLUMNS = _cols(["name", "pool_mode"], default=TEXT)


def show_users(snap):
    return USERS_COLUMNS, [[p.user, p.pool_mode] for p in snap.pools]


BANS_COLUMNS = _cols(["db", "user", "role", "host", "reason", "ban_time",
                      "ban_duration_seconds", "ban_remaining_seconds"],
                     {"db": TEXT, "user": TEXT, "role": TEXT, "host": TEXT, "reason": TEXT,
                      "ban_time": TEXT})


def show_bans(snap, wallclock):
    """``wallclock(t)``: the reactor time ``t`` as a timestamp string."""
    rows = []
    for a in snap.addresses:
        if not a.banned:
            continue
        remaining = max(0, int(round(a.banned_until - snap.now)))
        started = a.banned_until - a.ban_time
        rows.append([a.pool, a.user, a.role, f"{a.host}:{a.port}", a.ban_reason or "",
                     wallclock(started), int(round(a.ban_time)), remaining])
    return BANS_COLUMNS, rows


# --- SHOW CLIENTS, SERVERS -----------------------------------------------------------------

CLIENTS_COLUMNS = _cols(
    ["client_id", "database", "user", "application_name", "state", "transaction_count",
     "query_count", "error_count", "age_seconds", "maxwait", "maxwait_us",
     "addr", "port", "local_addr", "local_port", "connect_time", "tls",
     "prepared_statements", "bytes_received"],
    {"client_id": TEXT, "database": TEXT, "user": TEXT, "application_name": TEXT,
     "state": TEXT, "addr": TEXT, "local_addr": TEXT, "connect_time": TEXT, "tls": TEXT})


def show_clients(snap, wallclock):
    rows = []
    for c in snap.clients:
        mw, mw_us = _maxwait(c.wait)
        rows.append([client_id(c.id), c.database, c.user, c.application_name, c.state,
                     c.xacts, c.queries, c.errors, int(c.age), mw, mw_us, c.addr, c.port,
                     c.local_addr, c.local_port, wallclock(c.connect_time),
                     "yes" if c.tls else "no", c.prepared_statements, c.received])
    return CLIENTS_COLUMNS, rows


SERVERS_COLUMNS = _cols(
    ["server_id", "database_name", "user", "address_id", "application_name", "state",
     "transaction_count", "query_count", "bytes_sent", "bytes_received", "age_seconds",
     "prepare_cache_hit", "prepare_cache_miss", "prepare_cache_eviction",
     "prepare_cache_size", "addr", "port", "connect_time", "tls", "remote_pid", "type",
     "error_count"],
    {"server_id": TEXT, "database_name": TEXT, "user": TEXT, "address_id": TEXT,
     "application_name": TEXT, "state": TEXT, "addr": TEXT, "connect_time": TEXT,
     "tls": TEXT, "type": TEXT})


def show_servers(snap, wallclock):
    rows = []
    for s in snap.servers:
        rows.append([client_id(s.id), s.database, s.user, s.address, s.application_name,
                     s.state, s.xacts, s.queries, s.sent, s.received, int(s.age),
                     s.prepare_hits, s.prepare_misses, s.prepare_evictions, s.prepare_size,
                     s.host, s.port, wallclock(s.connect_time), "yes" if s.tls else "no",
                     s.pid, s.kind, s.errors])
    return SERVERS_COLUMNS, rows


# --- SHOW LISTS, VERSION, STATE, CONFIG ---------------------------------------------------

LISTS_COLUMNS = _cols(["list", "items"], {"list": TEXT})


def show_lists(snap):
    pools = len(snap.pools)
    active_clients = sum(1 for c in snap.clients if c.state != "idle")
    idle_servers = sum(1 for s in snap.servers if s.kind == "pool" and s.state == "idle")
    rows = [
        ["databases", 1 + len(snap.addresses)],
        ["users", 1 + pools],
        ["pools", 1 + len(snap.addresses)],
        ["free_clients", len(snap.clients) - active_clients],
        ["used_clients", active_clients],
        ["login_clients", snap.login_clients],
        ["free_servers", idle_servers],
        ["used_servers", sum(1 for s in snap.servers if s.kind == "pool") - idle_servers],
        ["dns_names", 0],
        ["dns_zones", 0],
        ["dns_queries", 0],
        ["dns_pending", 0],
    ]
    return LISTS_COLUMNS, rows


VERSION_COLUMNS = _cols(["version"], default=TEXT)


def show_version(snap):
    return VERSION_COLUMNS, [[VERSION_STRING]]


STATE_COLUMNS = _cols(["key", "value"], default=TEXT)


def show_state(snap, draining):
    paused = bool(snap.addresses) and all(a.paused for a in snap.addresses)
    return STATE_COLUMNS, [["active", "no" if draining else "yes"],
                           ["paused", "yes" if paused else "no"],
                           ["suspended", "no"]]


CONFIG_COLUMNS = _cols(["key", "value", "default", "changeable"], default=TEXT)

_GENERAL_KEYS = ("host", "port", "prometheus_exporter_port", "connect_timeout",
                 "idle_timeout", "healthcheck_timeout", "shutdown_timeout", "healthcheck_delay",
                 "ban_time", "idle_client_in_transaction_timeout")
_NOT_CHANGEABLE = ("host", "port", "connect_timeout")
_POOL_KEYS = ("pool_mode", "load_balancing_mode", "primary_reads_enabled",
              "query_parser_enabled", "query_parser_max_length",
              "query_parser_read_write_splitting", "default_role", "sharding_function")


def _text(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def show_config(config):
    """PgCat's flattened subset of the configuration in force."""
    rows = []
    g = config.general
    for key in _GENERAL_KEYS:
        rows.append([key, _text(getattr(g, key)), "-",
                     "no" if key in _NOT_CHANGEABLE else "yes"])
    for pool in config.pools:
        for key in _POOL_KEYS:
            rows.append([f"pools.{pool.name}.{key}", _text(getattr(pool, key, None)), "-",
                         "yes"])
        rows.append([f'pools."{pool.name}".shard_count', str(len(pool.shards)), "-", "yes"])
        rows.append([f'pools."{pool.name}".users',
                     ",".join(u.username for u in pool.users), "-", "yes"])
    return CONFIG_COLUMNS, rows


# --- SHOW MIRRORS (pgcat_tw) --------------------------------------------------------------

MIRRORS_COLUMNS = _cols(["database", "user", "address_id", "host", "port", "connected",
                         "sent", "sent_bytes", "dropped", "dropped_bytes", "failures"],
                        {"database": TEXT, "user": TEXT, "address_id": TEXT, "host": TEXT})


def show_mirrors(snap):
    return MIRRORS_COLUMNS, [[m.pool, m.user, m.address, m.host, m.port, m.connected, m.sent,
                              m.sent_bytes, m.dropped, m.dropped_bytes, m.failures]
                             for m in snap.mirrors]


# --- BAN, UNBAN ----------------------------------------------------------------------------

BAN_COLUMNS = _cols(["db", "user", "role", "host"], default=TEXT)
