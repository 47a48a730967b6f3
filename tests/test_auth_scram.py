"""SCRAM-SHA-256: the sans-IO exchanges (pgcat_tw.auth.scram) against RFC 7677's
test vector and scramp, and client logins through the pooler with psycopg,
psql and asyncpg: plaintext passwords, stored md5 and SCRAM secrets (with
SCRAM passthrough to PostgreSQL), wrong passwords for each method, and
SCRAM-SHA-256-PLUS (channel binding) over TLS."""

import asyncio
import base64
import os

import asyncpg
import psycopg
import scramp
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw.auth import md5 as md5_auth
from pgcat_tw.auth import scram
from tests.certs import CertSet
from tests.pgharness import USERS
from tests.support import PoolerTestCase, in_thread

# RFC 7677, section 3.
RFC_CLIENT_FIRST = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = ("r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
RFC_CLIENT_FINAL = ("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")


def rfc_secret():
    return scram.make_secret("pencil", salt=RFC_SALT, iterations=4096)


def scramp_login(exchange, password, mechanism="SCRAM-SHA-256", channel_binding=None):
    """Run scramp's client against a ScramServerExchange; returns the
    server-final message (raises what the exchange raises)."""
    client = scramp.ScramClient([mechanism], "ignored", password,
                                channel_binding=channel_binding)
    first = exchange.client_first(mechanism, client.get_client_first().encode())
    client.set_server_first(first.decode())
    final = exchange.client_final(client.get_client_final().encode())
    client.set_server_final(final.decode())
    return final


class SecretTests(SynchronousTestCase):
    def test_format_roundtrip(self):
        s = scram.make_secret("pw", salt=b"0123456789abcdef", iterations=4096)
        text = str(s)
        self.assertTrue(text.startswith("SCRAM-SHA-256$4096:"))
        self.assertTrue(scram.is_scram_secret(text))
        self.assertEqual(scram.parse_secret(text), s)

    def test_malformed(self):
        for bad in ("SCRAM-SHA-256$", "SCRAM-SHA-256$4096:abc$def",
                    "SCRAM-SHA-256$x:AAAA$AAAA:AAAA", "md5" + "0" * 32, "",
                    "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 40):
            self.assertRaises(ValueError, scram.parse_secret, bad)

    def test_repr_hides_keys(self):
        s = scram.make_secret("pw")
        self.assertNotIn(base64.b64encode(s.stored_key).decode(), repr(s))

    def test_rfc_keys(self):
        s = rfc_secret()
        # StoredKey/ServerKey implied by the RFC's exchange: the server
        # signature checks out below; here the derivation is self-consistent.
        ck, sk, srv = scram.derive_keys("pencil", RFC_SALT, 4096)
        self.assertEqual((s.stored_key, s.server_key), (sk, srv))

    def test_secret_for(self):
        self.assertEqual(scram.secret_for("pw"), scram.secret_for("pw"))  # stable salt
        stored = str(scram.make_secret("pw"))
        self.assertEqual(str(scram.secret_for(stored)), stored)
        self.assertRaises(ValueError, scram.secret_for, "md5" + "a" * 32)

    def test_saslprep_fallback(self):
        # A password SASLprep rejects is used as raw UTF-8, like PostgreSQL.
        self.assertEqual(scram.prepare_password("pass\u0007word"), "pass\u0007word".encode())
        self.assertEqual(scram.prepare_password("I\u00adX"), b"IX")   # soft hyphen mapped out

    def test_mock_secret_stable_per_user(self):
        a1, a2, b = scram.mock_secret("a"), scram.mock_secret("a"), scram.mock_secret("b")
        self.assertEqual(a1.salt, a2.salt)
        self.assertNotEqual(a1.salt, b.salt)
        self.assertEqual(a1.iterations, scram.DEFAULT_ITERATIONS)

    def test_end_point_hash(self):
        import hashlib
        self.assertEqual(scram.tls_server_end_point(b"der", "sha1"), hashlib.sha256(b"der").digest())
        self.assertEqual(scram.tls_server_end_point(b"der", "sha384"),
                         hashlib.sha384(b"der").digest())


class ServerExchangeTests(SynchronousTestCase):
    def test_rfc7677_vector(self):
        ex = scram.ScramServerExchange(rfc_secret(), nonce=RFC_SERVER_NONCE)
        self.assertEqual(ex.mechanisms, ["SCRAM-SHA-256"])
        first = ex.client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST.encode())
        self.assertEqual(first.decode(), RFC_SERVER_FIRST)
        final = ex.client_final(RFC_CLIENT_FINAL.encode())
        self.assertEqual(final.decode(), RFC_SERVER_FINAL)
        self.assertEqual(ex.client_key, scram.derive_keys("pencil", RFC_SALT, 4096)[0])

    def test_with_scramp_client(self):
        ex = scram.ScramServerExchange(scram.make_secret("s3cret"))
        scramp_login(ex, "s3cret")

    def test_empty_user_name_as_libpq_sends(self):
        ex = scram.ScramServerExchange(rfc_secret(), nonce=RFC_SERVER_NONCE)
        first = ex.client_first("SCRAM-SHA-256", b"n,,n=,r=abc")
        self.assertTrue(first.startswith(b"r=abc%hvY"))

    def test_wrong_password(self):
        ex = scram.ScramServerExchange(scram.make_secret("right"))
        self.assertRaises(scram.ScramAuthFailed, scramp_login, ex, "wrong")
        self.assertIsNone(ex.client_key)

    def test_mock_always_fails(self):
        s = scram.make_secret("right")
        ex = scram.ScramServerExchange(s, mock=True)
        self.assertRaises(scram.ScramAuthFailed, scramp_login, ex, "right")

    def test_channel_binding(self):
        cb = os.urandom(32)
        ex = scram.ScramServerExchange(scram.make_secret("pw"), channel_binding=cb)
        self.assertEqual(ex.mechanisms, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
        scramp_login(ex, "pw", "SCRAM-SHA-256-PLUS", ("tls-server-end-point", cb))
        self.assertTrue(ex.channel_bound)

    def test_channel_binding_mismatch(self):
        ex = scram.ScramServerExchange(scram.make_secret("pw"), channel_binding=b"a" * 32)
        self.assertRaises(scram.ScramAuthFailed, scramp_login, ex, "pw",
                          "SCRAM-SHA-256-PLUS", ("tls-server-end-point", b"b" * 32))

    def test_no_binding_is_fine_on_tls(self):
        # channel_binding=disable / clients without support: SCRAM-SHA-256, flag n.
        ex = scram.ScramServerExchange(scram.make_secret("pw"), channel_binding=b"a" * 32)
        scramp_login(ex, "pw")

    def test_downgrade_detected(self):
        # 'y': the client could bind and thinks the server cannot, although
        # the server offered -PLUS: the mechanism list was tampered with.
        ex = scram.ScramServerExchange(scram.make_secret("pw"), channel_binding=b"a" * 32)
        self.assertRaises(scram.ScramProtocolError, ex.client_first, "SCRAM-SHA-256",
                          b"y,,n=,r=abc")
        ex = scram.ScramServerExchange(scram.make_secret("pw"))
        ex.client_first("SCRAM-SHA-256", b"y,,n=,r=abc")   # fine without TLS

    def test_plus_needs_binding_flag(self):
        ex = scram.ScramServerExchange(scram.make_secret("pw"), channel_binding=b"a" * 32)
        self.assertRaises(scram.ScramProtocolError, ex.client_first, "SCRAM-SHA-256-PLUS",
                          b"n,,n=,r=abc")
        ex = scram.ScramServerExchange(scram.make_secret("pw"))
        self.assertRaises(scram.ScramProtocolError, ex.client_first, "SCRAM-SHA-256-PLUS",
                          b"p=tls-server-end-point,,n=,r=abc")

    def test_malformed_messages(self):
        bad_firsts = [b"", b"n,,", b"x,,n=,r=a", b"n,a=bob,n=,r=abc", b"n,,m=ext,n=,r=a",
                      b"n,,r=abc", b"n,,n=,r=a,b", b"n,,n=,r=ab,cd", b"\xff\xfe",
                      b"p=tls-unique,,n=,r=abc", b"n,,n=,r=a\x00"]
        for data in bad_firsts:
            ex = scram.ScramServerExchange(scram.make_secret("pw"), channel_binding=b"x" * 32)
            mech = "SCRAM-SHA-256-PLUS" if data.startswith(b"p=") else "SCRAM-SHA-256"
            self.assertRaises(scram.ScramProtocolError, ex.client_first, mech, data)
        ex = scram.ScramServerExchange(scram.make_secret("pw"))
        self.assertRaises(scram.ScramProtocolError, ex.client_first, "SCRAM-SHA-1", b"n,,n=,r=a")
        ex = scram.ScramServerExchange(scram.make_secret("pw"))
        self.assertRaises(scram.ScramProtocolError, ex.client_first, "SCRAM-SHA-256", None)
        for final in [b"c=biws", b"c=biws,r=WRONG,p=AAAA", b"r=x,c=biws,p=AAAA",
                      b"c=!!!,r=x,p=AAAA"]:
            ex = scram.ScramServerExchange(scram.make_secret("pw"), nonce="srv")
            ex.client_first("SCRAM-SHA-256", b"n,,n=,r=cli")
            self.assertRaises((scram.ScramProtocolError, scram.ScramAuthFailed),
                              ex.client_final, final)
        ex = scram.ScramServerExchange(scram.make_secret("pw"), nonce="srv")
        ex.client_first("SCRAM-SHA-256", b"n,,n=,r=cli")
        self.assertRaises(scram.ScramProtocolError, ex.client_final,
                          b"c=biws,r=clisrv,p=" + base64.b64encode(b"short"))

    def test_out_of_order(self):
        ex = scram.ScramServerExchange(scram.make_secret("pw"))
        self.assertRaises(scram.ScramProtocolError, ex.client_final, b"c=biws,r=a,p=AAAA")


class ClientExchangeTests(SynchronousTestCase):
    def _pair(self, client_password, server_secret):
        server = scram.ScramServerExchange(server_secret)
        client = scram.ScramClientExchange("bob", client_password)
        mech, first = client.start(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
        self.assertEqual(mech, "SCRAM-SHA-256")
        final = client.server_first(server.client_first(mech, first))
        client.server_final(server.client_final(final))
        return server

    def test_plaintext(self):
        self._pair("pw", scram.make_secret("pw"))

    def test_against_scramp_server(self):
        m = scramp.ScramMechanism()
        salt, stored, server_key, i = m.make_auth_info("pw", salt=b"0123456789abcdef")
        srv = m.make_server(lambda user: (salt, stored, server_key, i))
        client = scram.ScramClientExchange("bob", "pw")
        _, first = client.start(["SCRAM-SHA-256"])
        # scramp insists on a user name in client-first; give it one while
        # keeping the exchange consistent.
        client._first_bare = client._first_bare.replace("n=,", "n=bob,")
        srv.set_client_first("n,," + client._first_bare)
        final = client.server_first(srv.get_server_first().encode())
        srv.set_client_final(final.decode())
        client.server_final(srv.get_server_final().encode())

    def test_rfc_vector(self):
        client = scram.ScramClientExchange("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
        client._first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
        final = client.server_first(RFC_SERVER_FIRST.encode())
        self.assertEqual(final.decode(), RFC_CLIENT_FINAL)
        client.server_final(RFC_SERVER_FINAL.encode())
        self.assertRaises(ValueError, client.server_final, b"v=" + base64.b64encode(b"x" * 32))

    def test_wrong_server_signature(self):
        server = scram.ScramServerExchange(scram.make_secret("pw"))
        client = scram.ScramClientExchange("bob", "pw")
        mech, first = client.start(["SCRAM-SHA-256"])
        client.server_first(server.client_first(mech, first))
        self.assertRaises(ValueError, client.server_final, b"v=" + base64.b64encode(b"x" * 32))
        self.assertRaises(ValueError, client.server_final, b"e=invalid-proof")

    def test_passthrough(self):
        """A client proves its password to the pooler, which keeps the
        ClientKey and logs in to a server holding the same secret with it."""
        scram.forget_client_keys()
        secret = scram.make_secret("pw")
        stored = str(secret)
        client = scram.ScramClientExchange("bob", stored)
        self.assertRaises(ValueError, client.start, ["SCRAM-SHA-256"])   # no key yet
        front = scram.ScramServerExchange(scram.secret_for(stored))
        scramp_login(front, "pw")
        scram.remember_client_key(front.client_key)
        self.assertEqual(scram.client_key_for(secret), front.client_key)
        self._pair(stored, secret)

    def test_passthrough_salt_mismatch(self):
        scram.forget_client_keys()
        secret = scram.make_secret("pw")
        front = scram.ScramServerExchange(secret)
        scramp_login(front, "pw")
        scram.remember_client_key(front.client_key)
        other = scram.make_secret("pw")         # same password, another salt
        server = scram.ScramServerExchange(other)
        client = scram.ScramClientExchange("bob", str(secret))
        mech, first = client.start(["SCRAM-SHA-256"])
        e = self.assertRaises(ValueError, client.server_first, server.client_first(mech, first))
        self.assertIn("differs", str(e))

    def test_no_scram_offered(self):
        client = scram.ScramClientExchange("bob", "pw")
        self.assertRaises(ValueError, client.start, ["SCRAM-SHA-1"])

    def test_server_nonce_must_extend(self):
        client = scram.ScramClientExchange("bob", "pw", nonce="abc")
        client.start(["SCRAM-SHA-256"])
        self.assertRaises(ValueError, client.server_first, b"r=xyz,s=c2FsdA==,i=4096")
        self.assertRaises(ValueError, client.server_first, b"r=abcd,s=c2FsdA==,i=0")


# --- through the pooler ----------------------------------------------------------------


def md5_secret(user, password):
    return "md5" + md5_auth.inner_hash(user, password)


def connect_error(dsn):
    try:
        psycopg.connect(dsn).close()
    except psycopg.OperationalError as e:
        return str(e)
    return None


class ScramLoginTests(PoolerTestCase):
    """auth_type = "scram-sha-256" with plaintext passwords."""

    users = {
        "pgcat_scram": 'auth_type = "scram-sha-256"',
        "pgcat_md5": 'auth_type = "scram-sha-256"',
        "pgcat_clear": "",  # md5
    }

    def _current_user(self, **kw):
        def run():
            with psycopg.connect(self.pooler.dsn(**kw)) as conn:
                return conn.execute("select current_user").fetchone()[0]
        return in_thread(run)

    @defer.inlineCallbacks
    def test_psycopg_scram(self):
        # require_auth makes libpq refuse any other method.
        for user in ("pgcat_scram", "pgcat_md5"):
            who = yield self._current_user(user=user, require_auth="scram-sha-256")
            self.assertEqual(who, user)

    @defer.inlineCallbacks
    def test_md5_user_still_md5(self):
        who = yield self._current_user(user="pgcat_clear", require_auth="md5")
        self.assertEqual(who, "pgcat_clear")

    @defer.inlineCallbacks
    def test_psql_scram(self):
        out, err, code = yield self.pooler.psql("select current_user", user="pgcat_scram")
        self.assertEqual((code, out.strip()), (0, b"pgcat_scram"), err)

    @defer.inlineCallbacks
    def test_asyncpg_scram(self):
        async def go():
            conn = await asyncpg.connect(host="127.0.0.1", port=self.pooler.port,
                                         user="pgcat_scram", password=USERS["pgcat_scram"],
                                         database="pgcat_test", ssl=False, timeout=10,
                                         statement_cache_size=0)
            try:
                return await conn.fetchval("select current_user")
            finally:
                await conn.close()
        who = yield in_thread(asyncio.run, go())
        self.assertEqual(who, "pgcat_scram")

    @defer.inlineCallbacks
    def test_asyncpg_wrong_password(self):
        async def go():
            try:
                await asyncpg.connect(host="127.0.0.1", port=self.pooler.port,
                                      user="pgcat_scram", password="nope",
                                      database="pgcat_test", ssl=False, timeout=10)
            except asyncpg.InvalidPasswordError as e:
                return e.sqlstate, str(e)
            return None
        res = yield in_thread(asyncio.run, go())
        self.assertEqual(res, ("28P01", 'password authentication failed for user "pgcat_scram"'))

    @defer.inlineCallbacks
    def test_wrong_passwords_same_message(self):
        for user in ("pgcat_scram", "pgcat_md5", "pgcat_clear"):
            e = yield in_thread(connect_error, self.pooler.dsn(user=user, password="wrong"))
            self.assertIn(f'FATAL:  password authentication failed for user "{user}"', e)


class StoredSecretTests(PoolerTestCase):
    """Passwords in the config as md5 and SCRAM secrets (no plaintext)."""

    users = None

    @defer.inlineCallbacks
    def setUp(self):
        from tests.pgharness import topology
        from twisted.internet import threads
        self.topo = yield threads.deferToThread(topology)
        self.primary = self.topo.primary
        # The very secret PostgreSQL stores for pgcat_scram.
        self.scram_secret = yield self.primary_sql(
            "select rolpassword from pg_authid where rolname = 'pgcat_scram'", db="postgres")
        self.assertTrue(self.scram_secret.startswith("SCRAM-SHA-256$"))
        scram.forget_client_keys()
        md5s = md5_secret("pgcat_md5", USERS["pgcat_md5"])
        self.users = {
            "pgcat_md5": f'password = "{md5s}"',
            "pgcat_scram": f'password = "{self.scram_secret}"\nauth_type = "scram-sha-256"',
            # auth_type md5 with a SCRAM secret: SCRAM, as in PostgreSQL.
            "pgcat_clear": f'password = "{self.scram_secret}"\nserver_username = "pgcat_scram"',
        }
        yield self.start_pooler(users=self.users)

    def test_no_cleartext_in_config(self):
        for user in self.pooler.config.pools[0].users:
            self.assertTrue(md5_auth.is_md5_secret(user.password)
                            or scram.is_scram_secret(user.password), user.password)

    @defer.inlineCallbacks
    def test_md5_secret(self):
        def run():
            with psycopg.connect(self.pooler.dsn(user="pgcat_md5", require_auth="md5")) as c:
                return c.execute("select current_user").fetchone()[0]
        self.assertEqual((yield in_thread(run)), "pgcat_md5")
        e = yield in_thread(connect_error, self.pooler.dsn(user="pgcat_md5", password="x"))
        self.assertIn('password authentication failed for user "pgcat_md5"', e)

    @defer.inlineCallbacks
    def test_scram_secret_passthrough(self):
        """The pooler logs in to PostgreSQL (SCRAM) with the keys of the
        client's SCRAM login: no plaintext anywhere."""
        def run(user):
            with psycopg.connect(self.pooler.dsn(user=user, password="scram_pw",
                                                 require_auth="scram-sha-256")) as c:
                return c.execute("select current_user, 1").fetchone()
        self.assertEqual((yield in_thread(run, "pgcat_scram")), ("pgcat_scram", 1))
        # A second client reuses the server connection or makes new ones.
        self.assertEqual((yield in_thread(run, "pgcat_scram")), ("pgcat_scram", 1))
        # auth_type md5 + SCRAM secret -> SCRAM; server user pgcat_scram.
        self.assertEqual((yield in_thread(run, "pgcat_clear")), ("pgcat_scram", 1))
        e = yield in_thread(connect_error, self.pooler.dsn(user="pgcat_scram", password="x"))
        self.assertIn('password authentication failed for user "pgcat_scram"', e)

    @defer.inlineCallbacks
    def test_scram_secret_with_asyncpg(self):
        async def go():
            conn = await asyncpg.connect(host="127.0.0.1", port=self.pooler.port,
                                         user="pgcat_scram", password="scram_pw",
                                         database="pgcat_test", ssl=False, timeout=10,
                                         statement_cache_size=0)
            try:
                return await conn.fetchval("select current_user")
            finally:
                await conn.close()
        self.assertEqual((yield in_thread(asyncio.run, go())), "pgcat_scram")

    @defer.inlineCallbacks
    def test_server_login_needs_a_client_first(self):
        """Before any client proved the password, no server connection can be
        made for a SCRAM secret; the reason is clear."""
        up = self.pooler.cluster.user_pools[("pgcat_test", "pgcat_scram")]
        e = yield self.assertFailure(up.server_pool().acquire(), Exception)
        self.assertIn("SCRAM secret", str(e))


class ChannelBindingTests(PoolerTestCase):
    """SCRAM-SHA-256-PLUS with tls-server-end-point when the client is on TLS."""

    users = {"pgcat_scram": 'auth_type = "scram-sha-256"'}

    @defer.inlineCallbacks
    def setUp(self):
        self.certs = CertSet(self.mktemp())
        self.general = self.certs.general_toml()
        yield PoolerTestCase.setUp(self)

    def _login(self, **kw):
        def run():
            dsn = self.pooler.dsn(user="pgcat_scram", **kw).replace("sslmode=disable", "")
            with psycopg.connect(dsn) as c:
                return (c.execute("select current_user").fetchone()[0], c.pgconn.ssl_in_use)
        return in_thread(run)

    @defer.inlineCallbacks
    def test_channel_binding_required(self):
        res = yield self._login(sslmode="require", channel_binding="require")
        self.assertEqual(res, ("pgcat_scram", True))

    @defer.inlineCallbacks
    def test_channel_binding_verify_full(self):
        res = yield self._login(sslmode="verify-full", sslrootcert=self.certs.ca,
                                channel_binding="require")
        self.assertEqual(res, ("pgcat_scram", True))

    @defer.inlineCallbacks
    def test_channel_binding_disabled(self):
        res = yield self._login(sslmode="require", channel_binding="disable")
        self.assertEqual(res, ("pgcat_scram", True))

    @defer.inlineCallbacks
    def test_plaintext_cannot_bind(self):
        e = yield in_thread(connect_error, self.pooler.dsn(user="pgcat_scram",
                                                           channel_binding="require"))
        self.assertIn("channel binding", e)

    @defer.inlineCallbacks
    def test_psql_channel_binding(self):
        env = self.pooler.env("pgcat_scram")
        env["PGSSLMODE"] = "require"
        env["PGCHANNELBINDING"] = "require"
        from twisted.internet import utils
        from tests.support import PSQL
        out, err, code = yield utils.getProcessOutputAndValue(
            PSQL, ["-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.pooler.port),
                   "-U", "pgcat_scram", "-d", "pgcat_test", "-c", "select current_user"],
            env=env)
        self.assertEqual((code, out.strip()), (0, b"pgcat_scram"), err)

    @defer.inlineCallbacks
    def test_asyncpg_over_tls(self):
        """asyncpg has no channel binding: it picks SCRAM-SHA-256 among the
        offered mechanisms on a TLS connection."""
        import ssl as ssl_mod

        ctx = ssl_mod.create_default_context(cafile=self.certs.ca)

        async def go():
            conn = await asyncpg.connect(host="127.0.0.1", port=self.pooler.port,
                                         user="pgcat_scram", password=USERS["pgcat_scram"],
                                         database="pgcat_test", ssl=ctx, timeout=10,
                                         statement_cache_size=0)
            try:
                return (await conn.fetchval("select current_user"),
                        conn._transport.get_extra_info("ssl_object") is not None)
            finally:
                await conn.close()
        res = yield in_thread(asyncio.run, go())
        self.assertEqual(res, ("pgcat_scram", True))

    @defer.inlineCallbacks
    def test_wrong_password_over_tls(self):
        e = yield in_thread(connect_error, self.pooler.dsn(
            user="pgcat_scram", password="nope").replace("sslmode=disable", "sslmode=require"))
        self.assertIn('password authentication failed for user "pgcat_scram"', e)
