"""Shared pieces of the integration tests: a pgcat_tw service running in
trial's reactor in front of the harness's real PostgreSQL, and helpers to
drive real clients (psql, pgbench, psycopg, asyncpg) without blocking the
reactor (threads or child processes).
"""

import os
import shutil
import socket
import struct

from twisted.internet import defer, reactor, task, threads, utils
from twisted.trial import unittest

from pgcat_tw.config import parse
from pgcat_tw.service import PgCatService
from tests.pgharness import USERS, topology

PSQL = shutil.which("psql") or "/usr/bin/psql"
PGBENCH = shutil.which("pgbench") or "/usr/bin/pgbench"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pooler_toml(port, servers, pool_mode="transaction", pool_size=2, users=None,
                general="", pool_extra="", database="pgcat_test", pool_name="pgcat_test"):
    """A PgCat-format config: one pool (named like the database by default)
    with one user per entry of ``users`` (name -> extra TOML lines)."""
    if users is None:
        users = {"pgcat_md5": ""}
    lines = [
        "[general]",
        'host = "127.0.0.1"',
        f"port = {port}",
        'admin_username = "admin"',
        'admin_password = "admin_pw"',
        "" if "connect_timeout" in general else "connect_timeout = 3000",
        general,
        f"[pools.{pool_name}]",
        f'pool_mode = "{pool_mode}"',
        pool_extra,
    ]
    for i, (name, extra) in enumerate(users.items()):
        password = USERS.get(name)
        lines.append(f"[pools.{pool_name}.users.{i}]")
        lines.append(f'username = "{name}"')
        if password is not None and "password" not in extra:
            lines.append(f'password = "{password}"')
        if "pool_size" not in extra:
            lines.append(f"pool_size = {pool_size}")
        if extra:
            lines.append(extra)
    lines.append(f"[pools.{pool_name}.shards.0]")
    lines.append(f'database = "{database}"')
    srv = ", ".join(f'["127.0.0.1", {port_}, "{role}"]' for port_, role in servers)
    lines.append(f"servers = [{srv}]")
    return "\n".join(lines) + "\n"


class Pooler:
    """A PgCatService on a free loopback port, in this reactor."""

    def __init__(self, toml_text):
        self.config, self.warnings = parse(toml_text, "test.toml")
        self.port = self.config.general.port
        self.service = PgCatService(reactor, self.config, warnings=self.warnings)

    @defer.inlineCallbacks
    def start(self):
        self.service.startService()
        port = yield self.service.listening
        self.port = port.getHost().port
        return self

    @property
    def cluster(self):
        return self.service.cluster

    @defer.inlineCallbacks
    def stop(self):
        yield self.service.stopService()
        # Wait until every client and server connection is really closed,
        # so trial sees a clean reactor.
        for _ in range(200):
            if not self.service.factory.clients and self.cluster.server_connections() == 0:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        # A TLS connection closes after an exchange of close_notify alerts,
        # some reactor turns after the pools forgot it: wait for the sockets.
        for _ in range(100):
            if not open_tcp_connections():
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        yield task.deferLater(reactor, 0, lambda: None)

    def dsn(self, user="pgcat_md5", db="pgcat_test", password=None, **extra):
        if password is None:
            password = USERS.get(user) or ""
        parts = [f"host=127.0.0.1 port={self.port} user={user} dbname={db}",
                 f"password={password}", "sslmode=disable", "connect_timeout=10"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def env(self, user="pgcat_md5", password=None):
        env = dict(os.environ)
        env["PGPASSWORD"] = USERS.get(user) or "" if password is None else password
        env["PGSSLMODE"] = "disable"
        env["PGCONNECT_TIMEOUT"] = "10"
        for k in ("PGSERVICE", "PGOPTIONS", "PGAPPNAME", "PGHOST", "PGPORT"):
            env.pop(k, None)
        return env

    def psql(self, sql, user="pgcat_md5", db="pgcat_test", password=None, extra_args=()):
        """Run psql through the pooler: Deferred (out, err, code)."""
        args = ["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                "-p", str(self.port), "-U", user, "-d", db, *extra_args, "-c", sql]
        return utils.getProcessOutputAndValue(PSQL, args, env=self.env(user, password))

    def pgbench(self, *args, user="pgcat_md5", db="pgcat_test"):
        argv = ["-h", "127.0.0.1", "-p", str(self.port), "-U", user, *args, db]
        return utils.getProcessOutputAndValue(PGBENCH, argv, env=self.env(user))


def open_tcp_connections():
    """TCP connections (not listening ports) the reactor still watches."""
    from twisted.internet import tcp

    return [s for s in set(reactor.getReaders()) | set(reactor.getWriters())
            if isinstance(s, (tcp.Client, tcp.Server))]


def in_thread(fn, *args, **kwargs):
    """Run a blocking client function in the reactor's thread pool."""
    return threads.deferToThread(fn, *args, **kwargs)


class PoolerTestCase(unittest.TestCase):
    """Starts a pooler per test in front of the run's shared primary.
    Subclasses set pool_mode / pool_size / users / general / pool_extra."""

    pool_mode = "transaction"
    pool_size = 2
    users = None
    general = ""
    pool_extra = ""
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.topo = yield threads.deferToThread(topology)
        self.primary = self.topo.primary
        yield self.start_pooler()

    @defer.inlineCallbacks
    def start_pooler(self, **overrides):
        kw = dict(pool_mode=self.pool_mode, pool_size=self.pool_size, users=self.users,
                  general=self.general, pool_extra=self.pool_extra)
        kw.update(overrides)
        text = pooler_toml(free_port(), [(self.primary.port, "primary")], **kw)
        self.pooler = yield Pooler(text).start()
        self.addCleanup(self.pooler.stop)
        return self.pooler

    def primary_sql(self, sql, db="pgcat_test"):
        """Run SQL directly on the primary as the superuser (in a thread)."""
        return threads.deferToThread(self.primary.psql, sql, db)


# --- raw protocol helpers (for bad-input tests) ---------------------------------

def startup_packet(user, database, version=196608, extra=None):
    params = {"user": user, "database": database}
    params.update(extra or {})
    body = struct.pack("!i", version) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def read_messages(sock, until=b"Z", timeout=5.0):
    """Read backend messages from a blocking socket until one of type
    ``until`` or EOF. Returns [(type bytes, body)], closed flag."""
    sock.settimeout(timeout)
    buf = b""
    out = []
    closed = False
    while True:
        while len(buf) >= 5:
            t = buf[:1]
            (ln,) = struct.unpack("!i", buf[1:5])
            if len(buf) < 1 + ln:
                break
            out.append((t, buf[5:1 + ln]))
            buf = buf[1 + ln:]
            if t == until:
                return out, closed
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return out, closed
        if not chunk:
            closed = True
            if buf:
                out.append((b"?", buf))
            return out, closed
        buf += chunk


def error_fields(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields
