"""auth_query: a user's password secret, fetched from PostgreSQL at login.

PgCat runs the query once per pool with ``$1`` replaced textually by the
user name (so its sample configs quote it: ``usename = '$1'``) and accepts
md5 secrets only. Here the query runs at every login of a user whose
password is not in the configuration, with the user name as a bound
parameter of the extended protocol (``'$1'`` is rewritten to ``$1``), so
no user name can change the query; a rotated password takes effect at the
next login; md5 and SCRAM-SHA-256 secrets both work.

The query runs as ``auth_query_user`` in the database of the pool's first
shard, on its primary (or its first server), over a small pool of
connections (at most ``POOL_SIZE``, closed after ``IDLE_TIMEOUT`` unused),
shared by every pool with the same query, credentials and server.
"""

import re

from twisted.internet import defer
from twisted.logger import Logger

from pgcat_tw import backend
from pgcat_tw.errors import ServerConnectionFailed
from pgcat_tw.pool import ConnectionPool

log = Logger()

POOL_SIZE = 2
IDLE_TIMEOUT = 60.0
_QUOTED_PARAM = re.compile(r"'\$1'")


class AuthQueryFailed(ServerConnectionFailed):
    """The secret could not be looked up (server down, query error)."""


def prepare_query(sql):
    """PgCat's quoted ``'$1'`` becomes the bound parameter ``$1``."""
    return _QUOTED_PARAM.sub("$1", sql)


def secret_from_rows(rows):
    """The secret from the query's rows: one row, the secret alone or in the
    second column (``usename, passwd``). None when there is no row or the
    value is NULL or empty. ValueError for more than one row."""
    if not rows:
        return None
    if len(rows) > 1:
        raise ValueError(f"auth_query returned {len(rows)} rows (one is expected)")
    row = rows[0]
    value = row[1] if len(row) >= 2 else (row[0] if row else None)
    return value or None


def _server_of(pool_cfg):
    shard = pool_cfg.shards[0]
    primaries = [s for s in shard.servers if s.role == "primary"]
    addr = primaries[0] if primaries else shard.servers[0]
    return addr.host, addr.port, shard.database


class _Runner:
    def __init__(self, reactor, tls, host, port, database, user, password, sql, timeout,
                 keepalive):
        self.reactor = reactor
        self.sql = prepare_query(sql)
        self.params_count = 1 if "$1" in self.sql else 0
        self.timeout = timeout
        self.where = f"{host}:{port}/{database}"

        def connect():
            return backend.connect(reactor, host, port, user, password, database, timeout,
                                   keepalive=keepalive, tls=tls)

        self.pool = ConnectionPool(
            reactor, f'auth_query as "{user}" on {self.where}', connect, pool_size=POOL_SIZE,
            connect_timeout=timeout, idle_timeout=IDLE_TIMEOUT, server_lifetime=3600.0)
        self._timer = None

    @defer.inlineCallbacks
    def fetch(self, username):
        conn = yield self.pool.acquire()
        params = [username] if self.params_count else []
        try:
            results = yield conn.run_extended(self.sql, params, timeout=self.timeout)
        except Exception:
            self.pool.discard(conn)
            raise
        self.pool.release(conn)
        self._schedule_reap()
        r = results[0]
        if r.error:
            raise AuthQueryFailed(
                f"auth_query failed on {self.where}: {r.error.get('M', 'error')}")
        try:
            return secret_from_rows(r.rows)
        except ValueError as e:
            raise AuthQueryFailed(f"auth_query on {self.where}: {e}") from None

    def _schedule_reap(self):
        if self._timer is None or not self._timer.active():
            self._timer = self.reactor.callLater(IDLE_TIMEOUT + 1, self._reap)

    def _reap(self):
        self._timer = None
        self.pool.reap(self.reactor.seconds())
        if self.pool.total:
            self._schedule_reap()

    def close(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.pool.close()


class AuthQueries:
    """Every auth_query runner of the service (kept across reloads while
    their query, credentials and server are the same)."""

    def __init__(self, reactor, tls=None):
        self.reactor = reactor
        self.tls = tls
        self._runners = {}

    def fetch(self, config, pool_cfg, username):
        """Deferred: the user's secret, or None for no such user (or no
        password); fails with AuthQueryFailed (already logged)."""
        host, port, database = _server_of(pool_cfg)
        g = config.general
        timeout = (pool_cfg.connect_timeout if pool_cfg.connect_timeout is not None
                   else g.connect_timeout) / 1000.0
        key = (pool_cfg.auth_query, pool_cfg.auth_query_user, pool_cfg.auth_query_password,
               host, port, database, timeout)
        runner = self._runners.get(key)
        if runner is None:
            keepalive = (g.tcp_keepalives_idle, g.tcp_keepalives_interval,
                         g.tcp_keepalives_count, g.tcp_user_timeout)
            runner = self._runners[key] = _Runner(
                self.reactor, self.tls, host, port, database, pool_cfg.auth_query_user,
                pool_cfg.auth_query_password, pool_cfg.auth_query, timeout, keepalive)
        d = runner.fetch(username)

        def failed(f):
            err = f.value
            msg = getattr(err, "message", None) or f.getErrorMessage()
            log.error('pool "{pool}": could not look up user "{user}" with auth_query: {msg}',
                      pool=pool_cfg.name, user=username, msg=msg)
            if not isinstance(err, AuthQueryFailed):
                raise AuthQueryFailed(msg)
            return f

        return d.addErrback(failed)

    def connections(self):
        return sum(r.pool.total for r in self._runners.values())

    def close(self):
        for r in self._runners.values():
            r.close()
        self._runners.clear()
