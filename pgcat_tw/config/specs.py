"""The key tables of pgcat.toml: which keys each table has, and their checkers.

Validation is table driven: each dataclass of :mod:`pgcat_tw.config.model`
has a spec mapping its TOML keys to small checker functions
(:mod:`pgcat_tw.config.values`), and the dataclass field defaults are the
config defaults.  Every key PgCat knows is listed, plus a few pgcat_tw
extensions; keys in no spec are reported as warnings by the parser.  At
import, the specs are checked against the dataclass fields so the two
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

from pgcat_tw.config.model import FrozenMap, General, Pool, User
from pgcat_tw.config.values import (
    AUTH_TYPE,
    AUTORELOAD,
    BOOL,
    DEFAULT_SHARD,
    NON_EMPTY_STRING,
    NON_NEGATIVE,
    POOL_MODE,
    PORT,
    POSITIVE,
    REGEX,
    SHARDING_KEY,
    STRING,
    STRING_LIST,
    _choice,
    _integer,
    _string_rows,
)

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
    "autoreload": AUTORELOAD,
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
    "max_client_conn": NON_NEGATIVE,
    "max_db_client_connections": NON_NEGATIVE,
    "max_user_client_connections": NON_NEGATIVE,
    "server_login_limit": POSITIVE,
    "query_wait_timeout": NON_NEGATIVE,
    "query_wait_notify": NON_NEGATIVE,
    "transaction_timeout": NON_NEGATIVE,
    "client_idle_timeout": NON_NEGATIVE,
    "statement_timeout": NON_NEGATIVE,
    "unix_socket_dir": NON_EMPTY_STRING,
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
    "query_parser_read_only_functions": STRING_LIST,
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
    "max_db_client_connections": NON_NEGATIVE,
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
    "max_user_client_connections": NON_NEGATIVE,
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
