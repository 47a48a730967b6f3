"""The pools of one configuration: (pool name, user) -> the server pools of
its addresses. Built from a Config; passed around, never global.

This version serves each (pool, user) from the first shard's primary (or its
first server); replicas, shards and bans plug in at ``UserPool.server_pool``.
"""

from twisted.internet import defer
from twisted.logger import Logger

from pgcat_tw import backend
from pgcat_tw.config import resolve
from pgcat_tw.errors import ServerConnectionFailed
from pgcat_tw.pool import ConnectionPool
from pgcat_tw.relay import TRACKED_PARAMETERS

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


class UserPool:
    def __init__(self, reactor, config, pool_cfg, user_cfg):
        self.reactor = reactor
        self.config = config
        self.pool_cfg = pool_cfg
        self.user_cfg = user_cfg
        self.settings = resolve(config, pool_cfg, user_cfg)
        self.mode = self.settings.pool_mode
        self.closed = False
        self.reference_params = None   # ParameterStatus set shown to clients
        self.canonical = {}            # (param, value as sent) -> server's spelling
        g = config.general
        self.keepalive = (g.tcp_keepalives_idle, g.tcp_keepalives_interval,
                          g.tcp_keepalives_count, g.tcp_user_timeout)
        self.server_user = user_cfg.server_username or user_cfg.username
        self.server_password = (user_cfg.server_password if user_cfg.server_password is not None
                                else user_cfg.password)
        self.address_pools = []
        for shard in pool_cfg.shards:
            for addr in shard.servers:
                self.address_pools.append(self._make_pool(shard, addr))
        primaries = [p for p in self.address_pools if p.address.role == "primary"]
        self._default = primaries[0] if primaries else self.address_pools[0]

    def _make_pool(self, shard, addr):
        s = self.settings
        name = (f'pool "{self.pool_cfg.name}" user "{self.user_cfg.username}" '
                f"server {addr.host}:{addr.port}")
        timeout = s.connect_timeout / 1000.0

        def connect():
            return backend.connect(self.reactor, addr.host, addr.port, self.server_user,
                                   self.server_password, shard.database, timeout,
                                   keepalive=self.keepalive)

        pool = ConnectionPool(
            self.reactor, name, connect, pool_size=s.pool_size, min_pool_size=s.min_pool_size,
            connect_timeout=timeout, idle_timeout=s.idle_timeout / 1000.0,
            server_lifetime=s.server_lifetime / 1000.0,
            round_robin=self.config.general.server_round_robin)
        pool.address = addr
        pool.shard = shard
        pool.on_new_connection = self._capture_params
        return pool

    def _capture_params(self, conn):
        if self.reference_params is None:
            self.reference_params = dict(conn.params)

    def server_pool(self):
        return self._default

    @defer.inlineCallbacks
    def get_reference_params(self):
        """The server parameters clients are greeted with, from a real server
        connection of this pool (one is made if none has been yet)."""
        if self.reference_params is None:
            pool = self.server_pool()
            conn = yield pool.acquire()
            pool.release(conn)
            if self.reference_params is None:
                self.reference_params = dict(conn.params)
        return self.reference_params

    def reap(self, now):
        for p in self.address_pools:
            p.reap(now)

    def close(self):
        self.closed = True
        for p in self.address_pools:
            p.close()


class Cluster:
    """Every UserPool of one Config."""

    def __init__(self, reactor, config, previous=None):
        """``previous``: the Cluster being replaced by a reload; its UserPools
        whose pool section and general settings are unchanged are kept (with
        their connections), the others are closed by ``retire``."""
        self.reactor = reactor
        self.config = config
        self.user_pools = {}
        keep = previous.user_pools if previous is not None else {}
        same_general = previous is not None and previous.config.general == config.general
        for pool_cfg in config.pools:
            for user_cfg in pool_cfg.users:
                key = (pool_cfg.name, user_cfg.username)
                old = keep.get(key)
                if old is not None and same_general and old.pool_cfg == pool_cfg:
                    old.config = config
                    self.user_pools[key] = old
                else:
                    self.user_pools[key] = UserPool(reactor, config, pool_cfg, user_cfg)

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
        return sum(p.total for up in self.user_pools.values() for p in up.address_pools)

    def close(self):
        for up in self.user_pools.values():
            up.close()


__all__ = ["Cluster", "UserPool", "TRACKED_PARAMETERS", "ServerConnectionFailed",
           "set_parameter_sql"]
