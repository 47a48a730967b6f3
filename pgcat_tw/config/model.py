"""The configuration model: frozen, hashable dataclasses, and what follows from them.

Field defaults are the configuration defaults: PgCat's *code* defaults
(``src/config.rs``), plus a few pgcat_tw extensions.  A field without a
default that appears in a key spec (:mod:`pgcat_tw.config.specs`) is a
required key.  The first problem found raises :class:`ConfigError`,
formatted as ``"{file}: {keypath}: {problem}"``.

    resolve(config, pool, user) -> UserSettings
    diff(old, new) -> ConfigDiff
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields

__all__ = [
    "ConfigError",
    "FrozenMap",
    "ServerAddress",
    "Shard",
    "User",
    "Pool",
    "General",
    "Config",
    "UserSettings",
    "ConfigDiff",
    "resolve",
    "diff",
]


class ConfigError(Exception):
    """A configuration problem: ``str(e) == f"{file}: {keypath}: {problem}"``.

    File-level problems (unreadable file, TOML syntax) have an empty keypath
    and render as ``f"{file}: {problem}"``.
    """

    def __init__(self, file: str, keypath: str, problem: str):
        super().__init__(file, keypath, problem)
        self.file = file
        self.keypath = keypath
        self.problem = problem

    def __str__(self):
        if self.keypath:
            return f"{self.file}: {self.keypath}: {self.problem}"
        return f"{self.file}: {self.problem}"


class FrozenMap(Mapping):
    """A read-only, hashable mapping (used for plugin settings)."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items=()):
        self._items = dict(items)
        self._hash = None

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __hash__(self):
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __repr__(self):
        return f"FrozenMap({self._items!r})"


# dataclass(slots=True) is Python 3.10+; PyPy (Debian's pypy3) is 3.9.
_SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}


# ---------------------------------------------------------------------------
# Data model.  Field defaults are the configuration defaults; a field without
# a default that appears in a spec (pgcat_tw.config.specs) is a required key.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, **_SLOTS)
class ServerAddress:
    host: str
    port: int
    role: str  # "primary" | "replica"
    index: int  # position in the shard's servers list


@dataclass(frozen=True, **_SLOTS)
class Shard:
    index: int
    database: str
    servers: tuple[ServerAddress, ...]
    # (host, port, index into servers whose traffic is mirrored)
    mirrors: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True, **_SLOTS)
class User:
    key: str
    username: str
    pool_size: int
    password: str | None = None
    auth_type: str = "md5"
    server_username: str | None = None
    server_password: str | None = None
    min_pool_size: int = 0
    pool_mode: str | None = None
    statement_timeout: int = 0
    connect_timeout: int | None = None
    idle_timeout: int | None = None
    server_lifetime: int | None = None
    # pgcat_tw extension (PgBouncer's): client connections of this user;
    # None: [general]'s.
    max_user_client_connections: int | None = None


@dataclass(frozen=True, **_SLOTS)
class Pool:
    name: str
    users: tuple[User, ...]
    shards: tuple[Shard, ...]
    pool_mode: str = "transaction"
    load_balancing_mode: str = "random"
    default_role: str = "any"
    query_parser_enabled: bool = False
    query_parser_max_length: int | None = None
    query_parser_read_write_splitting: bool = False
    # pgcat_tw: functions a query sent to a replica may call besides the
    # built-in read-only ones ("f" or "schema.f").
    query_parser_read_only_functions: tuple[str, ...] = ()
    primary_reads_enabled: bool = False
    connect_timeout: int | None = None
    idle_timeout: int | None = None
    server_lifetime: int | None = None
    checkout_failure_limit: int | None = None
    sharding_function: str = "pg_bigint_hash"
    automatic_sharding_key: str | None = None
    sharding_key_regex: str | None = None
    shard_id_regex: str | None = None
    regex_search_limit: int = 1000
    default_shard: str = "shard_0"
    # Filled in from [general] when not set on the pool (as PgCat does).
    auth_query: str | None = None
    auth_query_user: str | None = None
    auth_query_password: str | None = None
    # pgcat_tw extension: pool_size of users found through auth_query that
    # are not listed under users (inherited from [general]).
    auth_query_pool_size: int = 10
    cleanup_server_connections: bool = True
    log_client_parameter_status_changes: bool = False
    prepared_statements_cache_size: int = 0
    db_activity_based_routing: bool = False
    db_activity_init_delay: int = 100  # ms
    db_activity_ttl: int = 900  # s
    table_mutation_cache_ms_ttl: int = 50  # ms
    # pgcat_tw extension: bytes of WAL a replica may be behind the primary
    # and still serve reads; None = no limit.
    max_replica_lag: int | None = None
    # pgcat_tw extension (PgBouncer's): client connections to this pool;
    # None: [general]'s.
    max_db_client_connections: int | None = None
    # None = use the global [plugins]; a table here replaces them entirely.
    plugins: FrozenMap | None = None

    def user(self, username: str) -> User | None:
        for user in self.users:
            if user.username == username:
                return user
        return None

    @property
    def auth_query_configured(self) -> bool:
        return None not in (
            self.auth_query,
            self.auth_query_user,
            self.auth_query_password,
        )


@dataclass(frozen=True, **_SLOTS)
class General:
    admin_username: str
    admin_password: str
    host: str = "0.0.0.0"
    port: int = 5432
    enable_prometheus_exporter: bool = False
    prometheus_exporter_port: int = 9930
    connect_timeout: int = 1000  # ms
    idle_timeout: int = 600000  # ms
    server_lifetime: int = 3600000  # ms
    idle_client_in_transaction_timeout: int = 0  # ms, 0 = off
    healthcheck_timeout: int = 1000  # ms
    healthcheck_delay: int = 30000  # ms
    shutdown_timeout: int = 60000  # ms
    ban_time: int = 60  # s
    log_client_connections: bool = False
    log_client_disconnections: bool = False
    autoreload: int | None = None  # ms, None = off
    worker_threads: int = 4
    tcp_keepalives_idle: int = 5  # s
    tcp_keepalives_count: int = 5
    tcp_keepalives_interval: int = 5  # s
    tcp_user_timeout: int = 10000  # ms
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    server_tls: bool = False
    verify_server_certificate: bool = False
    # pgcat_tw extensions for TLS (PgBouncer-like): refuse clients that do
    # not use TLS; verify client certificates against a CA file; the CA file
    # server certificates are verified against (default: system trust store).
    tls_require: bool = False
    tls_ca_file: str | None = None
    verify_client_certificate: bool = False
    server_tls_ca_file: str | None = None
    admin_auth_type: str = "md5"
    validate_config: bool = True
    server_round_robin: bool = True
    dns_cache_enabled: bool = False
    dns_max_ttl: int = 30  # s
    auth_query: str | None = None
    auth_query_user: str | None = None
    auth_query_password: str | None = None
    auth_query_pool_size: int = 10  # pgcat_tw, see Pool.auth_query_pool_size
    # pgcat_tw extension: largest client protocol message accepted, in bytes.
    max_packet_size: int = 1073741824
    # pgcat_tw extensions (ms, 0 = off): background health checks of every
    # server (role by pg_is_in_recovery(), replica lag), and probes of
    # banned servers so they return as soon as they answer.
    healthcheck_interval: int = 5000
    ban_probe_interval: int = 1000
    # pgcat_tw extensions (PgBouncer's names; 0 = no limit / off):
    # client connections in all, per pool (database) and per user; server
    # logins in flight per server address (a reconnect storm cannot flood
    # PostgreSQL); ms a client may wait in a pool's queue (None: as
    # connect_timeout, PgCat's meaning) and after which it gets a NOTICE;
    # ms a transaction, and a client between transactions, may last;
    # statement_timeout for every user that sets none.
    max_client_conn: int = 0
    max_db_client_connections: int = 0
    max_user_client_connections: int = 0
    server_login_limit: int = 16
    query_wait_timeout: int | None = None
    query_wait_notify: int = 0
    transaction_timeout: int = 0
    client_idle_timeout: int = 0
    statement_timeout: int = 0
    # A Unix socket beside TCP (PgBouncer's unix_socket_dir; None: none):
    # <dir>/.s.PGSQL.<port>, as psql's -h /dir expects.
    unix_socket_dir: str | None = None


@dataclass(frozen=True, **_SLOTS)
class Config:
    path: str
    general: General
    pools: tuple[Pool, ...] = ()
    plugins: FrozenMap | None = None  # global [plugins]

    def pool(self, name: str) -> Pool | None:
        for pool in self.pools:
            if pool.name == name:
                return pool
        return None

    @property
    def pool_names(self) -> tuple[str, ...]:
        return tuple(pool.name for pool in self.pools)

    def plugins_for(self, pool: Pool) -> FrozenMap | None:
        """The plugin settings in force for ``pool`` (pool table replaces global)."""
        return pool.plugins if pool.plugins is not None else self.plugins


@dataclass(frozen=True, **_SLOTS)
class UserSettings:
    pool_mode: str
    connect_timeout: int
    idle_timeout: int
    server_lifetime: int
    statement_timeout: int
    pool_size: int
    min_pool_size: int


@dataclass(frozen=True, **_SLOTS)
class ConfigDiff:
    general_changed: tuple[str, ...] = ()
    pools_added: tuple[str, ...] = ()
    pools_removed: tuple[str, ...] = ()
    pools_changed: tuple[str, ...] = ()
    plugins_changed: bool = False  # the global [plugins] table

    @property
    def changed(self) -> bool:
        return bool(
            self.general_changed
            or self.pools_added
            or self.pools_removed
            or self.pools_changed
            or self.plugins_changed
        )



# ---------------------------------------------------------------------------
# What follows from a config.
# ---------------------------------------------------------------------------


def resolve(config: Config, pool: Pool, user: User) -> UserSettings:
    """Effective settings for one user of one pool: user > pool > general."""

    def pick(name: str) -> int:
        for source in (user, pool):
            value = getattr(source, name)
            if value is not None:
                return value
        return getattr(config.general, name)

    return UserSettings(
        pool_mode=user.pool_mode if user.pool_mode is not None else pool.pool_mode,
        connect_timeout=pick("connect_timeout"),
        idle_timeout=pick("idle_timeout"),
        server_lifetime=pick("server_lifetime"),
        statement_timeout=user.statement_timeout or config.general.statement_timeout,
        pool_size=user.pool_size,
        min_pool_size=user.min_pool_size,
    )


def diff(old: Config, new: Config) -> ConfigDiff:
    """What changed between two configs (general keys, pools by name)."""
    general_changed = tuple(
        f.name
        for f in fields(General)
        if getattr(old.general, f.name) != getattr(new.general, f.name)
    )
    old_names, new_names = old.pool_names, new.pool_names
    return ConfigDiff(
        general_changed=general_changed,
        pools_added=tuple(n for n in new_names if n not in old_names),
        pools_removed=tuple(n for n in old_names if n not in new_names),
        pools_changed=tuple(
            n for n in new_names if n in old_names and old.pool(n) != new.pool(n)
        ),
        plugins_changed=old.plugins != new.plugins,
    )
