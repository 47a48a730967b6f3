"""Read pgcat.toml and validate it into a :class:`~pgcat_tw.config.model.Config`.

Pure Python (no Twisted): the file is read with ``tomli`` and checked
against the key specs (:mod:`pgcat_tw.config.specs`) by :class:`_Parser`.
Unknown keys are not errors (PgCat silently ignores them); they are
reported as warnings so a typo such as ``prepared_statement_cache_size``
does not go unnoticed; so are the keys this release accepts but does not
act on (:mod:`pgcat_tw.config.inactive`).  The first problem found raises
:class:`~pgcat_tw.config.model.ConfigError`.

    parse(text, path="<string>") -> (Config, warnings)
    load(path) -> (Config, warnings)
    from_dict(data, path="<string>") -> (Config, warnings)   # already-decoded TOML
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields
from typing import Any

import tomli

from pgcat_tw.auth import md5 as _md5
from pgcat_tw.auth import scram as _scram
from pgcat_tw.config import inactive
from pgcat_tw.router import functions
from pgcat_tw.config.model import (
    Config,
    ConfigError,
    FrozenMap,
    General,
    Pool,
    ServerAddress,
    Shard,
    User,
)
from pgcat_tw.config.specs import (
    GENERAL_SPEC,
    INTERCEPT_QUERY_SPEC,
    PLUGIN_SPECS,
    POOL_SPEC,
    SHARD_SPEC,
    TOP_LEVEL_KEYS,
    USER_SPEC,
    _SpecT,
)
from pgcat_tw.config.values import (
    NON_EMPTY_STRING,
    PORT,
    ROLE,
    STRING,
    _integer,
    _Invalid,
    _show,
)

__all__ = ["parse", "load", "from_dict"]

STRING_PATH = "<string>"


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

    def not_acted_on(self, keypath: str, table, values: dict, obj):
        """Warn for the keys of ``values`` this release does not act on
        (:mod:`pgcat_tw.config.inactive`)."""
        for key, problem in inactive.section_warnings(table, values, obj):
            self.warn(_key(keypath, key), problem)

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
        self.not_acted_on("general", inactive.GENERAL, values, general)
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
        self.not_acted_on(keypath, inactive.POOL, values, pool)

        if pool.query_parser_read_write_splitting and not pool.query_parser_enabled:
            self.fail(
                _key(keypath, "query_parser_read_write_splitting"),
                "requires query_parser_enabled = true",
            )
        if _any_enabled(plugins) and not pool.query_parser_enabled:
            self.fail(_key(keypath, "plugins"), "requires query_parser_enabled = true")
        self.router_settings(pool, keypath)
        if pool.default_shard.startswith("shard_"):
            number = int(pool.default_shard[len("shard_"):])
            if number >= len(shards):
                self.fail(
                    _key(keypath, "default_shard"),
                    f"shard {number} does not exist (the pool has {len(shards)}"
                    f" shard(s), numbered from 0), got {_show(pool.default_shard)}",
                )
        return pool

    def router_settings(self, pool: Pool, keypath: str):
        """What the router must be able to use: the comment-hint patterns
        (a capture group, usable on bytes) and the read-only function names."""
        for name in ("shard_id_regex", "sharding_key_regex"):
            pattern = getattr(pool, name)
            if pattern is None:
                continue
            try:
                rx = re.compile(pattern.encode())
            except re.error as e:
                self.fail(_key(keypath, name), f"not a usable regular expression: {e}")
            if rx.groups < 1:
                self.fail(_key(keypath, name),
                          "needs a capture group: group 1 is the shard id or key")
        try:
            functions.user_list(pool.query_parser_read_only_functions)
        except ValueError as e:
            self.fail(_key(keypath, "query_parser_read_only_functions"), str(e))

    def users(self, table: dict, keypath: str, auth_query: bool) -> tuple[User, ...]:
        keypath = _key(keypath, "users")
        users_table = self.table(table.get("users"), keypath) if "users" in table else None
        if not users_table:
            self.fail(keypath, "is required" if users_table is None else "must not be empty")
        users = [self.user(key, raw, _key(keypath, key), auth_query)
                 for key, raw in users_table.items()]
        return self.without_shadowed(users, keypath)

    def user(self, key: str, raw: Any, user_path: str, auth_query: bool) -> User:
        values = self.section(self.table(raw, user_path), user_path, User, USER_SPEC)
        user = User(key=key, **values)
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
        self.not_acted_on(user_path, inactive.USER, values, user)
        return user

    def without_shadowed(self, users: list[User], keypath: str) -> tuple[User, ...]:
        """One user per username. PgCat keeps its users in a map sorted by
        key and builds one pool per (pool, username), so of two users with
        the same username the one whose key sorts last is used; so here,
        with a warning for each user left out."""
        winner: dict[str, User] = {}
        for user in users:
            other = winner.get(user.username)
            if other is None or user.key > other.key:
                winner[user.username] = user
        for user in users:
            used = winner[user.username]
            if used is not user:
                self.warn(
                    _key(keypath, user.key, "username"),
                    f"duplicate username {_show(user.username)}, also"
                    f" {_key(keypath, used.key)}: that one is used, as in PgCat"
                    " (the key that sorts last), and this user is ignored",
                )
        return tuple(u for u in users if winner[u.username] is u)

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
        servers = self.servers(table.get("servers"), _key(keypath, "servers"))
        mirrors = self.mirrors(table.get("mirrors", []), _key(keypath, "mirrors"), len(servers))
        return Shard(
            index=index,
            database=values["database"],
            servers=servers,
            mirrors=mirrors,
        )

    def servers(self, raw_servers: Any, keypath: str) -> tuple[ServerAddress, ...]:
        """A shard's ``servers``: [host, port, role] rows, at most one
        primary. As in PgCat, a host:port listed twice in the same role is an
        error, and in two roles a warning (PgCat uses it in both)."""
        if raw_servers is None:
            self.fail(keypath, "is required")
        if not isinstance(raw_servers, list) or not raw_servers:
            self.fail(
                keypath,
                f"must be a non-empty array of [host, port, role], got {_show(raw_servers)}",
            )
        servers = []
        in_role: dict[tuple[str, int, str], int] = {}   # (host, port, role) -> index
        first: dict[tuple[str, int], ServerAddress] = {}
        for i, raw in enumerate(raw_servers):
            item_path = _key(keypath, i)
            host, port, role = self.triple(raw, item_path, "[host, port, role]")
            host = self.check(NON_EMPTY_STRING, host, _key(item_path, 0))
            port = self.check(PORT, port, _key(item_path, 1))
            role = self.check(ROLE, role, _key(item_path, 2))
            if (host, port, role) in in_role:
                self.fail(item_path, f"duplicate server {host}:{port} ({role}), also"
                          f" {_key(keypath, in_role[host, port, role])}")
            other = first.get((host, port))
            if other is not None:
                self.warn(item_path, f"{host}:{port} is also {_key(keypath, other.index)}"
                          f" ({other.role}); as in PgCat, it serves in both roles")
            address = ServerAddress(host=host, port=port, role=role, index=i)
            in_role[host, port, role] = i
            first.setdefault((host, port), address)
            servers.append(address)
        if sum(s.role == "primary" for s in servers) > 1:
            self.fail(keypath, "at most one server may have the primary role")
        return tuple(servers)

    def mirrors(
        self, raw_mirrors: Any, keypath: str, server_count: int
    ) -> tuple[tuple[str, int, int], ...]:
        """A shard's ``mirrors``: [host, port, server_index] rows, the index
        naming one of the shard's ``server_count`` servers."""
        if not isinstance(raw_mirrors, list):
            self.fail(
                keypath,
                f"must be an array of [host, port, server_index], got {_show(raw_mirrors)}",
            )
        mirrors = []
        for i, raw in enumerate(raw_mirrors):
            item_path = _key(keypath, i)
            host, port, target = self.triple(raw, item_path, "[host, port, server_index]")
            host = self.check(NON_EMPTY_STRING, host, _key(item_path, 0))
            port = self.check(PORT, port, _key(item_path, 1))
            target = self.check(
                _integer(0, server_count - 1, f"a server index from 0 to {server_count - 1}"),
                target,
                _key(item_path, 2),
            )
            mirrors.append((host, port, target))
        return tuple(mirrors)

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
