"""Every configuration file of PgCat's repository loads (issue 16, item 1).

The files under ``tests/pgcat_configs/`` are PgCat's own (see the README
there: path and commit of each). Each one loads with
``pgcat_tw.config.load``, with the values a PgCat user expects and a warning
for every key this release accepts but does not act on; PgCat's CI file,
whose TLS key is a PKCS#8 body under a ``BEGIN RSA PRIVATE KEY`` header,
passes the start-up check (``pgcat_tw.tap``: the certificates and keys are
loaded by pyOpenSSL, which serves them). No PostgreSQL or client library:
``tests/test_pypy.py`` runs this module on PyPy too.
"""

import datetime
import io
import json
import os
import shutil
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw import config, tap, tls
from pgcat_tw.config import ConfigError, ServerAddress, resolve
from tests.test_config import base, pool, shard, user

HERE = os.path.dirname(os.path.abspath(__file__))
PGCAT_CONFIGS = os.path.join(HERE, "pgcat_configs")
NOT_ACTED_ON = "accepted but not acted on in this release"

# The router acts on the query parser's, sharding's and comment hints' keys:
# PgCat's files no longer warn about them.


def path_of(name):
    return os.path.join(PGCAT_CONFIGS, name)


def keypaths(warnings):
    """The key path of each warning ("file: keypath: problem")."""
    return sorted(w.split(": ")[1] for w in warnings)


def servers(*rows):
    return tuple(ServerAddress(host, port, role, i) for i, (host, port, role) in enumerate(rows))


LOCAL_PAIR = servers(("127.0.0.1", 5432, "primary"), ("localhost", 5432, "replica"))
DOCKER_PAIR = servers(("postgres", 5432, "primary"), ("postgres", 5432, "replica"))


# The files under tests/pgcat_configs/, each loaded by one test below.
FILES = ("circleci.pgcat.toml", "config_md.bae12fc.toml", "examples.docker.pgcat.001fe7e.toml",
         "examples.docker.pgcat.toml", "pgcat.001fe7e.toml", "pgcat.toml")


class FilesTests(SynchronousTestCase):
    def test_every_file_is_tested(self):
        names = sorted(n for n in os.listdir(PGCAT_CONFIGS) if n.endswith(".toml"))
        self.assertEqual(tuple(names), FILES)

    def load(self, name):
        path = path_of(name)
        cfg, warnings = config.load(path)
        self.assertEqual(cfg.path, path)
        for w in warnings:
            self.assertTrue(w.startswith(f"{path}: "), w)
        return cfg, warnings

    def assert_sample_pools(self, cfg, sizes, timeouts):
        """PgCat's sample pools: sharded_db (3 shards, transaction mode) and
        simple_db (session mode, primary by default)."""
        self.assertEqual(cfg.pool_names, ("sharded_db", "simple_db"))
        sharded, simple = cfg.pool("sharded_db"), cfg.pool("simple_db")
        self.assertEqual((sharded.pool_mode, sharded.default_role, sharded.primary_reads_enabled,
                          sharded.query_parser_enabled, sharded.sharding_function),
                         ("transaction", "any", True, True, "pg_bigint_hash"))
        self.assertEqual([(s.index, s.database, s.servers) for s in sharded.shards],
                         [(0, "shard0", LOCAL_PAIR), (1, "shard1", LOCAL_PAIR),
                          (2, "shard2", LOCAL_PAIR)])
        self.assertEqual([(u.username, u.password, u.pool_size, u.statement_timeout)
                          for u in sharded.users + simple.users], [
            ("sharding_user", "sharding_user", sizes[0], timeouts[0]),
            ("other_user", "other_user", sizes[1], timeouts[1]),
            ("simple_user", "simple_user", sizes[2], timeouts[2])])
        self.assertEqual((simple.pool_mode, simple.default_role), ("session", "primary"))
        self.assertEqual([(s.database, s.servers) for s in simple.shards],
                         [("some_db", LOCAL_PAIR)])

    def test_pgcat(self):
        cfg, warnings = self.load("pgcat.toml")
        g = cfg.general
        self.assertEqual(
            (g.host, g.port, g.enable_prometheus_exporter, g.prometheus_exporter_port,
             g.connect_timeout, g.idle_timeout, g.healthcheck_timeout, g.healthcheck_delay,
             g.shutdown_timeout, g.ban_time, g.autoreload, g.worker_threads,
             g.admin_username, g.admin_password, g.tls_certificate),
            ("0.0.0.0", 6432, True, 9930, 5000, 30000, 1000, 30000, 60000, 60, 15000, 5,
             "admin_user", "admin_pass", None))
        self.assert_sample_pools(cfg, (9, 21, 5), (0, 15000, 0))
        sharded = cfg.pool("sharded_db")
        self.assertEqual((sharded.load_balancing_mode, sharded.idle_timeout,
                          sharded.connect_timeout), ("random", 40000, 3000))
        # user > pool > general, as in PgCat
        self.assertEqual(resolve(cfg, sharded, sharded.users[0]).connect_timeout, 3000)
        simple = cfg.pool("simple_db")
        self.assertEqual(resolve(cfg, simple, simple.users[0]).connect_timeout, 5000)
        self.assertEqual(keypaths(warnings), sorted([
            "general.worker_threads"]))
        self.assertTrue(all(NOT_ACTED_ON in w for w in warnings), warnings)

    def test_pgcat_001fe7e(self):
        """An older generation: ``autoreload = false`` (a boolean then)."""
        cfg, warnings = self.load("pgcat.001fe7e.toml")
        g = cfg.general
        self.assertEqual((g.host, g.port, g.connect_timeout, g.shutdown_timeout,
                          g.autoreload), ("0.0.0.0", 6432, 5000, 60000, None))
        self.assert_sample_pools(cfg, (9, 21, 5), (0, 0, 0))
        self.assertEqual(keypaths(warnings), sorted([
            ]))

    def test_circleci_pgcat(self):
        """PgCat's CI file: TLS towards clients, ``autoreload = true``
        (every 15 s in the PgCat of that file), statement timeouts."""
        cfg, warnings = self.load("circleci.pgcat.toml")
        g = cfg.general
        self.assertEqual((g.port, g.connect_timeout, g.healthcheck_timeout, g.shutdown_timeout,
                          g.autoreload, g.tls_certificate, g.tls_private_key),
                         (6432, 100, 100, 5000, 15000, ".circleci/server.cert",
                          ".circleci/server.key"))
        self.assert_sample_pools(cfg, (1, 1, 1), (0, 30000, 30000))
        self.assertEqual(keypaths(warnings), sorted([
            ]))

    def test_examples_docker_pgcat(self):
        """docker-compose's file: the one server is listed as primary and as
        replica (PgCat accepts it: its duplicate check includes the role)."""
        cfg, warnings = self.load("examples.docker.pgcat.toml")
        self.assertEqual((cfg.general.admin_username, cfg.general.log_client_connections),
                         ("postgres", False))
        self.assertEqual(cfg.pool_names, ("postgres",))
        pool = cfg.pool("postgres")
        self.assertEqual([(u.username, u.pool_size) for u in pool.users], [("postgres", 9)])
        self.assertEqual([(s.database, s.servers) for s in pool.shards],
                         [("postgres", DOCKER_PAIR)] * 3)
        both = [f"pools.postgres.shards.{i}.servers.1" for i in range(3)]
        self.assertEqual(keypaths(warnings), sorted(both + [
            ]))
        self.assertIn("postgres:5432 is also pools.postgres.shards.0.servers.0 (primary)",
                      " ".join(warnings))

    def test_examples_docker_pgcat_001fe7e(self):
        """The older docker file also lists the user "postgres" twice in
        one pool: PgCat uses the one whose key sorts last (pool_size 21)."""
        cfg, warnings = self.load("examples.docker.pgcat.001fe7e.toml")
        sharded = cfg.pool("sharded")
        self.assertEqual([(u.key, u.username, u.pool_size) for u in sharded.users],
                         [("1", "postgres", 21)])
        self.assertEqual([(s.database, s.servers) for s in sharded.shards],
                         [("postgres", DOCKER_PAIR)] * 3)
        self.assertEqual(cfg.pool("simple_db").users[0].pool_size, 5)
        both = [f"pools.sharded.shards.{i}.servers.1" for i in range(3)]
        self.assertEqual(keypaths(warnings), sorted(both + [
            "pools.sharded.users.0.username", "pools.simple_db.shards.0.servers.1",
            ]))
        self.assertIn('duplicate username "postgres"', " ".join(warnings))

    def test_config_md_bae12fc(self):
        """Every key CONFIG.md documents (written from it, not a copy)."""
        cfg, warnings = self.load("config_md.bae12fc.toml")
        pool = cfg.pool("sharded_db")
        self.assertEqual((pool.sharding_key_regex, pool.automatic_sharding_key),
                         (r"/\* sharding_key: (\d+) \*/", "data.id"))
        self.assertEqual(pool.shards[0].mirrors, (("1.2.3.4", 5432, 0), ("1.2.3.4", 5432, 1)))
        self.assertEqual(keypaths(warnings), sorted([
            "general.worker_threads"]))


# --- TLS: PgCat's CI key form, and keys that cannot be used ----------------------


def rsa_pair():
    """A self-signed certificate and its RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return key, cert


def pkcs8_under_rsa_header(key):
    """The key as PgCat's .circleci/server.key has it: a PKCS#8 PEM whose
    header lines say RSA PRIVATE KEY (OpenSSL reads it; cryptography 50's
    PEM reader does not)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n"), pem[:40]
    return (pem.replace(b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN RSA PRIVATE KEY-----")
            .replace(b"-----END PRIVATE KEY-----", b"-----END RSA PRIVATE KEY-----"))


_PAIR = []


def ci_pair():
    if not _PAIR:   # one RSA key for the module (generating one takes a while)
        _PAIR.append(rsa_pair())
    return _PAIR[0]


class TLSFilesTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pgcat_tw_pgcat_configs_")
        self.addCleanup(shutil.rmtree, self.dir, True)
        key, cert = ci_pair()
        self.cert = self.write("server.cert", cert.public_bytes(serialization.Encoding.PEM))
        self.key = self.write("server.key", pkcs8_under_rsa_header(key))

    def write(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def ci_config(self, cert=None, key=None):
        """PgCat's CI file with its two TLS paths pointed at files here;
        everything else as PgCat's."""
        with open(path_of("circleci.pgcat.toml")) as f:
            text = f.read()
        for old, new in (('".circleci/server.cert"', cert or self.cert),
                         ('".circleci/server.key"', key or self.key)):
            self.assertEqual(text.count(old), 1)
            text = text.replace(old, json.dumps(new))
        return self.write("pgcat.toml", text.encode())

    def parse_options(self, path):
        """tap.Options as twistd runs it: (options or None, exit code, stderr)."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        options = tap.Options()
        try:
            options.parseOptions(["-c", path])
        except SystemExit as e:
            return None, e.code, err.getvalue()
        return options, None, err.getvalue()

    def test_ci_key_form_loads(self):
        """The CI file with a key in its CI key's form passes the start-up
        check and gives a context that serves (the key matches the
        certificate)."""
        path = self.ci_config()
        options, code, err = self.parse_options(path)
        self.assertEqual((code, err), (None, ""))
        cfg, warnings = options.loaded
        self.assertEqual((cfg.general.tls_certificate, cfg.general.tls_private_key),
                         (self.cert, self.key))
        self.assertEqual(warnings, [])   # (the router acts on its keys)
        state = tls.TLSState(cfg.general)
        self.assertTrue(state.accepts_tls)
        self.assertEqual(tls.load_private_key(self.key, "tls_private_key").bits(), 2048)

    def assert_refused(self, path, *fragments):
        options, code, err = self.parse_options(path)
        self.assertEqual(code, 1, err)
        self.assertIsNone(options)
        self.assertEqual(err.count("\n"), 1, err)          # one line, no usage text
        for fragment in (path, *fragments):
            self.assertIn(fragment, err)
        self.assertNotIn("Traceback", err)
        return err

    def test_broken_key(self):
        """A key whose body is damaged: the message names the config file,
        the key path, the key file and what OpenSSL says."""
        lines = pkcs8_under_rsa_header(ci_pair()[0]).splitlines(True)
        broken = self.write("broken.key", b"".join(lines[:3] + lines[-1:]))
        err = self.assert_refused(self.ci_config(key=broken), ": general.tls_private_key: ",
                                  broken, "not a private key OpenSSL can load (OpenSSL: ")
        self.assertTrue(err.startswith(os.path.basename(sys.argv[0]) + ": "), err)

    def test_not_a_key(self):
        self.assert_refused(self.ci_config(key=self.cert), "general.tls_private_key",
                            "no PEM private key in the file", "it has CERTIFICATE")
        empty = self.write("empty.key", b"")
        self.assert_refused(self.ci_config(key=empty), "general.tls_private_key",
                            "no PEM private key")

    def test_encrypted_key(self):
        pem = ci_pair()[0].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"))
        key = self.write("encrypted.key", pem)
        self.assert_refused(self.ci_config(key=key), "general.tls_private_key",
                            "the private key is encrypted")

    def test_missing_files(self):
        self.assert_refused(self.ci_config(cert="/nonexistent/server.cert"),
                            "general.tls_certificate", "/nonexistent/server.cert",
                            "cannot read: No such file")
        self.assert_refused(self.ci_config(key="/nonexistent/server.key"),
                            "general.tls_private_key", "cannot read")

    def test_key_of_another_certificate(self):
        other = self.write("other.key", pkcs8_under_rsa_header(
            rsa.generate_private_key(public_exponent=65537, key_size=2048)))
        self.assert_refused(self.ci_config(key=other), "general.tls_private_key",
                            "cannot be used together")

    def test_certificate_chain_and_broken_certificate(self):
        """Every certificate of a chain file is read, a key in the same file
        skipped; a damaged certificate is named by its block."""
        cert_pem = ci_pair()[1].public_bytes(serialization.Encoding.PEM)
        chain = self.write("chain.pem", cert_pem + pkcs8_under_rsa_header(ci_pair()[0])
                           + cert_pem)
        self.assertEqual(len(tls.load_certificates(chain, "tls_certificate")), 2)
        lines = cert_pem.splitlines(True)
        broken = self.write("broken.cert", b"".join(lines[:2] + lines[-1:]))
        self.assert_refused(self.ci_config(cert=broken), "general.tls_certificate",
                            "PEM block 1 (CERTIFICATE) is not a certificate OpenSSL can load")
        self.assert_refused(self.ci_config(cert=self.key), "general.tls_certificate",
                            "no PEM certificate in the file")

    def test_missing_and_invalid_config(self):
        missing = os.path.join(self.dir, "missing.toml")
        self.assert_refused(missing, "cannot read config file")
        invalid = self.write("invalid.toml", b'[general]\nport = "x"\n')
        self.assert_refused(invalid, ": general.port: must be a port number")

    def test_usage_error_exits_with_usage(self):
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as cm:
            tap.Options().parseOptions(["--no-such-option"])
        self.assertEqual(cm.exception.code, 1)
        self.assertIn("[-c pgcat.toml]", err.getvalue())   # the usage text
        self.assertIn("no-such-option", err.getvalue().splitlines()[-1])


# --- keys accepted but not acted on ----------------------------------------------


class NotActedOnTests(SynchronousTestCase):
    """Keys accepted but not acted on warn when the file asks for what they
    do, and are silent when their value asks for nothing pgcat_tw does not
    do anyway (pgcat_tw.config.inactive)."""

    def warned(self, general=None, pool_keys=None, user_keys=None, shard_keys=None):
        data = base()
        data["general"].update(general or {})
        pool(data).update(pool_keys or {})
        user(data).update(user_keys or {})
        shard(data).update(shard_keys or {})
        _, warnings = config.from_dict(data, "t.toml")
        for w in warnings:
            self.assertIn(NOT_ACTED_ON, w)
        return sorted(w.split(": ")[1] for w in warnings)

    def test_tables_name_spec_keys(self):
        from pgcat_tw.config import inactive

        for table, spec in ((inactive.GENERAL, config.GENERAL_SPEC),
                            (inactive.POOL, config.POOL_SPEC),
                            (inactive.USER, config.USER_SPEC)):
            self.assertEqual(set(table) - set(spec), set())

    def test_general(self):
        warned = {"worker_threads": 4, "validate_config": True, "dns_cache_enabled": True}
        inert = {"validate_config": False, "dns_cache_enabled": False, "dns_max_ttl": 30}
        self.assertEqual(self.warned(warned), sorted(f"general.{k}" for k in warned))
        self.assertEqual(self.warned(inert), [])
        self.assertEqual(self.warned({"dns_cache_enabled": True, "dns_max_ttl": 30}),
                         ["general.dns_cache_enabled", "general.dns_max_ttl"])

    def test_pool(self):
        warned = {"log_client_parameter_status_changes": True,
                  "db_activity_based_routing": True, "db_activity_init_delay": 5,
                  "db_activity_ttl": 5, "table_mutation_cache_ms_ttl": 5}
        self.assertEqual(self.warned(pool_keys=warned),
                         sorted(f"pools.app.{k}" for k in warned))
        inert = {"cleanup_server_connections": True,
                 "log_client_parameter_status_changes": False,
                 "db_activity_based_routing": False, "db_activity_init_delay": 5,
                 "db_activity_ttl": 5, "table_mutation_cache_ms_ttl": 5}
        self.assertEqual(self.warned(pool_keys=inert), [])
        # Acted on (frontend: no reset between clients when false).
        self.assertEqual(self.warned(pool_keys={"cleanup_server_connections": False}), [])

    def test_router_keys_are_acted_on(self):
        """The query parser's, sharding's and comment hints' keys, and shards
        beyond the first: the router acts on them, no warning."""
        self.assertEqual(self.warned(pool_keys={
            "query_parser_enabled": True, "query_parser_max_length": 100,
            "query_parser_read_write_splitting": True,
            "automatic_sharding_key": "t.id", "sharding_key_regex": "k: (\\d+)",
            "shard_id_regex": "s: (\\d+)", "regex_search_limit": 10,
            "sharding_function": "sha1", "default_shard": "random"}), [])
        data = base()
        pool(data)["shards"]["1"] = {"database": "db1", "servers": [["b", 1, "primary"]]}
        pool(data).update(sharding_function="sha1", default_shard="random")
        self.assertEqual(config.from_dict(data, "t.toml")[1], [])

    def test_acted_on_keys_are_silent(self):
        """Keys that were in these tables until their feature landed."""
        self.assertEqual(self.warned(
            general={"autoreload": 15000, "idle_client_in_transaction_timeout": 5},
            pool_keys={"checkout_failure_limit": 3},
            user_keys={"statement_timeout": 5000}), [])

    def test_shard_and_plugins(self):
        # Mirrors and plugins are acted on (pgcat_tw.mirror, router.plugins).
        self.assertEqual(self.warned(shard_keys={"mirrors": [["m", 1, 0]]}), [])
        self.assertEqual(self.warned(pool_keys={
            "query_parser_enabled": True,
            "plugins": {"prewarmer": {"enabled": True, "queries": ["select 1"]},
                        "query_logger": {"enabled": False}}}), [])

    def test_autoreload_forms(self):
        """Milliseconds, or the boolean of older PgCat releases (true: every
        15 s)."""
        for value, stored in ((2000, 2000), (True, 15000), (False, None)):
            data = base()
            data["general"]["autoreload"] = value
            self.assertEqual(config.from_dict(data)[0].general.autoreload, stored)
        for value in (0, "15s", 1.5):
            data = base()
            data["general"]["autoreload"] = value
            with self.assertRaises(ConfigError) as cm:
                config.from_dict(data, "t.toml")
            self.assertIn("t.toml: general.autoreload: must be a positive integer"
                          " (milliseconds) or a boolean", str(cm.exception))
