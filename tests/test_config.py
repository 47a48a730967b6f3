"""Tests for pgcat_tw.config (parsing and validating pgcat.toml)."""

import copy
import dataclasses
import glob
import os
import re
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw import config
from pgcat_tw.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
CONF_DIR = os.path.join(os.path.dirname(HERE), "conf")

MINIMAL_TOML = """\
[general]
admin_username = "admin"
admin_password = "secret"

[pools.app.users.0]
username = "alice"
password = "pw"
pool_size = 5

[pools.app.shards.0]
database = "db"
servers = [["127.0.0.1", 5432, "primary"]]
"""

BASE = {
    "general": {"admin_username": "admin", "admin_password": "secret"},
    "pools": {
        "app": {
            "users": {"0": {"username": "alice", "password": "pw", "pool_size": 5}},
            "shards": {
                "0": {"database": "db", "servers": [["127.0.0.1", 5432, "primary"]]}
            },
        }
    },
}


def base():
    """A fresh, valid config as decoded TOML."""
    return copy.deepcopy(BASE)


def pool(data, name="app"):
    return data["pools"][name]


def user(data, key="0"):
    return data["pools"]["app"]["users"][key]


def shard(data, key="0"):
    return data["pools"]["app"]["shards"][key]


NOT_ACTED_ON = "accepted but not acted on in this release"


class ConfFilesTests(SynchronousTestCase):
    def test_conf_files_load_without_warnings(self):
        """The examples load; only conf/pgcat.toml, which sets every key,
        warns, and only for the keys this release does not act on."""
        paths = sorted(glob.glob(os.path.join(CONF_DIR, "*.toml")))
        everything = os.path.join(CONF_DIR, "pgcat.toml")
        self.assertIn(everything, paths)
        self.assertIn(os.path.join(CONF_DIR, "pgcat.minimal.toml"), paths)
        for path in paths:
            cfg, warnings = config.load(path)
            self.assertEqual(cfg.path, path)
            if path != everything:
                self.assertEqual(warnings, [], path)
                continue
            self.assertEqual(
                sorted(w.split(": ")[1] for w in warnings),
                ["general.validate_config", "general.worker_threads"])
            for w in warnings:
                self.assertIn(NOT_ACTED_ON, w)

    def test_example_documents_every_key(self):
        with open(os.path.join(CONF_DIR, "pgcat.toml")) as f:
            text = f.read()
        specs = [
            config.GENERAL_SPEC,
            config.POOL_SPEC,
            config.USER_SPEC,
            config.SHARD_SPEC,
            {"servers": None, "mirrors": None},
        ]
        for spec in specs:
            for key in spec:
                self.assertTrue(
                    re.search(rf"^(# )?{key} = ", text, re.MULTILINE),
                    f"{key} missing from conf/pgcat.toml",
                )
        for name in config.PLUGIN_SPECS:
            self.assertIn(f"[plugins.{name}]", text)

    def test_example_values(self):
        cfg, _ = config.load(os.path.join(CONF_DIR, "pgcat.toml"))
        self.assertEqual((cfg.general.host, cfg.general.port), ("127.0.0.1", 6432))
        app = cfg.pool("app")
        self.assertEqual(
            app.shards[0].servers,
            (config.ServerAddress("127.0.0.1", 5432, "primary", 0),),
        )


class DefaultsTests(SynchronousTestCase):
    def setUp(self):
        self.cfg, self.warnings = config.parse(MINIMAL_TOML)

    def test_no_warnings(self):
        self.assertEqual(self.warnings, [])
        self.assertEqual(self.cfg.path, "<string>")

    def test_general_defaults(self):
        g = self.cfg.general
        expected = {
            "host": "0.0.0.0",
            "port": 5432,
            "enable_prometheus_exporter": False,
            "prometheus_exporter_port": 9930,
            "connect_timeout": 1000,
            "idle_timeout": 600000,
            "server_lifetime": 3600000,
            "idle_client_in_transaction_timeout": 0,
            "healthcheck_timeout": 1000,
            "healthcheck_delay": 30000,
            "shutdown_timeout": 60000,
            "ban_time": 60,
            "log_client_connections": False,
            "log_client_disconnections": False,
            "autoreload": None,
            "worker_threads": 4,
            "tcp_keepalives_idle": 5,
            "tcp_keepalives_count": 5,
            "tcp_keepalives_interval": 5,
            "tcp_user_timeout": 10000,
            "tls_certificate": None,
            "tls_private_key": None,
            "server_tls": False,
            "verify_server_certificate": False,
            "admin_auth_type": "md5",
            "validate_config": True,
            "server_round_robin": True,
            "dns_cache_enabled": False,
            "dns_max_ttl": 30,
            "auth_query": None,
            "max_packet_size": 1073741824,
            "healthcheck_interval": 5000,
            "ban_probe_interval": 1000,
        }
        self.assertEqual({k: getattr(g, k) for k in expected}, expected)

    def test_pool_defaults(self):
        p = self.cfg.pool("app")
        expected = {
            "pool_mode": "transaction",
            "load_balancing_mode": "random",
            "default_role": "any",
            "query_parser_enabled": False,
            "query_parser_max_length": None,
            "query_parser_read_write_splitting": False,
            "primary_reads_enabled": False,
            "connect_timeout": None,
            "idle_timeout": None,
            "server_lifetime": None,
            "checkout_failure_limit": None,
            "sharding_function": "pg_bigint_hash",
            "automatic_sharding_key": None,
            "sharding_key_regex": None,
            "shard_id_regex": None,
            "regex_search_limit": 1000,
            "default_shard": "shard_0",
            "auth_query": None,
            "cleanup_server_connections": True,
            "log_client_parameter_status_changes": False,
            "prepared_statements_cache_size": 0,
            "plugins": None,
            "max_replica_lag": None,
        }
        self.assertEqual({k: getattr(p, k) for k in expected}, expected)

    def test_user_and_shard(self):
        p = self.cfg.pool("app")
        self.assertEqual(
            p.users,
            (
                config.User(
                    key="0",
                    username="alice",
                    password="pw",
                    auth_type="md5",
                    server_username=None,
                    server_password=None,
                    pool_size=5,
                    min_pool_size=0,
                    pool_mode=None,
                    statement_timeout=0,
                    connect_timeout=None,
                    idle_timeout=None,
                    server_lifetime=None,
                ),
            ),
        )
        self.assertEqual(
            p.shards,
            (
                config.Shard(
                    index=0,
                    database="db",
                    servers=(config.ServerAddress("127.0.0.1", 5432, "primary", 0),),
                    mirrors=(),
                ),
            ),
        )

    def test_frozen_and_hashable(self):
        self.assertEqual(hash(self.cfg), hash(config.parse(MINIMAL_TOML)[0]))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            self.cfg.general.port = 1
        self.assertIsNone(self.cfg.pool("nope"))
        self.assertEqual(self.cfg.pool_names, ("app",))

    def test_zero_pools_allowed(self):
        data = base()
        del data["pools"]
        cfg, warnings = config.from_dict(data)
        self.assertEqual((cfg.pools, warnings), ((), []))


class ParsedValuesTests(SynchronousTestCase):
    def test_load_balancing_aliases(self):
        for value, expected in [
            ("random", "random"),
            ("loc", "loc"),
            ("LOC", "loc"),
            ("least_outstanding_connections", "loc"),
        ]:
            data = base()
            pool(data)["load_balancing_mode"] = value
            cfg, _ = config.from_dict(data)
            self.assertEqual(cfg.pool("app").load_balancing_mode, expected)

    def test_users_in_file_order_shards_sorted_numerically(self):
        data = base()
        users = pool(data)["users"]
        users["zed"] = {"username": "zed", "password": "p", "pool_size": 1}
        users["abc"] = {"username": "abc", "password": "p", "pool_size": 1}
        shards = pool(data)["shards"]
        for key in ("10", "2", "1"):
            shards[key] = {"database": f"db{key}", "servers": [["h", 1, "replica"]]}
        cfg, _ = config.from_dict(data)
        p = cfg.pool("app")
        self.assertEqual([u.key for u in p.users], ["0", "zed", "abc"])
        self.assertEqual([s.index for s in p.shards], [0, 1, 2, 10])
        self.assertEqual(p.shards[-1].database, "db10")

    def test_servers_and_mirrors(self):
        data = base()
        shard(data)["servers"] = [["a", 5432, "replica"], ["b", 5432, "primary"]]
        shard(data)["mirrors"] = [["m", 6000, 1]]
        s = config.from_dict(data)[0].pool("app").shards[0]
        self.assertEqual(
            s.servers,
            (
                config.ServerAddress("a", 5432, "replica", 0),
                config.ServerAddress("b", 5432, "primary", 1),
            ),
        )
        self.assertEqual(s.mirrors, (("m", 6000, 1),))

    def test_auth_query_inherited_from_general(self):
        data = base()
        data["general"].update(
            auth_query="SELECT 1", auth_query_user="u", auth_query_password="p"
        )
        del user(data)["password"]
        p = config.from_dict(data)[0].pool("app")
        self.assertEqual(
            (p.auth_query, p.auth_query_user, p.auth_query_password),
            ("SELECT 1", "u", "p"),
        )
        self.assertTrue(p.auth_query_configured)
        self.assertIsNone(p.users[0].password)

    def test_automatic_sharding_key_quotes_dropped(self):
        data = base()
        pool(data)["automatic_sharding_key"] = '"data"."id"'
        p = config.from_dict(data)[0].pool("app")
        self.assertEqual(p.automatic_sharding_key, "data.id")

    def test_plugins(self):
        data = base()
        data["plugins"] = {
            "query_logger": {"enabled": True},
            "table_access": {"tables": ["t"]},
        }
        pool(data)["query_parser_enabled"] = True
        cfg, warnings = config.from_dict(data)
        self.assertEqual(warnings, [])      # plugins are acted on
        plugins = cfg.plugins_for(cfg.pool("app"))
        self.assertIs(plugins, cfg.plugins)
        self.assertTrue(plugins["query_logger"]["enabled"])
        self.assertEqual(plugins["table_access"]["enabled"], False)
        self.assertEqual(plugins["table_access"]["tables"], ("t",))
        hash(cfg)

    def test_global_plugins_without_parser_warns(self):
        data = base()
        data["plugins"] = {"query_logger": {"enabled": True}}
        _, warnings = config.from_dict(data)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("pools.app:", warnings[0])
        self.assertIn("query_parser_enabled", warnings[0])


class ErrorTests(SynchronousTestCase):
    def assertConfigError(self, data, keypath, *fragments):
        """from_dict(data) fails naming keypath; returns the message."""
        with self.assertRaises(ConfigError) as cm:
            config.from_dict(data, "test.toml")
        e = cm.exception
        message = str(e)
        self.assertEqual(e.keypath, keypath, message)
        self.assertTrue(message.startswith(f"test.toml: {keypath}: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    # -- the documented format

    def test_example_message_exactly(self):
        text = MINIMAL_TOML.replace("pool_size = 5", 'pool_size = "ten"')
        with self.assertRaises(ConfigError) as cm:
            config.parse(text)
        self.assertEqual(
            str(cm.exception),
            '<string>: pools.app.users.0.pool_size: must be a positive integer,'
            ' got "ten"',
        )
        with self.assertRaises(ConfigError) as cm:
            config.parse(text, "/etc/pgcat.toml")
        self.assertTrue(str(cm.exception).startswith("/etc/pgcat.toml: pools.app."))

    def test_value_rendering(self):
        data = base()
        data["general"]["idle_timeout"] = -3
        self.assertTrue(self.assertConfigError(data, "general.idle_timeout").endswith("got -3"))
        data = base()
        data["general"]["connect_timeout"] = True
        self.assertTrue(
            self.assertConfigError(data, "general.connect_timeout").endswith("got true")
        )

    def test_quoted_pool_name_in_path(self):
        data = base()
        user(data)["pool_size"] = 0
        data["pools"]["my.db"] = data["pools"].pop("app")
        self.assertConfigError(data, 'pools."my.db".users.0.pool_size')

    # -- types

    def test_int_rejects_bool(self):
        data = base()
        data["general"]["port"] = True
        self.assertConfigError(data, "general.port", "got true")

    def test_int_rejects_string_and_float(self):
        for value in ("1000", 1000.0):
            data = base()
            data["general"]["connect_timeout"] = value
            self.assertConfigError(data, "general.connect_timeout", "integer")

    def test_bool_type(self):
        data = base()
        data["general"]["server_tls"] = 1
        self.assertConfigError(data, "general.server_tls", "boolean", "got 1")
        data = base()
        pool(data)["primary_reads_enabled"] = "yes"
        self.assertConfigError(data, "pools.app.primary_reads_enabled", 'got "yes"')

    def test_string_type(self):
        data = base()
        data["general"]["host"] = 5
        self.assertConfigError(data, "general.host", "string")
        data = base()
        user(data)["password"] = 1234
        self.assertConfigError(data, "pools.app.users.0.password", "string")

    def test_port_range(self):
        for value in (0, 65536, -1):
            data = base()
            data["general"]["port"] = value
            self.assertConfigError(data, "general.port", "1-65535")
        data = base()
        data["general"]["port"] = 65535
        config.from_dict(data)

    def test_prometheus_port_is_i16(self):
        data = base()
        data["general"]["prometheus_exporter_port"] = 32768
        self.assertConfigError(data, "general.prometheus_exporter_port", "32767")
        data["general"]["prometheus_exporter_port"] = 32767
        config.from_dict(data)

    def test_replica_settings(self):
        for key in ("healthcheck_interval", "ban_probe_interval"):
            data = base()
            data["general"][key] = -1
            self.assertConfigError(data, f"general.{key}", "non-negative", "got -1")
            data["general"][key] = 0  # 0 turns it off
            config.from_dict(data)
        data = base()
        pool(data)["max_replica_lag"] = "16MB"
        self.assertConfigError(data, "pools.app.max_replica_lag", "non-negative", '"16MB"')
        pool(data)["max_replica_lag"] = 16777216
        cfg, _ = config.from_dict(data)
        self.assertEqual(cfg.pool("app").max_replica_lag, 16777216)

    def test_replicas_example(self):
        cfg, warnings = config.load(os.path.join(CONF_DIR, "pgcat.replicas.toml"))
        self.assertEqual(warnings, [])
        app = cfg.pool("app")
        self.assertEqual([s.role for s in app.shards[0].servers],
                         ["primary", "replica", "replica"])
        self.assertEqual(app.default_role, "replica")

    def test_timeouts_non_negative(self):
        for key in ("connect_timeout", "idle_timeout", "server_lifetime", "ban_time"):
            data = base()
            data["general"][key] = -1
            self.assertConfigError(data, f"general.{key}", "non-negative", "got -1")
        data = base()
        pool(data)["idle_timeout"] = -5
        self.assertConfigError(data, "pools.app.idle_timeout", "non-negative")
        data = base()
        user(data)["statement_timeout"] = -5
        self.assertConfigError(data, "pools.app.users.0.statement_timeout")
        data = base()
        data["general"]["idle_timeout"] = 0
        config.from_dict(data)

    def test_pool_size_positive(self):
        data = base()
        user(data)["pool_size"] = 0
        self.assertConfigError(data, "pools.app.users.0.pool_size", "positive", "got 0")

    def test_min_pool_size_not_above_pool_size(self):
        data = base()
        user(data)["min_pool_size"] = 6
        self.assertConfigError(
            data, "pools.app.users.0.min_pool_size", "min_pool_size 6", "pool_size 5"
        )
        user(data)["min_pool_size"] = 5
        config.from_dict(data)

    def test_max_packet_size_minimum(self):
        data = base()
        data["general"]["max_packet_size"] = 1023
        self.assertConfigError(data, "general.max_packet_size", "1024")

    def test_enums_list_allowed_values(self):
        cases = [
            ("general", "admin_auth_type", "password", ['"md5"', '"trust"']),
            ("pool", "pool_mode", "statement", ['"transaction", "session"']),
            ("pool", "load_balancing_mode", "rr", ['"random", "loc"']),
            ("pool", "default_role", "master", ['"any", "primary", "replica"']),
            ("pool", "sharding_function", "md5", ['"pg_bigint_hash", "sha1"']),
            ("user", "auth_type", "plain", ['"md5", "scram-sha-256", "trust"']),
            ("user", "pool_mode", "stmt", ['"transaction", "session"']),
        ]
        for where, key, value, fragments in cases:
            data = base()
            table = {"general": data["general"], "pool": pool(data), "user": user(data)}[where]
            table[key] = value
            path = {"general": "general", "pool": "pools.app", "user": "pools.app.users.0"}
            self.assertConfigError(
                data, f"{path[where]}.{key}", f'got "{value}"', *fragments
            )

    # -- required keys and tables

    def test_admin_credentials_required(self):
        for key in ("admin_username", "admin_password"):
            data = base()
            del data["general"][key]
            self.assertEqual(
                self.assertConfigError(data, f"general.{key}"),
                f"test.toml: general.{key}: is required",
            )

    def test_general_required(self):
        data = base()
        del data["general"]
        self.assertConfigError(data, "general", "is required")
        data["general"] = "x"
        self.assertConfigError(data, "general", "must be a table")

    def test_pools_must_be_tables(self):
        data = base()
        data["pools"] = 3
        self.assertConfigError(data, "pools", "table")
        data["pools"] = {"app": [1]}
        self.assertConfigError(data, "pools.app", "table")

    def test_users_and_shards_required_and_non_empty(self):
        for section in ("users", "shards"):
            data = base()
            del pool(data)[section]
            self.assertConfigError(data, f"pools.app.{section}", "is required")
            pool(data)[section] = {}
            self.assertConfigError(data, f"pools.app.{section}", "must not be empty")

    def test_username_required(self):
        data = base()
        del user(data)["username"]
        self.assertConfigError(data, "pools.app.users.0.username", "is required")

    def test_pool_size_required(self):
        data = base()
        del user(data)["pool_size"]
        self.assertConfigError(data, "pools.app.users.0.pool_size", "is required")

    def test_password_required_without_trust_or_auth_query(self):
        data = base()
        del user(data)["password"]
        self.assertConfigError(data, "pools.app.users.0.password", "is required")
        user(data)["auth_type"] = "trust"
        config.from_dict(data)
        user(data)["auth_type"] = "scram-sha-256"
        pool(data).update(auth_query="SELECT 1", auth_query_user="u", auth_query_password="p")
        config.from_dict(data)

    def test_auth_query_needs_user_and_password(self):
        data = base()
        data["general"].update(auth_query="SELECT 1", auth_query_user="u")
        self.assertConfigError(data, "general.auth_query", "auth_query_password")
        data = base()
        pool(data).update(auth_query="SELECT 1", auth_query_password="p")
        self.assertConfigError(data, "pools.app.auth_query", "auth_query_user")
        # A pool may take the user and password from [general].
        data["general"].update(auth_query_user="u")
        config.from_dict(data)

    # -- shards and servers

    def test_shard_key_must_be_integer(self):
        for key in ("a", "-1", "1.5"):
            data = base()
            pool(data)["shards"][key] = shard(data)
            keypath = 'pools.app.shards."1.5"' if key == "1.5" else f"pools.app.shards.{key}"
            self.assertConfigError(data, keypath, "non-negative integer")

    def test_duplicate_shard_number(self):
        data = base()
        pool(data)["shards"]["00"] = shard(data)
        self.assertConfigError(data, "pools.app.shards.00", "duplicate")

    def test_database_required(self):
        data = base()
        del shard(data)["database"]
        self.assertConfigError(data, "pools.app.shards.0.database", "is required")
        shard(data)["database"] = 1
        self.assertConfigError(data, "pools.app.shards.0.database", "string")

    def test_servers_required_non_empty(self):
        data = base()
        del shard(data)["servers"]
        self.assertConfigError(data, "pools.app.shards.0.servers", "is required")
        shard(data)["servers"] = []
        self.assertConfigError(data, "pools.app.shards.0.servers", "non-empty")
        shard(data)["servers"] = "127.0.0.1:5432"
        self.assertConfigError(data, "pools.app.shards.0.servers")

    def test_server_entries(self):
        cases = [
            (["h", 5432], "pools.app.shards.0.servers.0", "[host, port, role]"),
            (["h", 5432, "primary", 1], "pools.app.shards.0.servers.0", "[host, port, role]"),
            ([1, 5432, "primary"], "pools.app.shards.0.servers.0.0", "string"),
            (["h", "5432", "primary"], "pools.app.shards.0.servers.0.1", "port"),
            (["h", 0, "primary"], "pools.app.shards.0.servers.0.1", "port"),
            (["h", 5432, "master"], "pools.app.shards.0.servers.0.2", '"primary", "replica"'),
        ]
        for server, keypath, fragment in cases:
            data = base()
            shard(data)["servers"] = [server]
            self.assertConfigError(data, keypath, fragment)

    def test_at_most_one_primary(self):
        data = base()
        shard(data)["servers"] = [["a", 1, "primary"], ["b", 1, "primary"]]
        self.assertConfigError(data, "pools.app.shards.0.servers", "primary")

    def test_no_duplicate_servers(self):
        """As in PgCat, a server listed twice in the same role is an error;
        in two roles (PgCat's docker example) it is a warning."""
        data = base()
        shard(data)["servers"] = [["a", 1, "primary"], ["a", 1, "replica"],
                                  ["a", 1, "replica"]]
        self.assertConfigError(data, "pools.app.shards.0.servers.2", "duplicate", "a:1",
                               "(replica)", "pools.app.shards.0.servers.1")
        shard(data)["servers"] = [["a", 1, "primary"], ["a", 2, "replica"]]
        self.assertEqual(config.from_dict(data)[1], [])
        shard(data)["servers"] = [["a", 1, "primary"], ["a", 1, "replica"]]
        cfg, warnings = config.from_dict(data, "t.toml")
        self.assertEqual(warnings, [
            "t.toml: pools.app.shards.0.servers.1: a:1 is also pools.app.shards.0.servers.0"
            " (primary); as in PgCat, it serves in both roles"])
        self.assertEqual([s.role for s in cfg.pool("app").shards[0].servers],
                         ["primary", "replica"])

    def test_mirror_index_in_range(self):
        data = base()
        shard(data)["mirrors"] = [["m", 1, 1]]
        self.assertConfigError(data, "pools.app.shards.0.mirrors.0.2", "server index")
        shard(data)["mirrors"] = [["m", 1]]
        self.assertConfigError(data, "pools.app.shards.0.mirrors.0", "server_index")

    # -- pool rules

    def test_read_write_splitting_needs_parser(self):
        data = base()
        pool(data)["query_parser_read_write_splitting"] = True
        self.assertConfigError(
            data, "pools.app.query_parser_read_write_splitting", "query_parser_enabled"
        )
        pool(data)["query_parser_enabled"] = True
        config.from_dict(data)

    def test_pool_plugins_need_parser(self):
        data = base()
        pool(data)["plugins"] = {"query_logger": {"enabled": True}}
        self.assertConfigError(data, "pools.app.plugins", "query_parser_enabled")
        pool(data)["query_parser_enabled"] = True
        config.from_dict(data)

    def test_plugin_enabled_must_be_bool(self):
        data = base()
        data["plugins"] = {"prewarmer": {"enabled": "yes"}}
        self.assertConfigError(data, "plugins.prewarmer.enabled", "boolean")
        data = base()
        data["plugins"] = {"table_access": {"tables": "t"}}
        self.assertConfigError(data, "plugins.table_access.tables", "array of strings")

    def test_intercept_query_shape(self):
        data = base()
        data["plugins"] = {"intercept": {"queries": {"0": {"schema": [["a", "text"]]}}}}
        self.assertConfigError(data, "plugins.intercept.queries.0.query", "is required")
        data["plugins"]["intercept"]["queries"]["0"] = {"query": "q", "schema": [["a"]]}
        self.assertConfigError(data, "plugins.intercept.queries.0.schema")

    def test_default_shard(self):
        for value in ("shard_1", "shard_x", "bogus", "fail", 0):
            data = base()
            pool(data)["default_shard"] = value
            self.assertConfigError(data, "pools.app.default_shard")
        for value in ("shard_0", "random", "random_healthy"):
            data = base()
            pool(data)["default_shard"] = value
            config.from_dict(data)
        data = base()
        pool(data)["shards"]["1"] = {"database": "d", "servers": [["h", 1, "primary"]]}
        pool(data)["default_shard"] = "shard_1"
        config.from_dict(data)

    def test_regexes_must_compile(self):
        for key in ("sharding_key_regex", "shard_id_regex"):
            data = base()
            pool(data)[key] = "/* sharding_key: (\\d+ */"
            self.assertConfigError(data, f"pools.app.{key}", "regular expression")
            pool(data)[key] = "/\\* sharding_key: (\\d+) \\*/"
            config.from_dict(data)

    def test_automatic_sharding_key_one_dot(self):
        for value in ("id", "a.b.c", ".id", 5):
            data = base()
            pool(data)["automatic_sharding_key"] = value
            self.assertConfigError(data, "pools.app.automatic_sharding_key")
        data = base()
        pool(data)["automatic_sharding_key"] = "*.id"
        config.from_dict(data)

    def test_tls_cert_and_key_together(self):
        data = base()
        data["general"]["tls_certificate"] = "/no/such/cert.pem"
        self.assertConfigError(data, "general.tls_certificate", "tls_private_key")
        data = base()
        data["general"]["tls_private_key"] = "/no/such/key.pem"
        self.assertConfigError(data, "general.tls_private_key", "tls_certificate")
        # The files are not checked here (the TLS module does that).
        data["general"]["tls_certificate"] = "/no/such/cert.pem"
        config.from_dict(data)

    def test_duplicate_username_is_checked_like_the_others(self):
        data = base()
        pool(data)["users"]["1"] = {"username": "alice", "password": "x", "pool_size": 0}
        self.assertConfigError(data, "pools.app.users.1.pool_size", "positive integer")


class WarningTests(SynchronousTestCase):
    def test_unknown_keys_warn_at_every_level(self):
        data = base()
        data["typo_top"] = 1
        data["general"]["prepared_statements"] = True
        pool(data)["pool_mod"] = "session"
        user(data)["pasword"] = "x"
        shard(data)["replicas"] = []
        data["plugins"] = {"query_loger": {"enabled": True}, "prewarmer": {"querys": []}}
        pool(data)["plugins"] = {"table_access": {"enabld": False}}
        cfg, warnings = config.from_dict(data, "w.toml")
        self.assertEqual(
            sorted(warnings),
            sorted(
                f"w.toml: {key}: unknown key, ignored"
                for key in [
                    "typo_top",
                    "general.prepared_statements",
                    "pools.app.pool_mod",
                    "pools.app.users.0.pasword",
                    "pools.app.shards.0.replicas",
                    "plugins.query_loger",
                    "plugins.prewarmer.querys",
                    "pools.app.plugins.table_access.enabld",
                ]
            ),
        )
        self.assertEqual(cfg.pool("app").pool_mode, "transaction")

    def test_duplicate_usernames(self):
        """PgCat keeps the user whose key sorts last (its users are a map
        sorted by key, its pools one per username); so does pgcat_tw, with a
        warning naming both."""
        data = base()
        pool(data)["users"]["1"] = {"username": "alice", "password": "x", "pool_size": 1}
        pool(data)["users"]["2"] = {"username": "bob", "password": "y", "pool_size": 2}
        cfg, warnings = config.from_dict(data, "t.toml")
        self.assertEqual(warnings, [
            't.toml: pools.app.users.0.username: duplicate username "alice", also'
            " pools.app.users.1: that one is used, as in PgCat (the key that sorts"
            " last), and this user is ignored"])
        users = cfg.pool("app").users
        self.assertEqual([(u.key, u.username, u.pool_size) for u in users],
                         [("1", "alice", 1), ("2", "bob", 2)])
        # String order, as PgCat's map: "10" sorts before "9".
        data = base()
        pool(data)["users"] = {
            "9": {"username": "alice", "password": "a", "pool_size": 9},
            "10": {"username": "alice", "password": "b", "pool_size": 10}}
        cfg, warnings = config.from_dict(data)
        self.assertEqual([u.key for u in cfg.pool("app").users], ["9"])
        self.assertIn("pools.app.users.10.username", warnings[0])

    def test_top_level_path_key_accepted(self):
        cfg, warnings = config.parse('path = "elsewhere.toml"\n' + MINIMAL_TOML, "real.toml")
        self.assertEqual((cfg.path, warnings), ("real.toml", []))


class LoadTests(SynchronousTestCase):
    def write(self, content):
        fd, path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        self.addCleanup(os.remove, path)
        return path

    def test_load(self):
        path = self.write(MINIMAL_TOML.encode())
        cfg, warnings = config.load(path)
        self.assertEqual((cfg.path, warnings), (path, []))

    def test_missing_file(self):
        path = os.path.join(tempfile.gettempdir(), "pgcat_tw-no-such-file.toml")
        with self.assertRaises(ConfigError) as cm:
            config.load(path)
        self.assertTrue(str(cm.exception).startswith(f"{path}: "))
        self.assertIn("No such file", str(cm.exception))

    def test_directory_is_unreadable(self):
        with self.assertRaises(ConfigError) as cm:
            config.load(tempfile.gettempdir())
        self.assertTrue(str(cm.exception).startswith(f"{tempfile.gettempdir()}: "))

    def test_toml_syntax_error(self):
        path = self.write(b"[general\nadmin_username = 1\n")
        with self.assertRaises(ConfigError) as cm:
            config.load(path)
        message = str(cm.exception)
        self.assertTrue(message.startswith(f"{path}: invalid TOML: "), message)
        self.assertIn("line 1", message)

    def test_toml_syntax_error_from_parse(self):
        with self.assertRaises(ConfigError) as cm:
            config.parse("a = [", "x.toml")
        self.assertTrue(str(cm.exception).startswith("x.toml: invalid TOML: "))

    def test_not_utf8(self):
        path = self.write(b'[general]\nadmin_username = "\xff"\n')
        with self.assertRaises(ConfigError) as cm:
            config.load(path)
        self.assertTrue(str(cm.exception).startswith(f"{path}: "))


class ResolveTests(SynchronousTestCase):
    def settings(self, data, key="0"):
        cfg, _ = config.from_dict(data)
        p = cfg.pool("app")
        return config.resolve(cfg, p, next(u for u in p.users if u.key == key))

    def test_general_only(self):
        data = base()
        data["general"].update(connect_timeout=11, idle_timeout=12, server_lifetime=13)
        self.assertEqual(
            self.settings(data),
            config.UserSettings(
                pool_mode="transaction",
                connect_timeout=11,
                idle_timeout=12,
                server_lifetime=13,
                statement_timeout=0,
                pool_size=5,
                min_pool_size=0,
            ),
        )

    def test_user_over_pool_over_general(self):
        data = base()
        data["general"].update(connect_timeout=11, idle_timeout=12, server_lifetime=13)
        pool(data).update(
            pool_mode="session", connect_timeout=21, idle_timeout=22, server_lifetime=23
        )
        user(data).update(connect_timeout=31, statement_timeout=7, min_pool_size=2)
        pool(data)["users"]["1"] = {
            "username": "bob",
            "password": "p",
            "pool_size": 3,
            "pool_mode": "transaction",
            "idle_timeout": 0,
        }
        alice = self.settings(data, "0")
        self.assertEqual(
            (alice.pool_mode, alice.connect_timeout, alice.idle_timeout, alice.server_lifetime),
            ("session", 31, 22, 23),
        )
        self.assertEqual((alice.statement_timeout, alice.min_pool_size), (7, 2))
        bob = self.settings(data, "1")
        self.assertEqual(
            (bob.pool_mode, bob.connect_timeout, bob.idle_timeout, bob.pool_size),
            ("transaction", 21, 0, 3),
        )


class DiffTests(SynchronousTestCase):
    def test_no_change(self):
        a, _ = config.from_dict(base())
        b, _ = config.from_dict(base())
        d = config.diff(a, b)
        self.assertEqual(d, config.ConfigDiff())
        self.assertFalse(d.changed)

    def test_changes(self):
        old_data = base()
        old_data["pools"]["gone"] = copy.deepcopy(pool(old_data))
        old_data["pools"]["same"] = copy.deepcopy(pool(old_data))
        new_data = copy.deepcopy(old_data)
        del new_data["pools"]["gone"]
        new_data["pools"]["fresh"] = copy.deepcopy(pool(new_data))
        user(new_data)["pool_size"] = 50
        new_data["general"].update(ban_time=5, port=7000)
        new_data["plugins"] = {"query_logger": {"enabled": False}}
        old, _ = config.from_dict(old_data)
        new, _ = config.from_dict(new_data)
        d = config.diff(old, new)
        self.assertEqual(d.general_changed, ("port", "ban_time"))
        self.assertEqual(d.pools_added, ("fresh",))
        self.assertEqual(d.pools_removed, ("gone",))
        self.assertEqual(d.pools_changed, ("app",))
        self.assertTrue(d.plugins_changed)
        self.assertTrue(d.changed)


class AuthAndTLSSettingsTests(SynchronousTestCase):
    """pgcat_tw's TLS and authentication keys (issue 3)."""

    SCRAM = ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$"
             + "A" * 43 + "=:" + "B" * 43 + "=")

    def error(self, data):
        try:
            config.from_dict(data, "t.toml")
        except ConfigError as e:
            return str(e)
        self.fail("no ConfigError")

    def test_defaults(self):
        cfg, _ = config.parse(MINIMAL_TOML)
        g = cfg.general
        self.assertEqual(
            (g.tls_require, g.tls_ca_file, g.verify_client_certificate, g.server_tls_ca_file,
             g.auth_query_pool_size, cfg.pool("app").auth_query_pool_size),
            (False, None, False, None, 10, 10))

    def test_values(self):
        data = base()
        data["general"].update(tls_certificate="c.pem", tls_private_key="k.pem",
                               tls_require=True, verify_client_certificate=True,
                               tls_ca_file="ca.pem", server_tls=True,
                               verify_server_certificate=True, server_tls_ca_file="sca.pem",
                               auth_query_pool_size=7)
        cfg, warnings = config.from_dict(data)
        self.assertEqual(warnings, [])
        g = cfg.general
        self.assertEqual((g.tls_require, g.tls_ca_file, g.server_tls_ca_file),
                         (True, "ca.pem", "sca.pem"))
        self.assertEqual(cfg.pool("app").auth_query_pool_size, 7)   # inherited
        pool(data)["auth_query_pool_size"] = 2
        cfg, _ = config.from_dict(data)
        self.assertEqual(cfg.pool("app").auth_query_pool_size, 2)

    def test_types(self):
        for key, value, fragment in [("tls_require", "yes", "boolean"),
                                     ("verify_client_certificate", 1, "boolean"),
                                     ("tls_ca_file", "", "non-empty string"),
                                     ("server_tls_ca_file", 3, "non-empty string"),
                                     ("auth_query_pool_size", 0, "positive integer")]:
            data = base()
            data["general"][key] = value
            self.assertIn(f"t.toml: general.{key}: must be a {fragment}", self.error(data))

    def test_tls_require_needs_certificate(self):
        data = base()
        data["general"]["tls_require"] = True
        self.assertIn("general.tls_require: requires tls_certificate", self.error(data))

    def test_client_certificates_need_ca_and_certificate(self):
        data = base()
        data["general"]["verify_client_certificate"] = True
        self.assertIn("general.verify_client_certificate: requires tls_certificate",
                      self.error(data))
        data["general"].update(tls_certificate="c.pem", tls_private_key="k.pem")
        self.assertIn("general.verify_client_certificate: requires tls_ca_file",
                      self.error(data))

    def test_settings_without_effect_warn(self):
        data = base()
        data["general"].update(tls_ca_file="ca.pem", verify_server_certificate=True,
                               server_tls_ca_file="sca.pem")
        _, warnings = config.from_dict(data, "t.toml")
        self.assertEqual(sorted(warnings), [
            "t.toml: general.tls_ca_file: has no effect unless "
            "verify_client_certificate = true",
            "t.toml: general.verify_server_certificate: has no effect unless server_tls = true",
        ])
        data["general"]["verify_server_certificate"] = False
        _, warnings = config.from_dict(data, "t.toml")
        self.assertIn("t.toml: general.server_tls_ca_file: has no effect unless "
                      "verify_server_certificate = true", warnings)

    def test_stored_secrets(self):
        md5 = "md5" + "0123456789abcdef" * 2
        for auth_type in ("md5", "scram-sha-256"):
            data = base()
            user(data).update(password=self.SCRAM, auth_type=auth_type)
            config.from_dict(data)
        data = base()
        user(data).update(password=md5)
        config.from_dict(data)
        user(data)["auth_type"] = "scram-sha-256"
        self.assertIn('pools.app.users.0.password: is an md5 secret, which cannot be used '
                      'with auth_type "scram-sha-256"', self.error(data))

    def test_malformed_scram_secret(self):
        data = base()
        user(data)["password"] = "SCRAM-SHA-256$4096:nope"
        self.assertIn("pools.app.users.0.password: not a valid SCRAM-SHA-256 secret",
                      self.error(data))
        data = base()
        user(data)["server_password"] = "SCRAM-SHA-256$"
        self.assertIn("pools.app.users.0.server_password: not a valid", self.error(data))

    def test_admin_secret(self):
        data = base()
        data["general"].update(admin_password="md5" + "ab" * 16,
                               admin_auth_type="scram-sha-256")
        self.assertIn("general.admin_password: is an md5 secret", self.error(data))
        data["general"]["admin_password"] = self.SCRAM
        config.from_dict(data)

    def test_tls_example_file(self):
        cfg, warnings = config.load(os.path.join(CONF_DIR, "pgcat.tls.toml"))
        self.assertEqual(warnings, [])
        self.assertTrue(cfg.general.tls_require)
        self.assertEqual(cfg.pool("app").users[0].auth_type, "scram-sha-256")
