"""The Prometheus exporter (``pgcat_tw.metrics``): PgCat's metric names,
types and labels over the admin console's snapshot, served by twisted.web.

Unit tests feed a hand-made snapshot to the collector. Integration tests run
a pooler with the exporter in front of the run's real PostgreSQL and scrape
it with urllib, with Debian's ``prometheus`` server and with Debian's
``prometheus-pgbouncer-exporter`` (pointed at the ``pgbouncer`` admin
database). ``scripts/_setup.sh`` installs both packages; a missing binary
fails the test that needs it.
"""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, error, reactor, task
from twisted.internet.tcp import Port
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from pgcat_tw import metrics
from pgcat_tw.admin import snapshot as snapmod
from pgcat_tw.stats import Averages, Totals
from tests.support import Pooler, PoolerTestCase, free_port, in_thread, pooler_toml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(REPO, "conf", "grafana_dashboard.json")
PROMETHEUS = "/usr/bin/prometheus"
PGBOUNCER_EXPORTER = "/usr/bin/prometheus-pgbouncer-exporter"
SETUP_HINT = ("scripts/_setup.sh installs it (apt-get install -y prometheus "
              "prometheus-pgbouncer-exporter)")

ADDRESS_LABELS = {"database", "host", "index", "pool", "role", "shard", "username"}
POOL_LABELS = {"pool", "user"}
GROUP_LABELS = {"stats": ADDRESS_LABELS, "servers": ADDRESS_LABELS,
                "databases": ADDRESS_LABELS, "pools": POOL_LABELS}
# Reference §3: every metric, by group.
REFERENCE = {
    "stats": ["total_query_count", "total_query_time", "total_received", "total_sent",
              "total_xact_count", "total_xact_time", "total_wait_time", "avg_query_count",
              "avg_query_time", "avg_recv", "avg_sent", "avg_errors", "avg_xact_count",
              "avg_xact_time", "avg_wait_time"],
    "pools": ["maxwait_us", "maxwait", "cl_waiting", "cl_active", "cl_idle", "sv_idle",
              "sv_active", "sv_login", "sv_tested"],
    "servers": ["bytes_received", "bytes_sent", "transaction_count", "query_count",
                "error_count", "idle_count", "active_count", "tested_count", "login_count",
                "is_banned", "is_paused"],
    "databases": ["pool_size", "current_connections"],
}
COUNTERS = {"stats_total_query_count", "stats_total_query_time", "stats_total_received",
            "stats_total_sent", "stats_total_xact_count", "stats_total_xact_time",
            "stats_total_wait_time", "servers_bytes_received", "servers_bytes_sent",
            "servers_transaction_count", "servers_query_count", "servers_error_count"}
ALL_NAMES = {f"pgcat_{g}_{m}" for g, ms in REFERENCE.items() for m in ms}


def free_exporter_port():
    """A free loopback port PgCat's config accepts (prometheus_exporter_port
    is an i16 there: at most 32767, below Linux's ephemeral range)."""
    for _ in range(200):
        port = random.randrange(20000, 32768)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        return port
    raise RuntimeError("no free port below 32768")


def http_get(url, method="GET", timeout=10):
    """(status, content type, body text); blocking (run it in a thread)."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers.get("Content-Type"), e.read().decode()


def parse(text):
    """{name: Metric} of an exposition."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families, name, **labels):
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    found = [s.value for s in families[name].samples
             if all(s.labels.get(k) == v for k, v in labels.items())]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} samples of {name} with {labels}")
    return found[0]


def dashboard_exprs():
    with open(DASHBOARD) as f:
        model = json.load(f)
    exprs = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", ()):
                exprs.append(t["expr"])
            walk(p.get("panels", ()))

    walk(model["panels"])
    return model, exprs


def promql(expr):
    """A dashboard expression with Grafana's variables filled in."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
            .replace("$pool", ".*"))


def wait_port(port, timeout=30.0, proc=None):
    """True once ``port`` accepts a connection; False after ``timeout`` or
    when ``proc`` (a Popen) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "PROMETHEUS")) and k not in ("PORT", "HOST", "CONFIG")}
    env.update(extra)
    return env


def require(binary):
    if not os.access(binary, os.X_OK):
        raise unittest.FailTest(f"{binary} is missing: {SETUP_HINT}")


# --- unit tests: a hand-made snapshot --------------------------------------------------

def _address(name="p_shard_0_primary", index=0, role="primary", banned=False):
    a = snapmod.AddressSnap()
    a.pool, a.user, a.shard, a.index = "p", "u", 0, index
    a.host, a.port, a.database, a.name = "127.0.0.1", 5432, "db", name
    a.configured_role = a.role = role
    a.pool_size, a.min_pool_size, a.pool_mode = 5, 0, "transaction"
    a.totals, a.averages = Totals(), Averages()
    a.sv_active = a.sv_idle = a.sv_tested = a.sv_login = a.current_connections = 0
    a.banned, a.paused = banned, False
    return a


def _pool(addresses):
    p = snapmod.PoolSnap()
    p.database, p.user, p.pool_mode = "p", "u", "transaction"
    p.cl_idle, p.cl_active, p.cl_waiting = 3, 2, 1
    p.sv_active, p.sv_idle, p.sv_tested, p.sv_login = 2, 1, 0, 0
    p.maxwait = 2.5
    p.addresses = addresses
    return p


def _server(address, state, queries=1, xacts=1):
    s = snapmod.ServerSnap()
    s.kind, s.pool, s.user, s.address, s.state = "pool", "p", "u", address, state
    s.received, s.sent, s.xacts, s.queries, s.errors = 100, 10, xacts, queries, 0
    return s


def _snapshot():
    primary = _address()
    replica = _address("p_shard_0_replica_0", index=1, role="replica", banned=True)
    t = primary.totals
    t.xact_count, t.query_count, t.received, t.sent = 7, 9, 1000, 2000
    t.query_time, t.xact_time, t.wait_time = 1.5, 2.25, 0.002
    v = primary.averages
    v.query_time, v.wait_time, v.xact_count = 0.004, 0.000125, 3.0
    primary.current_connections = 2
    snap = snapmod.Snapshot()
    snap.now = 100.0
    snap.addresses = [primary, replica]
    snap.pools = [_pool(snap.addresses)]
    snap.servers = [_server(primary.name, "active", queries=4), _server(primary.name, "idle"),
                    # not a pool connection: left out of servers_*
                    _server("127.0.0.1:5432", "tested")]
    snap.servers[2].kind = "health"
    snap.clients = []
    return snap


class CollectorTests(unittest.SynchronousTestCase):
    def setUp(self):
        registry = metrics.registry_for(_snapshot)
        self.text = metrics.exposition.generate_latest(registry).decode()
        self.fams = parse(self.text)

    def test_names_types_and_labels(self):
        self.assertEqual(set(self.fams), ALL_NAMES)
        for name, fam in self.fams.items():
            short = name[len("pgcat_"):]
            self.assertEqual(fam.type, "unknown" if short in COUNTERS else "gauge", name)
            for s in fam.samples:
                self.assertEqual(s.name, name)
                self.assertEqual(set(s.labels), GROUP_LABELS[short.split("_")[0]], name)

    def test_sample_names_exactly_pgcat(self):
        """No ``_total`` appended (prometheus_client's counter suffix) and one
        HELP/TYPE pair per metric."""
        self.assertIn("\n# TYPE pgcat_stats_total_query_count untyped\n", self.text)
        self.assertRegex(self.text, r"\npgcat_stats_total_query_count\{[^}]*\} 9")
        self.assertNotIn("_total{", self.text)
        for name in ALL_NAMES:
            self.assertEqual(self.text.count(f"# TYPE {name} "), 1, name)

    def test_units_as_show_stats(self):
        f, primary = self.fams, {"role": "primary", "index": "0"}
        self.assertEqual(value(f, "pgcat_stats_total_query_time", **primary), 1500)   # ms
        self.assertEqual(value(f, "pgcat_stats_total_xact_time", **primary), 2250)    # ms
        self.assertEqual(value(f, "pgcat_stats_total_wait_time", **primary), 2000)    # us
        self.assertEqual(value(f, "pgcat_stats_avg_query_time", **primary), 4)        # ms
        self.assertEqual(value(f, "pgcat_stats_avg_wait_time", **primary), 125)       # us
        self.assertEqual(value(f, "pgcat_stats_avg_xact_count", **primary), 3)
        self.assertEqual(value(f, "pgcat_pools_maxwait", pool="p", user="u"), 2)
        self.assertEqual(value(f, "pgcat_pools_maxwait_us", pool="p", user="u"), 500000)
        self.assertEqual(value(f, "pgcat_pools_cl_waiting", pool="p", user="u"), 1)

    def test_labels(self):
        labels = [s.labels for s in self.fams["pgcat_databases_pool_size"].samples]
        self.assertEqual(sorted(labels, key=lambda x: x["index"]), [
            {"database": "db", "host": "127.0.0.1", "index": "0", "pool": "p",
             "role": "primary", "shard": "0", "username": "u"},
            {"database": "db", "host": "127.0.0.1", "index": "1", "pool": "p",
             "role": "replica", "shard": "0", "username": "u"}])

    def test_servers_only_where_connected(self):
        f = self.fams
        self.assertEqual([s.labels["index"] for s in f["pgcat_servers_idle_count"].samples],
                         ["0"])
        self.assertEqual(value(f, "pgcat_servers_active_count"), 1)
        self.assertEqual(value(f, "pgcat_servers_idle_count"), 1)
        self.assertEqual(value(f, "pgcat_servers_tested_count"), 0)
        self.assertEqual(value(f, "pgcat_servers_query_count"), 5)
        self.assertEqual(value(f, "pgcat_servers_bytes_received"), 200)
        self.assertEqual(value(f, "pgcat_servers_is_banned"), 0)
        self.assertEqual(value(f, "pgcat_databases_current_connections", index="0"), 2)

    def test_empty_families_left_out(self):
        snap = _snapshot()
        snap.servers = []
        text = metrics.exposition.generate_latest(metrics.registry_for(lambda: snap)).decode()
        self.assertNotIn("pgcat_servers_", text)
        self.assertIn("pgcat_stats_total_xact_count{", text)


class _General:
    host = "127.0.0.1"
    prometheus_exporter_port = 9930


class ResourceTests(unittest.SynchronousTestCase):
    def render(self, snapshot, path=b"/metrics", method=b"GET"):
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        request.path, request.method = path, method
        site = metrics.MetricsResource(metrics.registry_for(snapshot))
        body = site.render(request)
        return request.responseCode or 200, request.responseHeaders, body

    def test_metrics(self):
        code, headers, body = self.render(_snapshot)
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"),
                         [b"text/plain; version=0.0.4; charset=utf-8"])
        self.assertIn(b"pgcat_pools_cl_waiting{", body)

    def test_404(self):
        for path, method in ((b"/", b"GET"), (b"/metrics/", b"GET"), (b"/x", b"GET"),
                             (b"/metrics", b"POST"), (b"/metrics", b"DELETE")):
            self.assertEqual(self.render(_snapshot, path, method)[0], 404, (path, method))

    def test_500_when_collecting_fails(self):
        def broken():
            raise RuntimeError("boom")

        code, _headers, body = self.render(broken)
        self.assertEqual(code, 500)
        self.assertNotIn(b"boom", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_listens_on_host_and_port(self):
        mem = MemoryReactorClock()
        svc = metrics.MetricsService(mem, _General(), _snapshot)
        svc.startService()
        (port, factory, _backlog, interface), = mem.tcpServers
        self.assertEqual((port, interface), (9930, "127.0.0.1"))
        self.assertIs(factory, svc.site)
        svc.stopService()
        self.assertIsNone(svc.port)


# --- integration: a pooler with the exporter ---------------------------------------------

class ExporterTestCase(PoolerTestCase):
    pool_size = 2
    extra_general = ""

    @defer.inlineCallbacks
    def start_pooler(self, **overrides):
        self.metrics_port = free_exporter_port()
        general = ("enable_prometheus_exporter = true\n"
                   f"prometheus_exporter_port = {self.metrics_port}\n" + self.extra_general)
        overrides.setdefault("general", general)
        pooler = yield PoolerTestCase.start_pooler(self, **overrides)
        return pooler

    def url(self, path="/metrics"):
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    @defer.inlineCallbacks
    def scrape(self):
        status, ctype, body = yield in_thread(http_get, self.url())
        self.assertEqual(status, 200, body)
        return parse(body)

    @defer.inlineCallbacks
    def traffic(self, transactions=50, clients=2):
        script = self.mktemp()
        with open(script, "w") as f:
            f.write("select 1;\n")
        out, err, code = yield self.pooler.pgbench(
            "-n", "-f", script, "-c", str(clients), "-t", str(transactions))
        self.assertEqual(code, 0, err)
        return transactions * clients


class ScrapeTests(ExporterTestCase):
    @defer.inlineCallbacks
    def test_scrape(self):
        status, ctype, body = yield in_thread(http_get, self.url())
        self.assertEqual(status, 200, body)
        self.assertEqual(ctype, "text/plain; version=0.0.4; charset=utf-8")
        fams = parse(body)
        # No server connection yet: servers_* is left out (PgCat's rule).
        self.assertEqual(set(fams), ALL_NAMES - {n for n in ALL_NAMES if "_servers_" in n})
        self.assertEqual(value(fams, "pgcat_databases_pool_size", pool="pgcat_test",
                               username="pgcat_md5", role="primary", index="0", shard="0",
                               database="pgcat_test", host="127.0.0.1"), 2)

    @defer.inlineCallbacks
    def test_values_move_after_traffic(self):
        before = yield self.scrape()
        xacts = yield self.traffic()
        after = yield self.scrape()
        labels = {"pool": "pgcat_test", "username": "pgcat_md5"}
        grew = (value(after, "pgcat_stats_total_xact_count", **labels)
                - value(before, "pgcat_stats_total_xact_count", **labels))
        self.assertGreaterEqual(grew, xacts)
        self.assertGreaterEqual(value(after, "pgcat_stats_total_query_count", **labels), xacts)
        self.assertGreater(value(after, "pgcat_stats_total_received", **labels), 0)
        # Server connections now exist: servers_* appears, for our address.
        self.assertEqual(set(after), ALL_NAMES)
        self.assertGreaterEqual(value(after, "pgcat_servers_transaction_count", **labels), 1)
        self.assertEqual(value(after, "pgcat_servers_is_banned", **labels), 0)
        self.assertEqual(value(after, "pgcat_servers_active_count", **labels), 0)
        self.assertEqual(value(after, "pgcat_databases_current_connections", **labels),
                         value(after, "pgcat_servers_idle_count", **labels))

    @defer.inlineCallbacks
    def test_other_paths_404(self):
        for path, method in (("/", "GET"), ("/metrics/", "GET"), ("/metrics/x", "GET"),
                             ("/metricsx", "GET"), ("/favicon.ico", "GET"),
                             ("/metrics", "POST")):
            status, _ctype, _body = yield in_thread(http_get, self.url(path), method)
            self.assertEqual(status, 404, (path, method))
        status, _ctype, _body = yield in_thread(http_get, self.url("/metrics?x=1"))
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_stop_closes_the_port(self):
        yield self.pooler.stop()
        refused = yield in_thread(lambda: not wait_port(self.metrics_port, timeout=0.2))
        self.assertTrue(refused, "the metrics port still accepts connections after stop")


class WaitingClientTests(ExporterTestCase):
    pool_size = 1
    extra_general = "connect_timeout = 20000\n"

    @defer.inlineCallbacks
    def test_waiting_client_shows(self):
        holder = yield in_thread(psycopg.connect, self.pooler.dsn())
        self.addCleanup(in_thread, holder.close)
        yield in_thread(holder.execute, "select 1")     # a transaction holds the server
        waiter = yield in_thread(psycopg.connect, self.pooler.dsn(), autocommit=True)
        self.addCleanup(in_thread, waiter.close)
        waiting = in_thread(lambda: waiter.execute("select 2").fetchone()[0])
        labels = {"pool": "pgcat_test", "user": "pgcat_md5"}
        for _ in range(100):
            fams = yield self.scrape()
            if value(fams, "pgcat_pools_cl_waiting", **labels) == 1:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(value(fams, "pgcat_pools_cl_waiting", **labels), 1)
        self.assertEqual(value(fams, "pgcat_pools_cl_active", **labels), 1)
        self.assertEqual(value(fams, "pgcat_pools_sv_active", **labels), 1)
        yield task.deferLater(reactor, 0.1, lambda: None)
        fams = yield self.scrape()
        waited = (value(fams, "pgcat_pools_maxwait", **labels) * 1_000_000
                  + value(fams, "pgcat_pools_maxwait_us", **labels))
        self.assertGreaterEqual(waited, 100_000)
        yield in_thread(holder.commit)
        self.assertEqual((yield waiting), 2)
        fams = yield self.scrape()
        self.assertEqual(value(fams, "pgcat_pools_cl_waiting", **labels), 0)


class OffByDefaultTests(PoolerTestCase):
    @defer.inlineCallbacks
    def test_off_by_default(self):
        self.assertFalse(self.pooler.config.general.enable_prometheus_exporter)
        self.assertIsNone(self.pooler.service.metrics)
        listening = [p.getHost().port for p in reactor.getReaders() if isinstance(p, Port)]
        self.assertEqual(listening, [self.pooler.port])
        out, err, code = yield self.pooler.psql("select 1")
        self.assertEqual(code, 0, err)
        # The only listening port is the pooler's own.
        listening = [p.getHost().port for p in reactor.getReaders() if isinstance(p, Port)]
        self.assertEqual(listening, [self.pooler.port])

    @defer.inlineCallbacks
    def test_port_in_use_fails_the_start(self):
        busy = socket.socket()
        self.addCleanup(busy.close)
        port = free_exporter_port()
        busy.bind(("127.0.0.1", port))
        busy.listen(1)
        text = pooler_toml(free_port(), [(self.primary.port, "primary")],
                           general=("enable_prometheus_exporter = true\n"
                                    f"prometheus_exporter_port = {port}\n"))
        pooler = Pooler(text)
        self.assertRaises(error.CannotListenError, pooler.service.startService)
        yield pooler.stop()


# --- the Grafana dashboard ----------------------------------------------------------------

class DashboardTests(ExporterTestCase):
    def test_model(self):
        model, exprs = dashboard_exprs()
        self.assertGreaterEqual(model["schemaVersion"], 36)
        variables = {v["name"]: v for v in model["templating"]["list"]}
        ds = [v for v in variables.values() if v["type"] == "datasource"]
        self.assertEqual([v["query"] for v in ds], ["prometheus"])
        self.assertGreaterEqual(len(exprs), 7)
        for panel in model["panels"]:
            if panel.get("type") != "row":
                self.assertIn("${", json.dumps(panel.get("datasource")), panel["title"])

    @defer.inlineCallbacks
    def test_exprs_name_exported_metrics(self):
        """Every metric a panel queries is in a live scrape (after traffic,
        so that servers_* is there too)."""
        yield self.traffic(transactions=10)
        fams = yield self.scrape()
        _model, exprs = dashboard_exprs()
        used = set()
        for expr in exprs:
            names = set(re.findall(r"\bpgcat_[a-z_]+\b", expr))
            self.assertTrue(names, f"no pgcat metric in {expr!r}")
            used |= names
        self.assertEqual(used - set(fams), set())
        for wanted in ("pgcat_stats_total_xact_count", "pgcat_pools_cl_waiting",
                       "pgcat_pools_maxwait", "pgcat_servers_is_banned",
                       "pgcat_databases_pool_size", "pgcat_databases_current_connections",
                       "pgcat_pools_sv_idle", "pgcat_stats_avg_query_time"):
            self.assertIn(wanted, used)


# --- Debian's prometheus scraping us ---------------------------------------------------------

class Child:
    """A child process with its output in a file."""

    def __init__(self, argv, logfile, env=None, cwd=None):
        self.logfile = logfile
        self._out = open(logfile, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd)

    def log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


class PrometheusServerTests(ExporterTestCase):
    timeout = 120

    def _start_prometheus(self):
        require(PROMETHEUS)
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "scrape_configs:\n  - job_name: pgcat\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{self.metrics_port}']\n")
        self.web_port = free_port()
        child = Child([PROMETHEUS, f"--config.file={config}",
                       f"--storage.tsdb.path={os.path.join(tmp, 'data')}",
                       f"--web.listen-address=127.0.0.1:{self.web_port}"],
                      os.path.join(tmp, "prometheus.log"), env=child_env(), cwd=tmp)
        self.addCleanup(in_thread, child.stop)
        return child

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.web_port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return in_thread(http_get, url)

    @defer.inlineCallbacks
    def _target_up(self, child):
        deadline = time.monotonic() + 30
        last = None
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                self.fail(f"prometheus exited ({child.proc.returncode}):\n{child.log()}")
            try:
                status, _ctype, body = yield self.api("targets")
            except OSError as e:       # not listening yet
                last = repr(e)
            else:
                if status == 200:
                    targets = json.loads(body)["data"]["activeTargets"]
                    ours = [t for t in targets
                            if t["scrapeUrl"] == self.url()]
                    last = ours
                    if ours and ours[0]["health"] == "up":
                        return ours[0]
            yield task.deferLater(reactor, 0.5, lambda: None)
        self.fail(f"our target is not up after 30 s (last: {last}):\n{child.log()[-3000:]}")

    @defer.inlineCallbacks
    def _poll_query(self, query, timeout=20):
        """The value of a one-series query once it is there and above 0 (or
        the last value seen after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            status, _ctype, body = yield self.api("query", query=query)
            self.assertEqual(status, 200, body)
            result = json.loads(body)["data"]["result"]
            if result:
                seen = float(result[0]["value"][1])
                if seen > 0:
                    break
            yield task.deferLater(reactor, 0.5, lambda: None)
        return seen

    @defer.inlineCallbacks
    def test_prometheus_scrapes_us(self):
        child = self._start_prometheus()
        target = yield self._target_up(child)
        self.assertEqual(target["lastError"], "")
        status, _ctype, body = yield self.api("query", query='pgcat_pools_cl_idle')
        self.assertEqual(status, 200, body)
        result = json.loads(body)["data"]["result"]
        self.assertEqual([(r["metric"]["pool"], r["metric"]["user"]) for r in result],
                         [("pgcat_test", "pgcat_md5")])
        # rate() works on the untyped counters (PromQL ignores the type).
        yield self.traffic(transactions=20)
        tps = yield self._poll_query(
            'sum(rate(pgcat_stats_total_xact_count{pool="pgcat_test"}[1m]))')
        self.assertGreater(tps, 0)
        self.assertNotRegex(child.log(), r"level=(warn|error)")
        # Every dashboard expression is valid PromQL over these series.
        _model, exprs = dashboard_exprs()
        for expr in exprs:
            status, _ctype, body = yield self.api("query", query=promql(expr))
            self.assertEqual((status, json.loads(body)["status"]), (200, "success"),
                             f"{expr}: {body}")


# --- Debian's prometheus-pgbouncer-exporter on our admin database ---------------------------

class PgbouncerExporterTests(ExporterTestCase):
    timeout = 90

    def _env(self):
        return child_env(PGPASSWORD="admin_pw", PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")

    @defer.inlineCallbacks
    def test_pgbouncer_exporter(self):
        require(PGBOUNCER_EXPORTER)
        yield self.traffic(transactions=10)
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        port = free_port()
        child = Child([PGBOUNCER_EXPORTER, "--host", "127.0.0.1", "--port", str(port),
                       "--pgbouncer-host", "127.0.0.1",
                       "--pgbouncer-port", str(self.pooler.port),
                       "--pgbouncer-user", "admin"],
                      os.path.join(tmp, "exporter.log"), env=self._env(), cwd=tmp)
        self.addCleanup(in_thread, child.stop)
        up = yield in_thread(wait_port, port, 30, child.proc)
        self.assertTrue(up, f"the exporter did not start:\n{child.log()}")
        status, _ctype, body = yield in_thread(http_get, f"http://127.0.0.1:{port}/metrics")
        log = child.log()
        self.assertEqual(status, 200, f"{body}\n{log}")
        self.assertNotRegex(log, r"Traceback|ERROR", log)
        fams = parse(body)
        self.assertEqual(value(fams, "pgbouncer_active_clients", database="pgcat_test",
                               user="pgcat_md5"), 0)
        self.assertGreaterEqual(value(fams, "pgbouncer_requests_total", database="pgcat_test"), 20)
        self.assertEqual(value(fams, "pgbouncer_pool_size", database="pgcat_test"), 2)

    # Debian's exporter (1.7) reads SHOW STATS's total_requests, PgBouncer's
    # name before 1.8: pgcat_tw's SHOW STATS has it as an extra column.

    @defer.inlineCallbacks
    def test_pgbouncer_exporter_collectors(self):
        """The exporter's own collectors that need only columns we have
        (SHOW POOLS, DATABASES, LISTS), run by Debian's python3 against our
        admin database, export our pool's numbers."""
        require(PGBOUNCER_EXPORTER)
        yield self.traffic(transactions=10)
        code = (
            "import sys\n"
            "from prometheus_client import CollectorRegistry, generate_latest\n"
            "from prometheus_pgbouncer_exporter.utils import get_connection\n"
            "from prometheus_pgbouncer_exporter.collectors import (\n"
            "    PoolsCollector, DatabasesCollector, ListsCollector)\n"
            "conn = get_connection('admin', sys.argv[1], '127.0.0.1')\n"
            "r = CollectorRegistry()\n"
            "r.register(PoolsCollector(connection=conn, databases=None))\n"
            "r.register(DatabasesCollector(connection=conn, databases=None))\n"
            "r.register(ListsCollector(connection=conn))\n"
            "sys.stdout.write(generate_latest(r).decode())\n")
        python = shutil.which("python3", path="/usr/bin") or "/usr/bin/python3"
        proc = yield in_thread(subprocess.run, [python, "-c", code, str(self.pooler.port)],
                               capture_output=True, text=True, env=self._env(), timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        fams = parse(proc.stdout)
        labels = {"database": "pgcat_test", "user": "pgcat_md5"}
        self.assertEqual(value(fams, "pgbouncer_active_clients", **labels), 0)
        self.assertEqual(value(fams, "pgbouncer_waiting_clients", **labels), 0)
        self.assertEqual(value(fams, "pgbouncer_pool_size", database="pgcat_test"), 2)
        self.assertEqual(value(fams, "pgbouncer_reserve_pool", database="pgcat_test"), 0)
        self.assertEqual(value(fams, "pgbouncer_pools"), 2)   # PgCat: 1 + addresses
