"""Parse and validate PgCat's ``pgcat.toml``.

Pure Python (no Twisted): the file is read with ``tomli`` into frozen,
hashable dataclasses.  Every key PgCat knows is accepted with PgCat's *code*
default (``src/config.rs``), plus a few pgcat_tw extensions.  Unknown keys are
not errors (PgCat silently ignores them); they are reported as warnings so a
typo such as ``prepared_statement_cache_size`` does not go unnoticed.

Validation is table driven: each dataclass has a spec mapping its TOML keys to
small checker functions, and the dataclass field defaults are the config
defaults.  The first problem found raises :class:`ConfigError`, formatted as
``"{file}: {keypath}: {problem}"``.

Public API::

    parse(text, path="<string>") -> (Config, warnings)
    load(path) -> (Config, warnings)
    from_dict(data, path="<string>") -> (Config, warnings)   # already-decoded TOML
    resolve(config, pool, user) -> UserSettings
    diff(old, new) -> ConfigDiff
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable

import tomli

from pgcat_tw.auth import md5 as _md5
from pgcat_tw.auth import scram as _scram

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
    "parse",
    "load",
    "from_dict",
    "resolve",
    "diff",
]

STRING_PATH = "<string>"


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
# a default that appears in a spec below is a required key.
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
# Checkers: each takes the raw TOML value and returns the stored value, or
# raises _Invalid with the problem text.
# ---------------------------------------------------------------------------


class _Invalid(Exception):
    pass


def _show(value: Any) -> str:
    """Render a TOML value for an error message: "ten", -3, true, [1, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    return str(value)


def _quote_all(values) -> str:
    return ", ".join(json.dumps(v) for v in values)


def _integer(lo: int, hi: int | None, desc: str) -> Callable[[Any], int]:
    def check(value):
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            raise _Invalid(f"must be {desc}, got {_show(value)}")
        return value

    return check


NON_NEGATIVE = _integer(0, None, "a non-negative integer")
POSITIVE = _integer(1, None, "a positive integer")
PORT = _integer(1, 65535, "a port number (1-65535)")


def BOOL(value):
    if not isinstance(value, bool):
        raise _Invalid(f"must be a boolean (true or false), got {_show(value)}")
    return value


def STRING(value):
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def NON_EMPTY_STRING(value):
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be a non-empty string, got {_show(value)}")
    return value


def _choice(*allowed: str, aliases: dict[str, str] | None = None):
    aliases = aliases or {}

    def check(value):
        if isinstance(value, str):
            if value in allowed:
                return value
            if value in aliases:
                return aliases[value]
        raise _Invalid(f"must be one of {_quote_all(allowed)}, got {_show(value)}")

    return check


def REGEX(value):
    STRING(value)
    try:
        re.compile(value)
    except re.error as e:
        raise _Invalid(f"is not a valid regular expression ({e}), got {_show(value)}")
    return value


def SHARDING_KEY(value):
    """``table.column``; double quotes are dropped like PgCat does."""
    STRING(value)
    key = value.replace('"', "")
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise _Invalid(
            f'must be "table.column" with exactly one ".", got {_show(value)}'
        )
    return key


_DEFAULT_SHARD_RE = re.compile(r"shard_[0-9]+\Z")


def DEFAULT_SHARD(value):
    # The shard number's range is checked once the shards are known.
    if isinstance(value, str) and (
        value in ("random", "random_healthy") or _DEFAULT_SHARD_RE.match(value)
    ):
        return value
    raise _Invalid(
        f'must be "shard_<n>", "random" or "random_healthy", got {_show(value)}'
    )


def STRING_LIST(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"must be an array of strings, got {_show(value)}")
    return tuple(value)


def _string_rows(width: int | None, desc: str):
    def check(value):
        ok = isinstance(value, list) and all(
            isinstance(row, list)
            and (width is None or len(row) == width)
            and all(isinstance(cell, str) for cell in row)
            for row in value
        )
        if not ok:
            raise _Invalid(f"must be {desc}, got {_show(value)}")
        return tuple(tuple(row) for row in value)

    return check


POOL_MODE = _choice(
    "transaction", "session", aliases={"Transaction": "transaction", "Session": "session"}
)
AUTH_TYPE = _choice(
    "md5",
    "scram-sha-256",
    "trust",
    aliases={"MD5": "md5", "Trust": "trust", "SCRAM-SHA-256": "scram-sha-256"},
)
ROLE = _choice("primary", "replica")

_SpecT = dict[str, Callable[[Any], Any]]

GENERAL_SPEC: _SpecT = {
    "host": STRING,
    "port": PORT,
    "enable_prometheus_exporter": BOOL,
    "prometheus_exporter_port": _integer(1, 32767, "a port number (1-32767)"),
    "connect_timeout": NON_NEGATIVE,
    "idle_timeout": NON_NEGATIVE,
    "server_lifetime": NON_NEGATIVE,
    "idle_client_in_transaction_timeout": NON_NEGATIVE,
    "healthcheck_timeout": NON_NEGATIVE,
    "healthcheck_delay": NON_NEGATIVE,
    "shutdown_timeout": NON_NEGATIVE,
    "ban_time": NON_NEGATIVE,
    "log_client_connections": BOOL,
    "log_client_disconnections": BOOL,
    "autoreload": POSITIVE,
    "worker_threads": POSITIVE,
    "tcp_keepalives_idle": NON_NEGATIVE,
    "tcp_keepalives_count": NON_NEGATIVE,
    "tcp_keepalives_interval": NON_NEGATIVE,
    "tcp_user_timeout": NON_NEGATIVE,
    "tls_certificate": NON_EMPTY_STRING,
    "tls_private_key": NON_EMPTY_STRING,
    "server_tls": BOOL,
    "verify_server_certificate": BOOL,
    "tls_require": BOOL,
    "tls_ca_file": NON_EMPTY_STRING,
    "verify_client_certificate": BOOL,
    "server_tls_ca_file": NON_EMPTY_STRING,
    "admin_username": STRING,
    "admin_password": STRING,
    "admin_auth_type": AUTH_TYPE,
    "validate_config": BOOL,
    "server_round_robin": BOOL,
    "dns_cache_enabled": BOOL,
    "dns_max_ttl": NON_NEGATIVE,
    "auth_query": NON_EMPTY_STRING,
    "auth_query_user": STRING,
    "auth_query_password": STRING,
    "auth_query_pool_size": POSITIVE,
    "max_packet_size": _integer(1024, 2**31 - 1, "an integer from 1024 to 2147483647"),
    "healthcheck_interval": NON_NEGATIVE,
    "ban_probe_interval": NON_NEGATIVE,
}

POOL_SPEC: _SpecT = {
    "pool_mode": POOL_MODE,
    "load_balancing_mode": _choice(
        "random",
        "loc",
        aliases={
            "Random": "random",
            "LOC": "loc",
            "least_outstanding_connections": "loc",
        },
    ),
    "default_role": _choice("any", "primary", "replica"),
    "query_parser_enabled": BOOL,
    "query_parser_max_length": POSITIVE,
    "query_parser_read_write_splitting": BOOL,
    "primary_reads_enabled": BOOL,
    "connect_timeout": NON_NEGATIVE,
    "idle_timeout": NON_NEGATIVE,
    "server_lifetime": NON_NEGATIVE,
    "checkout_failure_limit": POSITIVE,
    "sharding_function": _choice("pg_bigint_hash", "sha1"),
    "automatic_sharding_key": SHARDING_KEY,
    "sharding_key_regex": REGEX,
    "shard_id_regex": REGEX,
    "regex_search_limit": POSITIVE,
    "default_shard": DEFAULT_SHARD,
    "auth_query": NON_EMPTY_STRING,
    "auth_query_user": STRING,
    "auth_query_password": STRING,
    "auth_query_pool_size": POSITIVE,
    "cleanup_server_connections": BOOL,
    "log_client_parameter_status_changes": BOOL,
    "prepared_statements_cache_size": NON_NEGATIVE,
    "db_activity_based_routing": BOOL,
    "db_activity_init_delay": POSITIVE,
    "db_activity_ttl": POSITIVE,
    "table_mutation_cache_ms_ttl": POSITIVE,
    "max_replica_lag": NON_NEGATIVE,
}

USER_SPEC: _SpecT = {
    "username": STRING,
    "password": STRING,
    "auth_type": AUTH_TYPE,
    "server_username": STRING,
    "server_password": STRING,
    "pool_size": POSITIVE,
    "min_pool_size": NON_NEGATIVE,
    "pool_mode": POOL_MODE,
    "statement_timeout": NON_NEGATIVE,
    "connect_timeout": NON_NEGATIVE,
    "idle_timeout": NON_NEGATIVE,
    "server_lifetime": NON_NEGATIVE,
}

# Keys of [pools.X.shards.N]; servers and mirrors are checked by hand.
SHARD_SPEC: _SpecT = {"database": STRING}

# Plugin name -> {key: (checker, default)}; `enabled` may be omitted (false).
PLUGIN_SPECS: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "intercept": {"enabled": (BOOL, False), "queries": (None, FrozenMap())},
    "table_access": {"enabled": (BOOL, False), "tables": (STRING_LIST, ())},
    "query_logger": {"enabled": (BOOL, False)},
    "prewarmer": {"enabled": (BOOL, False), "queries": (STRING_LIST, ())},
}

INTERCEPT_QUERY_SPEC: _SpecT = {
    "query": STRING,
    "schema": _string_rows(2, "an array of [name, type] string pairs"),
    "result": _string_rows(None, "an array of arrays of strings"),
}

TOP_LEVEL_KEYS = ("path", "general", "plugins", "pools")


def _key(base: str, *segments: Any) -> str:
    """Extend the key path ``base`` ("" at the top) with more segments.

    Segments that are not bare TOML keys (e.g. a pool named "my.db") are
    double-quoted, as they would be written in TOML.
    """
    out = [base] if base else []
    for segment in segments:
        segment = str(segment)
        if re.fullmatch(r"[A-Za-z0-9_-]+", segment):
            out.append(segment)
        else:
            out.append(json.dumps(segment, ensure_ascii=False))
    return ".".join(out)


def _check_specs_match_dataclasses():
    # Keeps the specs and the dataclasses from drifting apart.
    structural = {
        General: set(),
        Pool: {"name", "users", "shards", "plugins"},
        User: {"key"},
    }
    for cls, spec in ((General, GENERAL_SPEC), (Pool, POOL_SPEC), (User, USER_SPEC)):
        names = {f.name for f in fields(cls)} - structural[cls]
        assert names == set(spec), (cls.__name__, names ^ set(spec))


_check_specs_match_dataclasses()


# ---------------------------------------------------------------------------
# The parser.
# ---------------------------------------------------------------------------


class _Parser:
    def __init__(self, path: str):
        self.path = path
        self.warnings: list[str] = []

    def fail(self, keypath: str, problem: str):
        raise ConfigError(self.path, keypath, problem)

    def warn(self, keypath: str, problem: str):
        self.warnings.append(f"{self.path}: {keypath}: {problem}")

    def table(self, value: Any, keypath: str) -> dict:
        if not isinstance(value, dict):
            self.fail(keypath, f"must be a table, got {_show(value)}")
        return value

    def check(self, checker, value, keypath: str):
        try:
            return checker(value)
        except _Invalid as e:
            self.fail(keypath, str(e))

    def section(self, table: dict, keypath: str, cls, spec: _SpecT, skip=()) -> dict:
        """Check the keys of one TOML table against ``spec``.

        Returns {field: value} for keys present; unknown keys become warnings;
        a spec key whose dataclass field has no default is required.
        """
        values = {}
        for key, raw in table.items():
            if key in skip:
                continue
            if key not in spec:
                self.warn(_key(keypath, key), "unknown key, ignored")
                continue
            values[key] = self.check(spec[key], raw, _key(keypath, key))
        for f in fields(cls):
            if f.name in spec and f.name not in values and f.default is MISSING:
                self.fail(_key(keypath, f.name), "is required")
        return values

    # -- top level ----------------------------------------------------------

    def config(self, data: dict) -> Config:
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                self.warn(_key("", key), "unknown key, ignored")
        if "path" in data:
            self.check(STRING, data["path"], "path")  # PgCat overwrites it
        if "general" not in data:
            self.fail("general", "is required")
        general = self.general(self.table(data["general"], "general"))
        plugins = None
        if "plugins" in data:
            plugins = self.plugins(data["plugins"], "plugins")
        pools = []
        for name, raw in self.table(data.get("pools", {}), "pools").items():
            pools.append(self.pool(name, raw, general))
        config = Config(
            path=self.path, general=general, pools=tuple(pools), plugins=plugins
        )
        if _any_enabled(plugins):
            for pool in config.pools:
                if pool.plugins is None and not pool.query_parser_enabled:
                    self.warn(
                        _key("pools", pool.name),
                        "global plugins are not applied because"
                        " query_parser_enabled is false",
                    )
        return config

    def general(self, table: dict) -> General:
        values = self.section(table, "general", General, GENERAL_SPEC)
        general = General(**values)
        if general.tls_certificate is not None and general.tls_private_key is None:
            self.fail("general.tls_certificate", "requires tls_private_key to be set")
        if general.tls_private_key is not None and general.tls_certificate is None:
            self.fail("general.tls_private_key", "requires tls_certificate to be set")
        self.tls_settings(general)
        self.secret("general.admin_password", general.admin_password, general.admin_auth_type)
        if general.auth_query is not None and (
            general.auth_query_user is None or general.auth_query_password is None
        ):
            self.fail(
                "general.auth_query",
                "requires auth_query_user and auth_query_password to be set",
            )
        return general

    # -- pools --------------------------------------------------------------

    def tls_settings(self, general: General):
        """The pgcat_tw TLS keys: combinations that cannot work are errors,
        settings that would have no effect are warnings. (The files are read
        by pgcat_tw.tls when the service starts or reloads.)"""
        if general.tls_require and general.tls_certificate is None:
            self.fail("general.tls_require", "requires tls_certificate and tls_private_key")
        if general.verify_client_certificate:
            if general.tls_certificate is None:
                self.fail(
                    "general.verify_client_certificate",
                    "requires tls_certificate and tls_private_key",
                )
            if general.tls_ca_file is None:
                self.fail(
                    "general.verify_client_certificate",
                    "requires tls_ca_file (the CA that signs client certificates)",
                )
        elif general.tls_ca_file is not None:
            self.warn(
                "general.tls_ca_file",
                "has no effect unless verify_client_certificate = true",
            )
        if general.verify_server_certificate and not general.server_tls:
            self.warn(
                "general.verify_server_certificate",
                "has no effect unless server_tls = true",
            )
        if general.server_tls_ca_file is not None and not general.verify_server_certificate:
            self.warn(
                "general.server_tls_ca_file",
                "has no effect unless verify_server_certificate = true",
            )

    def secret(self, keypath: str, password: str | None, auth_type: str):
        """A password may be plaintext, an md5 secret or a SCRAM-SHA-256
        secret; a SCRAM secret must parse, and scram-sha-256 cannot work
        from an md5 secret."""
        if password is None:
            return
        if _scram.is_scram_secret(password):
            try:
                _scram.parse_secret(password)
            except ValueError as e:
                self.fail(keypath, str(e))
        elif auth_type == "scram-sha-256" and _md5.is_md5_secret(password):
            self.fail(
                keypath,
                'is an md5 secret, which cannot be used with auth_type "scram-sha-256";'
                " give the plaintext password or a SCRAM-SHA-256 secret",
            )

    def pool(self, name: str, raw: Any, general: General) -> Pool:
        keypath = _key("pools", name)
        table = self.table(raw, keypath)
        values = self.section(
            table, keypath, Pool, POOL_SPEC, skip=("users", "shards", "plugins")
        )
        # Like PgCat, pools inherit the auth_query settings of [general].
        for key in ("auth_query", "auth_query_user", "auth_query_password",
                    "auth_query_pool_size"):
            if values.get(key) is None:
                values[key] = getattr(general, key)
        if values["auth_query"] is not None and (
            values["auth_query_user"] is None or values["auth_query_password"] is None
        ):
            self.fail(
                _key(keypath, "auth_query"),
                "requires auth_query_user and auth_query_password to be set",
            )
        auth_query = values["auth_query"] is not None

        plugins = None
        if "plugins" in table:
            plugins = self.plugins(table["plugins"], _key(keypath, "plugins"))

        users = self.users(table, keypath, auth_query)
        shards = self.shards(table, keypath)
        pool = Pool(name=name, users=users, shards=shards, plugins=plugins, **values)

        if pool.query_parser_read_write_splitting and not pool.query_parser_enabled:
            self.fail(
                _key(keypath, "query_parser_read_write_splitting"),
                "requires query_parser_enabled = true",
            )
        if _any_enabled(plugins) and not pool.query_parser_enabled:
            self.fail(_key(keypath, "plugins"), "requires query_parser_enabled = true")
        if pool.default_shard.startswith("shard_"):
            number = int(pool.default_shard[len("shard_"):])
            if number >= len(shards):
                self.fail(
                    _key(keypath, "default_shard"),
                    f"shard {number} does not exist (the pool has {len(shards)}"
                    f" shard(s), numbered from 0), got {_show(pool.default_shard)}",
                )
        return pool

    def users(self, table: dict, keypath: str, auth_query: bool) -> tuple[User, ...]:
        keypath = _key(keypath, "users")
        users_table = self.table(table.get("users"), keypath) if "users" in table else None
        if not users_table:
            self.fail(keypath, "is required" if users_table is None else "must not be empty")
        users = []
        seen: dict[str, str] = {}  # username -> user key
        for key, raw in users_table.items():
            user_path = _key(keypath, key)
            values = self.section(self.table(raw, user_path), user_path, User, USER_SPEC)
            user = User(key=key, **values)
            if user.username in seen:
                self.fail(
                    _key(user_path, "username"),
                    f"duplicate username {_show(user.username)}"
                    f" (also used by {_key(keypath, seen[user.username])})",
                )
            seen[user.username] = key
            self.secret(_key(user_path, "password"), user.password, user.auth_type)
            if user.server_password is not None and _scram.is_scram_secret(user.server_password):
                self.secret(_key(user_path, "server_password"), user.server_password, "md5")
            if user.password is None and user.auth_type != "trust" and not auth_query:
                self.fail(
                    _key(user_path, "password"),
                    'is required unless auth_type is "trust" or auth_query is configured',
                )
            if user.min_pool_size > user.pool_size:
                self.fail(
                    _key(user_path, "min_pool_size"),
                    f"must not exceed pool_size (min_pool_size {user.min_pool_size}"
                    f" > pool_size {user.pool_size})",
                )
            users.append(user)
        return tuple(users)

    def shards(self, table: dict, keypath: str) -> tuple[Shard, ...]:
        keypath = _key(keypath, "shards")
        shards_table = self.table(table.get("shards"), keypath) if "shards" in table else None
        if not shards_table:
            self.fail(keypath, "is required" if shards_table is None else "must not be empty")
        shards = {}
        for key, raw in shards_table.items():
            shard_path = _key(keypath, key)
            if not re.fullmatch(r"[0-9]+", key):
                self.fail(
                    shard_path,
                    f"shard key must be a non-negative integer, got {_show(key)}",
                )
            index = int(key)
            if index in shards:
                self.fail(shard_path, f"duplicate shard number {index}")
            shards[index] = self.shard(index, self.table(raw, shard_path), shard_path)
        return tuple(shards[i] for i in sorted(shards))

    def shard(self, index: int, table: dict, keypath: str) -> Shard:
        values = self.section(table, keypath, Shard, SHARD_SPEC, skip=("servers", "mirrors"))

        servers_path = _key(keypath, "servers")
        raw_servers = table.get("servers")
        if raw_servers is None:
            self.fail(servers_path, "is required")
        if not isinstance(raw_servers, list) or not raw_servers:
            self.fail(
                servers_path,
                f"must be a non-empty array of [host, port, role], got {_show(raw_servers)}",
            )
        servers = []
        seen = set()
        for i, raw in enumerate(raw_servers):
            item_path = _key(servers_path, i)
            host, port, role = self.triple(raw, item_path, "[host, port, role]")
            host = self.check(NON_EMPTY_STRING, host, _key(item_path, 0))
            port = self.check(PORT, port, _key(item_path, 1))
            role = self.check(ROLE, role, _key(item_path, 2))
            if (host, port) in seen:
                self.fail(item_path, f"duplicate server {host}:{port}")
            seen.add((host, port))
            servers.append(ServerAddress(host=host, port=port, role=role, index=i))
        if sum(s.role == "primary" for s in servers) > 1:
            self.fail(servers_path, "at most one server may have the primary role")

        mirrors_path = _key(keypath, "mirrors")
        raw_mirrors = table.get("mirrors", [])
        if not isinstance(raw_mirrors, list):
            self.fail(
                mirrors_path,
                f"must be an array of [host, port, server_index], got {_show(raw_mirrors)}",
            )
        mirrors = []
        for i, raw in enumerate(raw_mirrors):
            item_path = _key(mirrors_path, i)
            host, port, target = self.triple(raw, item_path, "[host, port, server_index]")
            host = self.check(NON_EMPTY_STRING, host, _key(item_path, 0))
            port = self.check(PORT, port, _key(item_path, 1))
            target = self.check(
                _integer(0, len(servers) - 1, f"a server index from 0 to {len(servers) - 1}"),
                target,
                _key(item_path, 2),
            )
            mirrors.append((host, port, target))

        return Shard(
            index=index,
            database=values["database"],
            servers=tuple(servers),
            mirrors=tuple(mirrors),
        )

    def triple(self, raw: Any, keypath: str, shape: str):
        if not isinstance(raw, list) or len(raw) != 3:
            self.fail(keypath, f"must be {shape}, got {_show(raw)}")
        return raw

    # -- plugins ------------------------------------------------------------

    def plugins(self, raw: Any, keypath: str) -> FrozenMap:
        table = self.table(raw, keypath)
        result = {}
        for name, raw_plugin in table.items():
            plugin_path = _key(keypath, name)
            spec = PLUGIN_SPECS.get(name)
            if spec is None:
                self.warn(plugin_path, "unknown key, ignored")
                continue
            plugin_table = self.table(raw_plugin, plugin_path)
            settings = {key: default for key, (_, default) in spec.items()}
            for key, value in plugin_table.items():
                if key not in spec:
                    self.warn(_key(plugin_path, key), "unknown key, ignored")
                elif name == "intercept" and key == "queries":
                    settings[key] = self.intercept_queries(value, _key(plugin_path, key))
                else:
                    settings[key] = self.check(spec[key][0], value, _key(plugin_path, key))
            result[name] = FrozenMap(settings)
        return FrozenMap(result)

    def intercept_queries(self, raw: Any, keypath: str) -> FrozenMap:
        queries = {}
        for key, raw_query in self.table(raw, keypath).items():
            query_path = _key(keypath, key)
            query = {"schema": (), "result": ()}
            for qkey, value in self.table(raw_query, query_path).items():
                if qkey not in INTERCEPT_QUERY_SPEC:
                    self.warn(_key(query_path, qkey), "unknown key, ignored")
                    continue
                query[qkey] = self.check(
                    INTERCEPT_QUERY_SPEC[qkey], value, _key(query_path, qkey)
                )
            if "query" not in query:
                self.fail(_key(query_path, "query"), "is required")
            queries[key] = FrozenMap(query)
        return FrozenMap(queries)


def _any_enabled(plugins: FrozenMap | None) -> bool:
    return plugins is not None and any(p["enabled"] for p in plugins.values())


# ---------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------


def from_dict(data: dict, path: str = STRING_PATH) -> tuple[Config, list[str]]:
    """Validate already-decoded TOML data (as returned by ``tomli.loads``)."""
    parser = _Parser(path)
    config = parser.config(parser.table(data, "(top level)"))
    return config, parser.warnings


def parse(text: str, path: str = STRING_PATH) -> tuple[Config, list[str]]:
    """Parse TOML text; ``path`` is only used in messages and ``Config.path``."""
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    return from_dict(data, path)


def load(path: str) -> tuple[Config, list[str]]:
    """Read and parse the config file at ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read config file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"invalid TOML: file is not UTF-8 ({e})") from None
    return parse(text, path)


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
        statement_timeout=user.statement_timeout,
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
