"""PgCat's Prometheus exporter: ``GET /metrics`` (L3, an edge).

A prometheus_client collector over the admin console's snapshot
(``admin.snapshot``), served by twisted.web on the reactor thread. The
numbers are the admin console's own rows (``admin.tables``: SHOW STATS,
POOLS, DATABASES; SHOW SERVERS's connections summed per address), so the
units are the console's: query and transaction time in milliseconds, wait
time in microseconds, maxwait in whole seconds plus a microseconds part.

Names and labels are PgCat's (``pgcat_`` prefix; groups ``stats_*`` and
``databases_*`` per server address, ``servers_*`` per address that has a
server connection, ``pools_*`` per (pool, user)). PgCat types its monotonic
numbers ``counter`` without the ``_total`` suffix that prometheus_client
adds to every counter's samples (``pgcat_stats_total_query_count`` would
come out as ``pgcat_stats_total_query_count_total``); the sample names are
what dashboards, alerts and recording rules query, so they are kept exactly
and those families are exposed ``untyped`` (``COUNTER`` below).
"""

from prometheus_client import exposition
from prometheus_client.metrics_core import GaugeMetricFamily, UnknownMetricFamily
from prometheus_client.registry import CollectorRegistry
from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from pgcat_tw.admin import tables

log = Logger()

PREFIX = "pgcat_"
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4",
                       "text/plain; version=0.0.4; charset=utf-8")
GAUGE, COUNTER = "gauge", "counter"

ADDRESS_LABELS = ("database", "host", "index", "pool", "role", "shard", "username")
POOL_LABELS = ("pool", "user")

# (metric name without the prefix, admin column, type, help). The admin
# column is the SHOW STATS / POOLS / DATABASES column the value comes from.
STATS = (
    ("stats_total_query_count", "total_query_count", COUNTER,
     "Queries answered by this server address (ReadyForQuery count)"),
    ("stats_total_query_time", "total_query_time", COUNTER,
     "Time spent running queries on this server address, in milliseconds"),
    ("stats_total_received", "total_received", COUNTER,
     "Bytes clients sent to this server address through the pooler"),
    ("stats_total_sent", "total_sent", COUNTER,
     "Bytes this server address sent back to clients through the pooler"),
    ("stats_total_xact_count", "total_xact_count", COUNTER,
     "Transactions ended on this server address"),
    ("stats_total_xact_time", "total_xact_time", COUNTER,
     "Time spent inside transactions on this server address, in milliseconds"),
    ("stats_total_wait_time", "total_wait_time", COUNTER,
     "Time clients waited for a connection to this server address, in microseconds"),
    ("stats_avg_query_count", "avg_query_count", GAUGE,
     "Queries per second over the last 15 s period"),
    ("stats_avg_query_time", "avg_query_time", GAUGE,
     "Mean query time over the last 15 s period, in milliseconds"),
    ("stats_avg_recv", "avg_recv", GAUGE,
     "Bytes received from clients per second over the last 15 s period"),
    ("stats_avg_sent", "avg_sent", GAUGE,
     "Bytes sent to clients per second over the last 15 s period"),
    ("stats_avg_errors", "avg_errors", GAUGE,
     "Errors per second over the last 15 s period"),
    ("stats_avg_xact_count", "avg_xact_count", GAUGE,
     "Transactions per second over the last 15 s period"),
    ("stats_avg_xact_time", "avg_xact_time", GAUGE,
     "Mean transaction time over the last 15 s period, in milliseconds"),
    ("stats_avg_wait_time", "avg_wait_time", GAUGE,
     "Client wait time per second over the last 15 s period, in microseconds"),
)

POOLS = (
    ("pools_maxwait_us", "maxwait_us", GAUGE,
     "Microseconds part of the longest current client wait (add to maxwait)"),
    ("pools_maxwait", "maxwait", GAUGE,
     "Longest current client wait for a server connection, whole seconds"),
    ("pools_cl_waiting", "cl_waiting", GAUGE, "Clients waiting for a server connection"),
    ("pools_cl_active", "cl_active", GAUGE, "Clients bound to a server connection"),
    ("pools_cl_idle", "cl_idle", GAUGE, "Clients logged in and neither active nor waiting"),
    ("pools_sv_idle", "sv_idle", GAUGE, "Server connections idle in the pool"),
    ("pools_sv_active", "sv_active", GAUGE, "Server connections in use by a client"),
    ("pools_sv_login", "sv_login", GAUGE, "Server connections being opened"),
    ("pools_sv_tested", "sv_tested", GAUGE, "Server connections running a health check"),
)

DATABASES = (
    ("databases_pool_size", "pool_size", GAUGE,
     "Most server connections this address may have (the user's pool_size)"),
    ("databases_current_connections", "current_connections", GAUGE,
     "Server connections to this address, open or being opened"),
)

# (metric name, what of the address's connections, type, help): summed from
# the server connections of SHOW SERVERS, plus the address's ban and pause.
SERVERS = (
    ("servers_bytes_received", "received", COUNTER,
     "Bytes received from PostgreSQL by the address's current connections"),
    ("servers_bytes_sent", "sent", COUNTER,
     "Bytes sent to PostgreSQL by the address's current connections"),
    ("servers_transaction_count", "xacts", COUNTER,
     "Transactions run by the address's current connections"),
    ("servers_query_count", "queries", COUNTER,
     "Queries run by the address's current connections"),
    ("servers_error_count", "errors", COUNTER,
     "Errors returned on the address's current connections"),
    ("servers_idle_count", "idle", GAUGE, "Server connections in state idle"),
    ("servers_active_count", "active", GAUGE, "Server connections in state active"),
    ("servers_tested_count", "tested", GAUGE, "Server connections in state tested"),
    ("servers_login_count", "login", GAUGE, "Server connections in state login"),
    ("servers_is_banned", "banned", GAUGE, "1 if the address is banned, else 0"),
    ("servers_is_paused", "paused", GAUGE, "1 if the address's pool is paused, else 0"),
)

# pgcat_tw: per mirror (SHOW MIRRORS), labels pool, user, address, host, port.
MIRRORS = (
    ("mirrors_connected", "connected", GAUGE, "Mirror connections up now"),
    ("mirrors_sent", "sent", COUNTER, "Chunks sent to the mirror"),
    ("mirrors_sent_bytes", "sent_bytes", COUNTER, "Bytes sent to the mirror"),
    ("mirrors_dropped", "dropped", COUNTER,
     "Chunks dropped because the mirror could not take them (its queue was full)"),
    ("mirrors_dropped_bytes", "dropped_bytes", COUNTER, "Bytes dropped likewise"),
    ("mirrors_failures", "failures", COUNTER, "Mirror connections that failed or were lost"),
)
MIRROR_LABELS = ("address", "host", "pool", "port", "user")

ALL = STATS + POOLS + DATABASES + SERVERS + MIRRORS
METRIC_NAMES = tuple(PREFIX + m[0] for m in ALL)


def _family(name, kind, doc, labels):
    cls = GaugeMetricFamily if kind == GAUGE else UnknownMetricFamily
    return cls(PREFIX + name, doc, labels=list(labels))


def address_labels(a):
    """The labels of a server address (``snapshot.AddressSnap``). ``role``
    is the configured role, as in PgCat and in the address's name: series
    keep their identity across a failover."""
    return [a.database, a.host, str(a.index), a.pool, a.configured_role, str(a.shard),
            a.user]


def _from_rows(specs, columns_rows, labels_of, keys, label_names, check):
    """Families from an admin table: ``keys[i]`` is the record row i was made
    from; ``check(record, row, col)`` guards that pairing."""
    columns, rows = columns_rows
    col = {name: i for i, (name, _type) in enumerate(columns)}
    if len(rows) != len(keys):
        raise AssertionError(f"{len(rows)} admin rows for {len(keys)} records")
    labelled = []
    for record, row in zip(keys, rows):
        check(record, row, col)
        labelled.append((labels_of(record), row))
    out = []
    for name, column, kind, doc in specs:
        fam = _family(name, kind, doc, label_names)
        i = col[column]
        for labels, row in labelled:
            fam.add_metric(labels, row[i])
        out.append(fam)
    return out


def _check_address(column):
    def check(a, row, col):
        if row[col[column]] != a.name:
            raise AssertionError(f"admin row for {row[col[column]]} paired with {a.name}")
    return check


def _check_pool(p, row, col):
    if (row[col["database"]], row[col["user"]]) != (p.database, p.user):
        raise AssertionError(f"admin row for {row[:2]} paired with {p.database}/{p.user}")


def server_totals(snap):
    """Per (pool, user, address name): the sums over its pool connections."""
    out = {}
    for s in snap.servers:
        if s.kind != "pool":
            continue
        t = out.get((s.pool, s.user, s.address))
        if t is None:
            t = out[(s.pool, s.user, s.address)] = dict.fromkeys(
                ("received", "sent", "xacts", "queries", "errors", "idle", "active",
                 "tested", "login"), 0)
        for key in ("received", "sent", "xacts", "queries", "errors"):
            t[key] += getattr(s, key)
        t[s.state] = t.get(s.state, 0) + 1
    return out


def _servers(snap):
    totals = server_totals(snap)
    fams = [_family(name, kind, doc, ADDRESS_LABELS) for name, _key, kind, doc in SERVERS]
    for a in snap.addresses:
        t = totals.get((a.pool, a.user, a.name))
        if t is None:
            continue      # PgCat: only addresses with a server connection
        t["banned"], t["paused"] = int(a.banned), int(a.paused)
        labels = address_labels(a)
        for fam, (_name, key, _kind, _doc) in zip(fams, SERVERS):
            fam.add_metric(labels, t[key])
    return fams


def families(snap):
    """Every metric family of a snapshot, in PgCat's group order."""
    out = _from_rows(STATS, tables.show_stats(snap), address_labels, snap.addresses,
                     ADDRESS_LABELS, _check_address("instance"))
    out += _from_rows(POOLS, tables.show_pools(snap), lambda p: [p.database, p.user],
                      snap.pools, POOL_LABELS, _check_pool)
    out += _servers(snap)
    out += _from_rows(DATABASES, tables.show_databases(snap), address_labels,
                      snap.addresses, ADDRESS_LABELS, _check_address("name"))
    fams = [_family(name, kind, doc, MIRROR_LABELS) for name, _k, kind, doc in MIRRORS]
    for m in getattr(snap, "mirrors", ()):
        labels = [m.address, m.host, m.pool, str(m.port), m.user]
        for fam, (_name, key, _kind, _doc) in zip(fams, MIRRORS):
            fam.add_metric(labels, getattr(m, key))
    return out + fams


class PgCatCollector:
    """A prometheus_client collector: ``collect()`` takes a snapshot and
    yields its families (empty ones left out, as PgCat does)."""

    def __init__(self, snapshot):
        self._snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        for fam in families(self._snapshot()):
            if fam.samples:
                yield fam


def registry_for(snapshot):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PgCatCollector(snapshot))
    return registry


class MetricsResource(resource.Resource):
    """``GET /metrics``; anything else (another path or method) is 404."""

    isLeaf = True

    def __init__(self, registry):
        resource.Resource.__init__(self)
        self.registry = registry

    def render(self, request):
        if request.method not in (b"GET", b"HEAD") or request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"404 Not Found\n"
        try:
            body = exposition.generate_latest(self.registry)
        except Exception:  # noqa: BLE001 - a bug must not take the exporter down
            log.failure("metrics: collecting failed")
            request.setResponseCode(500)
            return b"error collecting metrics\n"
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return body


class MetricsSite(server.Site):
    """A Site that writes no access log (a scrape every few seconds) and
    remembers its connections so that stopping closes them."""

    noisy = False
    displayTracebacks = False

    def __init__(self, root, reactor):
        server.Site.__init__(self, root, reactor=reactor)
        self.channels = set()

    def buildProtocol(self, addr):
        channel = server.Site.buildProtocol(self, addr)
        lost = channel.connectionLost

        def connectionLost(reason):
            self.channels.discard(channel)
            return lost(reason)

        channel.connectionLost = connectionLost
        self.channels.add(channel)
        return channel

    def log(self, request):
        pass


def listen_description(general):
    host = general.host.replace(":", "\\:")
    return f"tcp:{general.prometheus_exporter_port}:interface={host}"


class MetricsService(service.Service):
    """Listens on ``general.host:prometheus_exporter_port`` when started;
    a port in use fails the start (the error is raised)."""

    def __init__(self, reactor, general, snapshot):
        self.reactor = reactor
        self.general = general
        self.site = MetricsSite(MetricsResource(registry_for(snapshot)), reactor)
        self.port = None

    def startService(self):
        endpoint = serverFromString(self.reactor, listen_description(self.general))
        d = endpoint.listen(self.site)
        result = []
        d.addBoth(result.append)
        if not result:
            raise RuntimeError("metrics: the listener did not start synchronously")
        if isinstance(result[0], Failure):
            log.error("metrics: cannot listen on {host}:{port}: {error}",
                      host=self.general.host, port=self.general.prometheus_exporter_port,
                      error=result[0].getErrorMessage())
            result[0].raiseException()
        self.port = result[0]
        log.info("Prometheus metrics on http://{host}:{port}/metrics",
                 host=self.general.host, port=self.port.getHost().port)
        service.Service.startService(self)

    def stopService(self):
        service.Service.stopService(self)
        for channel in list(self.site.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
