"""TLS towards clients and towards servers, with certificates made at test
time (tests/certs.py).

Clients: psql and psycopg with sslmode=require / verify-full (right CA,
wrong CA, wrong host name), PostgreSQL 17's direct TLS (psycopg's libpq when
it has it, and a raw handshake with ALPN), TLS 1.2 minimum, pipelined bytes
after SSLRequest, tls_require, client certificates, cancel requests over TLS
and in plain text, reload of certificates, conf/pgcat.tls.toml.

Servers: the run's primary gets ``ssl = on`` at run time (ALTER SYSTEM and a
reload; clients that do not ask for TLS are unaffected); server_tls with and
without verification (right CA, wrong CA, wrong host name), a server that
refuses TLS, and TLS on both sides with large results.
"""

import os
import re
import shutil
import socket
import ssl
import struct
import threading
import time

import psycopg
import tomli
from twisted.internet import defer, protocol, reactor, task, threads, utils
from twisted.logger import globalLogPublisher

from pgcat_tw import config as config_mod
from pgcat_tw.relay import registered_producer
from pgcat_tw.service import PgCatService
from tests import pgharness
from tests.certs import CertSet
from tests.pgharness import USERS, topology
from tests.support import (
    PSQL,
    Pooler,
    PoolerTestCase,
    error_fields,
    free_port,
    in_thread,
    pooler_toml,
    read_messages,
    startup_packet,
)

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
HAS_DIRECT = psycopg.pq.version() >= 170000


def tls_dsn(pooler, user="pgcat_md5", **kw):
    return pooler.dsn(user=user, **kw).replace("sslmode=disable", "")


def connect_info(dsn):
    """(current_user, ssl_in_use) or the error text."""
    try:
        with psycopg.connect(dsn) as c:
            return c.execute("select current_user").fetchone()[0], c.pgconn.ssl_in_use
    except psycopg.OperationalError as e:
        return str(e)


def md5_password(user, password, salt):
    import hashlib
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


def msg(t, body):
    return t + struct.pack("!i", len(body) + 4) + body


def client_context(alpn=None, ca=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.check_hostname = False
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def raw_tls_login(port, user="pgcat_md5", password="md5_pw", direct=True, alpn=("postgresql",)):
    """Log in over a raw TLS socket (md5). Returns (sock, messages up to
    ReadyForQuery) or raises; ``direct``: TLS from the first byte."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    if not direct:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S"
    s = client_context(list(alpn) if alpn else None).wrap_socket(raw)
    s.sendall(startup_packet(user, "pgcat_test"))
    msgs, closed = read_messages(s, until=b"R")
    if not msgs or msgs[-1][0] != b"R":
        return s, msgs
    salt = msgs[-1][1][4:8]
    s.sendall(msg(b"p", md5_password(user, password, salt)))
    more, closed = read_messages(s, until=b"Z")
    return s, msgs + more


class ClientTLSTestCase(PoolerTestCase):
    """A pooler with TLS towards clients; users pgcat_md5 and pgcat_scram."""

    users = {"pgcat_md5": "", "pgcat_scram": 'auth_type = "scram-sha-256"'}
    tls_extra = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.certs = CertSet(self.mktemp())
        self.general = self.certs.general_toml(extra=self.tls_extra.format(c=self.certs))
        yield PoolerTestCase.setUp(self)


class ClientTLSTests(ClientTLSTestCase):
    @defer.inlineCallbacks
    def test_psql_sslmode_require(self):
        out, err, code = yield self._psql("\\conninfo", "require")
        self.assertEqual(code, 0, err)
        self.assertIn(b"SSL connection (protocol: TLSv1.", out)

    def _psql(self, sql, sslmode, **env_extra):
        env = self.pooler.env("pgcat_md5")
        env["PGSSLMODE"] = sslmode
        env.update(env_extra)
        return utils.getProcessOutputAndValue(
            PSQL, ["-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.pooler.port),
                   "-U", "pgcat_md5", "-d", "pgcat_test", "-c", sql], env=env)

    @defer.inlineCallbacks
    def test_psql_verify_full(self):
        out, err, code = yield self._psql("select 42", "verify-full", PGSSLROOTCERT=self.certs.ca)
        self.assertEqual((code, out.strip()), (0, b"42"), err)
        out, err, code = yield self._psql("select 42", "verify-full",
                                          PGSSLROOTCERT=self.certs.other_ca)
        self.assertNotEqual(code, 0)
        self.assertIn(b"certificate verify failed", err)

    @defer.inlineCallbacks
    def test_psycopg_require_and_prefer(self):
        res = yield in_thread(connect_info, tls_dsn(self.pooler, sslmode="require"))
        self.assertEqual(res, ("pgcat_md5", True))
        # libpq's default, prefer, gets TLS too.
        res = yield in_thread(connect_info, tls_dsn(self.pooler, sslmode="prefer"))
        self.assertEqual(res, ("pgcat_md5", True))
        # Plain text still works when TLS is not required.
        res = yield in_thread(connect_info, self.pooler.dsn())
        self.assertEqual(res, ("pgcat_md5", False))

    @defer.inlineCallbacks
    def test_psycopg_verify_full(self):
        ok = yield in_thread(connect_info, tls_dsn(self.pooler, sslmode="verify-full",
                                                   sslrootcert=self.certs.ca))
        self.assertEqual(ok, ("pgcat_md5", True))
        wrong_ca = yield in_thread(connect_info, tls_dsn(self.pooler, sslmode="verify-full",
                                                         sslrootcert=self.certs.other_ca))
        self.assertIn("certificate verify failed", wrong_ca)
        # verify-ca does not check the name, verify-full does.
        dsn = tls_dsn(self.pooler, sslmode="verify-full", sslrootcert=self.certs.ca)
        wrong_host = yield in_thread(connect_info, dsn.replace("host=127.0.0.1", "host=localhost"))
        self.assertIn('does not match host name "localhost"', wrong_host)
        dsn = tls_dsn(self.pooler, sslmode="verify-ca", sslrootcert=self.certs.ca)
        ok = yield in_thread(connect_info, dsn.replace("host=127.0.0.1", "host=localhost"))
        self.assertEqual(ok, ("pgcat_md5", True))

    @defer.inlineCallbacks
    def test_direct_tls_psycopg(self):
        if not HAS_DIRECT:
            raise __import__("twisted.trial.unittest", fromlist=["SkipTest"]).SkipTest(
                "libpq < 17 has no sslnegotiation=direct (the raw test covers it)")
        res = yield in_thread(connect_info, tls_dsn(self.pooler, sslmode="require",
                                                    sslnegotiation="direct"))
        self.assertEqual(res, ("pgcat_md5", True))
        res = yield in_thread(connect_info, tls_dsn(
            self.pooler, user="pgcat_scram", sslmode="verify-full", sslrootcert=self.certs.ca,
            sslnegotiation="direct", channel_binding="require"))
        self.assertEqual(res, ("pgcat_scram", True))

    @defer.inlineCallbacks
    def test_direct_tls_raw_alpn(self):
        def run():
            s, msgs = raw_tls_login(self.pooler.port)
            try:
                return [t for t, _ in msgs], s.selected_alpn_protocol()
            finally:
                s.close()
        types, alpn = yield in_thread(run)
        self.assertEqual(alpn, "postgresql")
        self.assertIn(b"K", types)
        self.assertEqual(types[-1], b"Z")

    @defer.inlineCallbacks
    def test_direct_tls_needs_alpn(self):
        def run():
            s, msgs = raw_tls_login(self.pooler.port, alpn=None)
            s.close()
            return msgs
        msgs = yield in_thread(run)
        fields = error_fields(msgs[-1][1])
        self.assertEqual((fields["S"], fields["C"]), ("FATAL", "08P01"))
        self.assertIn("ALPN", fields["M"])

    @defer.inlineCallbacks
    def test_wrong_alpn_refused(self):
        def run():
            try:
                s, msgs = raw_tls_login(self.pooler.port, alpn=("http/1.1",))
            except (ssl.SSLError, OSError) as e:
                return e
            s.close()
            return msgs
        res = yield in_thread(run)
        self.assertIsInstance(res, (ssl.SSLError, OSError))

    @defer.inlineCallbacks
    def test_negotiated_tls_with_alpn(self):
        def run():
            s, msgs = raw_tls_login(self.pooler.port, direct=False)
            s.close()
            return [t for t, _ in msgs]
        types = yield in_thread(run)
        self.assertEqual(types[-1], b"Z")

    @defer.inlineCallbacks
    def test_tls_1_2_minimum(self):
        def handshake(version):
            ctx = client_context(["postgresql"])
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            ctx.minimum_version = version
            ctx.maximum_version = version
            raw = socket.create_connection(("127.0.0.1", self.pooler.port), timeout=5)
            try:
                s = ctx.wrap_socket(raw)
                v = s.version()
                s.close()
                return v
            except (ssl.SSLError, OSError) as e:
                return e
            finally:
                raw.close()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old = yield in_thread(handshake, ssl.TLSVersion.TLSv1_1)
        self.assertIsInstance(old, (ssl.SSLError, OSError))
        # Refused by the pooler (an alert), not by the local library.
        self.assertTrue(re.search("protocol.version", str(old), re.I), old)
        ok = yield in_thread(handshake, ssl.TLSVersion.TLSv1_2)
        self.assertEqual(ok, "TLSv1.2")

    @defer.inlineCallbacks
    def test_bytes_pipelined_after_ssl_request(self):
        """CVE-2021-23214: bytes sent with the SSLRequest, before the answer,
        must not be taken as coming through TLS."""
        def run():
            s = socket.create_connection(("127.0.0.1", self.pooler.port), timeout=5)
            try:
                s.sendall(struct.pack("!ii", 8, 80877103) + startup_packet("pgcat_md5",
                                                                           "pgcat_test"))
                return read_messages(s, until=b"never")
            finally:
                s.close()
        msgs, closed = yield in_thread(run)
        self.assertTrue(closed)
        fields = error_fields(msgs[0][1])
        self.assertEqual(fields["C"], "08P01")
        self.assertIn("unencrypted data after SSL", fields["M"])

    @defer.inlineCallbacks
    def test_ssl_request_inside_tls(self):
        def run():
            raw = socket.create_connection(("127.0.0.1", self.pooler.port), timeout=5)
            s = client_context(["postgresql"]).wrap_socket(raw)
            try:
                s.sendall(struct.pack("!ii", 8, 80877103))
                return read_messages(s, until=b"never")
            finally:
                s.close()
        msgs, closed = yield in_thread(run)
        self.assertEqual(error_fields(msgs[0][1])["C"], "08P01")

    @defer.inlineCallbacks
    def test_cancel_over_tls(self):
        """psycopg (libpq 17+ sends the cancel over TLS like the session)."""
        def run():
            with psycopg.connect(tls_dsn(self.pooler, sslmode="require")) as conn:
                timer = threading.Timer(0.5, conn.cancel_safe
                                        if hasattr(conn, "cancel_safe") else conn.cancel)
                timer.start()
                t0 = time.monotonic()
                try:
                    conn.execute("select pg_sleep(20)")
                except psycopg.errors.QueryCanceled:
                    return time.monotonic() - t0
                finally:
                    timer.cancel()
                return None
        took = yield in_thread(run)
        self.assertIsNotNone(took)
        self.assertLess(took, 10)

    @defer.inlineCallbacks
    def test_stale_producer_not_left_on_tls_transport(self):
        """A large answer to a TLS client registers the server as the client
        transport's producer (through Twisted's TLS wrapper); it must be
        removed when the server goes back to the pool."""
        def run():
            with psycopg.connect(tls_dsn(self.pooler, sslmode="require")) as c:
                n = c.execute("select length(string_agg(repeat('x', 1000), '')) "
                              "from generate_series(1, 20000)").fetchone()[0]
                rows = c.execute("select repeat('y', 1000) from generate_series(1, 20000)")
                total = sum(len(r[0]) for r in rows.fetchall())
                return n, total
        res = yield in_thread(run)
        self.assertEqual(res, (20_000_000, 20_000_000))
        for client in self.pooler.service.factory.clients:
            self.assertIsNone(registered_producer(client.transport))


class TLSRequiredTests(ClientTLSTestCase):
    tls_extra = "tls_require = true\n"

    @defer.inlineCallbacks
    def test_plaintext_refused(self):
        err = yield in_thread(connect_info, self.pooler.dsn())
        self.assertIn("TLS is required", err)

        def raw():
            s = socket.create_connection(("127.0.0.1", self.pooler.port), timeout=5)
            try:
                s.sendall(startup_packet("pgcat_md5", "pgcat_test"))
                return read_messages(s, until=b"never")
            finally:
                s.close()
        msgs, closed = yield in_thread(raw)
        fields = error_fields(msgs[0][1])
        self.assertEqual((fields["S"], fields["C"]), ("FATAL", "28000"))
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_tls_accepted(self):
        res = yield in_thread(connect_info, tls_dsn(self.pooler, sslmode="require"))
        self.assertEqual(res, ("pgcat_md5", True))
        # sslmode=allow tries plain text first, then TLS after the refusal.
        res = yield in_thread(connect_info, tls_dsn(self.pooler, sslmode="allow"))
        self.assertEqual(res, ("pgcat_md5", True))

    @defer.inlineCallbacks
    def test_plaintext_cancel_of_tls_session(self):
        """A CancelRequest in plain text (what libpq before 17 sends) works
        even though sessions must use TLS."""
        def run():
            s, msgs = raw_tls_login(self.pooler.port)
            try:
                key = [b for t, b in msgs if t == b"K"][0]
                s.sendall(msg(b"Q", b"select pg_sleep(20)\0"))
                time.sleep(0.5)
                c = socket.create_connection(("127.0.0.1", self.pooler.port), timeout=5)
                c.sendall(struct.pack("!ii", 16, 80877102) + key)
                c.close()
                t0 = time.monotonic()
                answer, _ = read_messages(s, until=b"Z", timeout=15)
                return time.monotonic() - t0, answer
            finally:
                s.close()
        took, answer = yield in_thread(run)
        errors = [error_fields(b) for t, b in answer if t == b"E"]
        self.assertEqual([e["C"] for e in errors], ["57014"])
        self.assertLess(took, 10)


class ClientCertificateTests(ClientTLSTestCase):
    tls_extra = 'verify_client_certificate = true\ntls_ca_file = "{c.client_ca}"\n'

    @defer.inlineCallbacks
    def test_client_certificates(self):
        ok = yield in_thread(connect_info, tls_dsn(
            self.pooler, sslmode="require", sslcert=self.certs.client_cert,
            sslkey=self.certs.client_key))
        self.assertEqual(ok, ("pgcat_md5", True))
        # No certificate, or one from another CA: the handshake fails.
        none = yield in_thread(connect_info, tls_dsn(
            self.pooler, sslmode="require", sslcert="/nonexistent", sslkey="/nonexistent"))
        self.assertIsInstance(none, str)
        rogue = yield in_thread(connect_info, tls_dsn(
            self.pooler, sslmode="require", sslcert=self.certs.rogue_cert,
            sslkey=self.certs.rogue_key))
        self.assertIsInstance(rogue, str)
        # The password is still checked.
        wrong = yield in_thread(connect_info, tls_dsn(
            self.pooler, sslmode="require", sslcert=self.certs.client_cert,
            sslkey=self.certs.client_key, password="nope"))
        self.assertIn("password authentication failed", wrong)


class ReloadTests(PoolerTestCase):
    """New certificates apply to new connections on reload; a file that
    cannot be read keeps the previous certificate in force."""

    @defer.inlineCallbacks
    def setUp(self):
        self.topo = yield threads.deferToThread(topology)
        self.primary = self.topo.primary
        self.certs = CertSet(self.mktemp())
        self.cert_path = os.path.join(self.certs.dir, "live.pem")
        self.key_path = os.path.join(self.certs.dir, "live.key")
        shutil.copy(self.certs.server_cert, self.cert_path)
        shutil.copy(self.certs.server_key, self.key_path)
        self.toml_path = os.path.join(self.certs.dir, "pgcat.toml")
        text = pooler_toml(free_port(), [(self.primary.port, "primary")],
                           general=self.certs.general_toml(self.cert_path, self.key_path))
        with open(self.toml_path, "w") as f:
            f.write(text)
        self.pooler = Pooler(text)
        self.pooler.service.config_path = self.toml_path
        yield self.pooler.start()
        self.addCleanup(self.pooler.stop)

    def _verify(self, ca):
        return in_thread(connect_info, tls_dsn(self.pooler, sslmode="verify-full",
                                               sslrootcert=ca))

    @defer.inlineCallbacks
    def test_new_certificate_on_reload(self):
        self.assertEqual((yield self._verify(self.certs.ca)), ("pgcat_md5", True))
        shutil.copy(self.certs.other_cert, self.cert_path)
        shutil.copy(self.certs.other_key, self.key_path)
        self.assertTrue(self.pooler.service.reload())
        self.assertEqual((yield self._verify(self.certs.other_ca)), ("pgcat_md5", True))
        self.assertIn("certificate verify failed", (yield self._verify(self.certs.ca)))

    @defer.inlineCallbacks
    def test_unreadable_certificate_keeps_the_old(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        with open(self.cert_path, "w") as f:
            f.write("not a certificate")
        self.pooler.service.reload()
        self.assertEqual((yield self._verify(self.certs.ca)), ("pgcat_md5", True))
        text = " ".join(str(e.get("problem", "")) for e in events)
        self.assertIn("tls_certificate", text)
        self.assertIn("keeping the previous", text)
        os.unlink(self.cert_path)
        self.pooler.service.reload()
        self.assertEqual((yield self._verify(self.certs.ca)), ("pgcat_md5", True))
        self.assertIn("cannot read", " ".join(str(e.get("problem", "")) for e in events))

    def test_start_with_bad_files_fails(self):
        text = pooler_toml(free_port(), [(self.primary.port, "primary")],
                           general=self.certs.general_toml("/nonexistent.pem", self.key_path))
        e = self.assertRaises(config_mod.ConfigError, Pooler, text)
        self.assertIn("tls_certificate", str(e))
        self.assertIn("/nonexistent.pem", str(e))
        # A key that does not belong to the certificate.
        text = pooler_toml(free_port(), [(self.primary.port, "primary")],
                           general=self.certs.general_toml(self.certs.server_cert,
                                                           self.certs.other_key))
        e = self.assertRaises(config_mod.ConfigError, Pooler, text)
        self.assertIn("cannot be used together", str(e))


class ConfExampleTests(PoolerTestCase):
    """conf/pgcat.tls.toml loads without warnings and runs (with this test's
    certificates, port and server put in)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.topo = yield threads.deferToThread(topology)
        self.primary = self.topo.primary
        yield threads.deferToThread(enable_server_ssl)

    @defer.inlineCallbacks
    def test_tls_example(self):
        path = os.path.join(CONF_DIR, "pgcat.tls.toml")
        cfg, warnings = config_mod.load(path)
        self.assertEqual(warnings, [])
        g = cfg.general
        self.assertTrue(g.tls_certificate and g.tls_private_key and g.server_tls
                        and g.verify_server_certificate and g.tls_require)
        with open(path, "rb") as f:
            data = tomli.load(f)
        certs = CertSet(self.mktemp())
        gen = data["general"]
        gen.update(host="127.0.0.1", port=free_port(), tls_certificate=certs.server_cert,
                   tls_private_key=certs.server_key, server_tls_ca_file=SERVER_CERTS.pg_ca)
        for pool in data["pools"].values():
            pool["shards"]["0"]["servers"] = [["127.0.0.1", self.primary.port, "primary"]]
            pool["shards"]["0"]["database"] = "pgcat_test"
            for user in pool["users"].values():
                # The harness's SCRAM user (the example's secret is made up).
                user.update(username="pgcat_scram", password=USERS["pgcat_scram"])
        cfg, _ = config_mod.from_dict(data, "pgcat.tls.toml")
        svc = PgCatService(reactor, cfg)
        svc.startService()
        port = yield svc.listening
        pooler = Pooler.__new__(Pooler)
        pooler.service, pooler.port, pooler.config = svc, port.getHost().port, cfg
        self.addCleanup(pooler.stop)
        db = cfg.pools[0].name
        res = yield in_thread(connect_info, tls_dsn(
            pooler, user="pgcat_scram", db=db, sslmode="verify-full", sslrootcert=certs.ca,
            channel_binding="require"))
        self.assertEqual(res, ("pgcat_scram", True))
        err = yield in_thread(connect_info, pooler.dsn(user="pgcat_scram", db=db))
        self.assertIn("TLS is required", err)


# --- towards servers ---------------------------------------------------------------------

SERVER_CERTS = None
_ssl_on = []


def enable_server_ssl():
    """Turn ssl on on the run's primary (once): certificate files in its
    data directory, ALTER SYSTEM, reload. Clients that do not ask for TLS
    are unaffected."""
    global SERVER_CERTS
    if _ssl_on:
        return
    import tempfile
    SERVER_CERTS = CertSet(tempfile.mkdtemp(prefix="pgcat_tw_certs_"))
    primary = topology().primary
    pgharness._write(os.path.join(primary.datadir, "pgcat_tw_server.crt"),
                     SERVER_CERTS.pg_cert_pem.decode(), mode=0o600)
    pgharness._write(os.path.join(primary.datadir, "pgcat_tw_server.key"),
                     SERVER_CERTS.pg_key_pem.decode(), mode=0o600)
    primary.psql_script("ALTER SYSTEM SET ssl_cert_file = 'pgcat_tw_server.crt';\n"
                        "ALTER SYSTEM SET ssl_key_file = 'pgcat_tw_server.key';\n"
                        "ALTER SYSTEM SET ssl = on;\nSELECT pg_reload_conf();\n")
    deadline = time.monotonic() + 15
    while primary.psql("show ssl") != "on":
        if time.monotonic() > deadline:
            raise RuntimeError("ssl did not turn on:\n" + primary.log_tail())
        time.sleep(0.05)
    _ssl_on.append(True)


class ServerTLSTestCase(PoolerTestCase):
    server_general = ""

    @defer.inlineCallbacks
    def setUp(self):
        yield threads.deferToThread(enable_server_ssl)
        self.general = "server_tls = true\n" + self.server_general.format(c=SERVER_CERTS)
        yield PoolerTestCase.setUp(self)

    def ssl_in_use(self, **kw):
        def run():
            with psycopg.connect(self.pooler.dsn(**kw)) as c:
                return c.execute("select ssl from pg_stat_ssl "
                                 "where pid = pg_backend_pid()").fetchone()[0]
        return in_thread(run)


class ServerTLSTests(ServerTLSTestCase):
    users = {"pgcat_md5": "", "pgcat_scram": ""}

    @defer.inlineCallbacks
    def test_server_connection_uses_tls(self):
        for user in ("pgcat_md5", "pgcat_scram"):
            self.assertTrue((yield self.ssl_in_use(user=user)))


class ServerTLSVerifyTests(ServerTLSTestCase):
    server_general = 'verify_server_certificate = true\nserver_tls_ca_file = "{c.pg_ca}"\n'

    @defer.inlineCallbacks
    def test_verified(self):
        self.assertTrue((yield self.ssl_in_use()))


class ServerTLSFailureTests(PoolerTestCase):
    """Verification failures: the client gets an error, the log says why."""

    @defer.inlineCallbacks
    def setUp(self):
        yield threads.deferToThread(enable_server_ssl)
        self.topo = yield threads.deferToThread(topology)
        self.primary = self.topo.primary
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def _pooler(self, general, host="127.0.0.1", port=None):
        text = pooler_toml(free_port(), [(port or self.primary.port, "primary")],
                           general=general)
        text = text.replace('["127.0.0.1", ', f'["{host}", ')
        pooler = yield Pooler(text).start()
        self.addCleanup(pooler.stop)
        return pooler

    def _logged(self):
        from twisted.logger import formatEvent
        return "\n".join(formatEvent(e) for e in self.events)

    @defer.inlineCallbacks
    def test_wrong_ca(self):
        certs = CertSet(self.mktemp())
        p = yield self._pooler("server_tls = true\nverify_server_certificate = true\n"
                               f'server_tls_ca_file = "{certs.ca}"\n')
        err = yield in_thread(connect_info, p.dsn())
        self.assertIsInstance(err, str)
        self.assertIn("certificate verify failed", err)
        self.assertIn("certificate verify failed", self._logged())

    @defer.inlineCallbacks
    def test_wrong_host_name(self):
        p = yield self._pooler("server_tls = true\nverify_server_certificate = true\n"
                               f'server_tls_ca_file = "{SERVER_CERTS.pg_ca}"\n',
                               host="localhost")
        err = yield in_thread(connect_info, p.dsn())
        self.assertIsInstance(err, str)
        self.assertIn("not valid for host 'localhost'", err)
        self.assertIn("not valid for host 'localhost'", self._logged())

    @defer.inlineCallbacks
    def test_no_verification_accepts_any_certificate(self):
        p = yield self._pooler("server_tls = true\n", host="localhost")
        self.assertEqual((yield in_thread(connect_info, p.dsn())), ("pgcat_md5", False))

    @defer.inlineCallbacks
    def test_server_refusing_tls(self):
        fake = yield self._fake_server(b"N")
        p = yield self._pooler("server_tls = true\n", port=fake.getHost().port)
        err = yield in_thread(connect_info, p.dsn())
        self.assertIn("does not accept TLS", err)
        self.assertIn("does not accept TLS", self._logged())

    @defer.inlineCallbacks
    def test_server_injecting_bytes_after_s(self):
        fake = yield self._fake_server(b"S" + b"R" * 20)
        p = yield self._pooler("server_tls = true\n", port=fake.getHost().port)
        err = yield in_thread(connect_info, p.dsn())
        self.assertIn("unencrypted data after its SSL response", err)

    def _fake_server(self, answer):
        class Fake(protocol.Protocol):
            def dataReceived(self, data):
                self.transport.write(answer)

        f = protocol.Factory.forProtocol(Fake)
        f.noisy = False
        port = reactor.listenTCP(0, f, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return defer.succeed(port)


class TLSBothSidesTests(ServerTLSTestCase, ClientTLSTestCase):
    """TLS towards clients and servers at once, large answers, both modes."""

    users = {"pgcat_md5": "", "pgcat_scram": 'auth_type = "scram-sha-256"'}

    @defer.inlineCallbacks
    def setUp(self):
        yield threads.deferToThread(enable_server_ssl)
        self.certs = CertSet(self.mktemp())
        self.general = ("server_tls = true\nverify_server_certificate = true\n"
                        f'server_tls_ca_file = "{SERVER_CERTS.pg_ca}"\n'
                        + self.certs.general_toml())
        yield PoolerTestCase.setUp(self)

    @defer.inlineCallbacks
    def test_large_results_and_copy(self):
        def run(user):
            with psycopg.connect(tls_dsn(self.pooler, user=user, sslmode="require")) as c:
                ssl_server = c.execute("select ssl from pg_stat_ssl "
                                       "where pid = pg_backend_pid()").fetchone()[0]
                rows = c.execute("select repeat('z', 500) from generate_series(1, 40000)")
                total = sum(len(r[0]) for r in rows.fetchall())
                out = bytearray()
                with c.cursor().copy("COPY (select g, repeat('c', 100) from "
                                     "generate_series(1, 50000) g) TO STDOUT") as copy:
                    for block in copy:
                        out += block
                return ssl_server, c.pgconn.ssl_in_use, total, out.count(b"\n")
        results = yield defer.gatherResults([in_thread(run, "pgcat_md5"),
                                             in_thread(run, "pgcat_scram")])
        for r in results:
            self.assertEqual(r, (True, True, 20_000_000, 50000))


# --- TLS on the socket itself (pgcat_tw.tlssock) ------------------------------------------

def slow_read_query_tls(port, sql, rate_bytes_per_s):
    """test_large.slow_read_query over TLS (SSLRequest, md5 login)."""
    from tests.test_large import StreamCounter, query_message

    sock, msgs = raw_tls_login(port, direct=False)
    try:
        if not msgs or msgs[-1][0] != b"Z":
            raise AssertionError(f"login failed: {msgs!r}")
        sock.settimeout(60)
        sock.sendall(query_message(sql))
        sc = StreamCounter()
        start = time.monotonic()
        while not sc.done:
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed after {sc.total} bytes")
            sc.feed(data)
            ahead = sc.total / rate_bytes_per_s - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        sock.sendall(b"X\x00\x00\x00\x04")
        return sc, time.monotonic() - start
    finally:
        sock.close()


class TLSSocketTransportTests(ClientTLSTestCase):
    """Clients' TLS runs on tlssock's transports (OpenSSL on the socket);
    a slow TLS reader of a 200 MB COPY keeps the pooler's buffers bounded."""

    timeout = 300
    pool_size = 1

    @defer.inlineCallbacks
    def test_slow_tls_reader_bounds_pooler_buffers(self):
        from tests.test_large import BUFFER_BOUND, COPY_200MB, MB, ROWS_200MB, BufferSampler

        classes = set()

        def sample_classes():
            for client in self.pooler.service.factory.clients:
                if client.transport is not None:
                    classes.add(type(client.transport).__name__)
        s = BufferSampler(self.pooler.service.factory)
        s.start()
        self.addCleanup(s.stop)
        probe = task.LoopingCall(sample_classes)
        probe.start(0.05)
        self.addCleanup(lambda: probe.running and probe.stop())
        sc, elapsed = yield in_thread(slow_read_query_tls, self.pooler.port, COPY_200MB,
                                      50 * MB)
        s.stop()
        self.assertEqual(classes, {"TLSServer"})
        self.assertEqual(sc.errors, [])
        self.assertEqual(sc.counts.get(0x64), ROWS_200MB)
        self.assertEqual(sc.payload.get(0x64), ROWS_200MB * 1001)
        self.assertGreater(s.bound_samples, 50, s.report())
        self.assertLess(s.client_max, BUFFER_BOUND, s.report())
        self.assertLess(s.server_max, BUFFER_BOUND, s.report())
        self.assertGreater(s.server_paused, 0,
                           "the server connection was never paused: " + s.report())

    @defer.inlineCallbacks
    def test_transports_on_both_sides(self):
        """Towards the client (TLSServer) and the server (TLSClient) while a
        query runs; the client's writer is tlssock's write-through."""
        yield threads.deferToThread(enable_server_ssl)
        seen = []

        def look():
            for client in self.pooler.service.factory.clients:
                server = client.server
                if server is not None:
                    seen.append((type(client.transport).__name__,
                                 type(server.transport).__name__,
                                 client.writer is type(client.transport).pgcat_writer))
        text = pooler_toml(free_port(), [(topology().primary.port, "primary")],
                           general="server_tls = true\n" + self.certs.general_toml())
        pooler = yield Pooler(text).start()
        self.addCleanup(pooler.stop)
        self.pooler = pooler
        probe = task.LoopingCall(look)
        probe.start(0.01)
        self.addCleanup(lambda: probe.running and probe.stop())

        def run():
            with psycopg.connect(tls_dsn(pooler, sslmode="require")) as c:
                return c.execute("select pg_sleep(0.3), 1").fetchone()[1]
        self.assertEqual((yield in_thread(run)), 1)
        self.assertIn(("TLSServer", "TLSClient", True), seen)
