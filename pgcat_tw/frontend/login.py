"""The login phase of a client connection: from the StartupMessage to the
greeting.

Pool lookup (``database`` defaults to the user name), TLS requirements,
authentication (trust, md5, SCRAM-SHA-256 with or without channel binding,
a secret fetched by auth_query) and the greeting: AuthenticationOk, the
ParameterStatus set of a real server of the pool (the client's own values
where it sent them, in the server's spelling), the pooler's own
BackendKeyData, ReadyForQuery. A ``Login`` object runs it and is dropped
after it; it hands a ``session.Session`` record and the bytes not consumed
yet to ``ClientProtocol.logged_in``.
"""

import os
import struct

from twisted.internet import defer
from twisted.logger import Logger

from pgcat_tw.auth import md5 as md5_auth
from pgcat_tw.auth.md5 import is_md5_secret
from pgcat_tw.auth.scram import (
    ScramAuthFailed,
    ScramProtocolError,
    ScramServerExchange,
    is_scram_secret,
    mock_secret,
    remember_client_key,
    secret_for,
)
from pgcat_tw.admin import console
from pgcat_tw.auth_query import AuthQueries
from pgcat_tw.backend import RESET_TIMEOUT
from pgcat_tw.cluster import set_parameter_sql
from pgcat_tw.errors import (
    AuthenticationFailed,
    InvalidAuthorization,
    PgError,
    ProtocolViolation,
    ServerConnectionFailed,
    UnknownDatabase,
)
from pgcat_tw.frontend.session import Session
from pgcat_tw.frontend.startup import channel_binding
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import FramingError, MessageBuffer
from pgcat_tw.relay import TRACKED_PARAMETERS, ParameterValues

log = Logger()

# PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH: an unauthenticated client cannot
# make the pooler buffer more than this.
MAX_AUTH_MESSAGE = 65535
_TRACKED = frozenset(TRACKED_PARAMETERS)


def _spelled_as_sent(name, value):
    """A value every server takes and reports as sent: an application_name
    of printable ASCII shorter than NAMEDATALEN (PostgreSQL truncates longer
    ones and replaces other bytes). Such a login needs no server to learn
    the spelling."""
    return name == "application_name" and len(value) < 64 and value.isascii() \
        and value.isprintable()


class Login:
    """One client's login. ``client``: its ClientProtocol; ``startup``: the
    finished startup phase (what it knows of TLS)."""

    _secret = None            # the password or secret the client is checked against
    _scram = None             # ScramServerExchange while it runs
    _salt = None
    admin = False             # a login to the admin console

    def __init__(self, client, params, startup, rest=b""):
        self.client = client
        self.tls = startup.tls
        self.tls_direct = startup.tls_direct
        self.buf = MessageBuffer()
        self.buf.max_len = MAX_AUTH_MESSAGE
        if rest:
            self.buf.feed(rest)
        self.startup_params = params
        self.user = None
        self.database = None
        self.pool_cfg = None
        self.user_cfg = None
        self.user_pool = None

    @property
    def closing(self):
        client = self.client
        return client.transport is None or client._closing

    def start(self):
        client = self.client
        factory = client.factory
        params = self.startup_params
        user = params.get("user")
        if not user:
            client._fatal(InvalidAuthorization(
                "no PostgreSQL user name specified in startup packet"))
            return
        database = params.get("database") or user
        if factory.draining and database not in console.ADMIN_DATABASES:
            # (Admin sessions are still accepted during a graceful shutdown.)
            client._fatal(PgError("the pooler is shutting down", sqlstate="57P03",
                                  severity="FATAL"))
            return
        self.user, self.database = user, database
        client.user, client.database = user, database
        cluster = factory.get_cluster()
        if cluster.config.general.log_client_connections:
            log.info("client connected: user={user} database={database} peer={peer}",
                     user=user, database=database, peer=str(client.peer))
        if cluster.config.general.tls_require and not self.tls:
            client._fatal(InvalidAuthorization(
                f'connection for user "{user}" refused: TLS is required (tls_require) and '
                "this connection is not encrypted; connect with sslmode=require"))
            return
        if database in console.ADMIN_DATABASES and cluster.config.pool(database) is None:
            self._admin_login(cluster.config.general)
            return
        limit = factory.limits.admit(client, cluster.config, database, user)
        if limit is not None:
            client._fatal(PgError(limit, sqlstate="53300", severity="FATAL"))
            return
        self._find_pool(cluster)

    def _admin_login(self, general):
        """The admin console: ``admin_username`` only, with
        ``admin_password`` (md5, SCRAM-SHA-256, a stored secret) or
        ``admin_auth_type = "trust"``."""
        self.admin = True
        if self.user != general.admin_username:
            self.client._fatal(InvalidAuthorization(
                f'user "{self.user}" is not allowed to connect to the admin database '
                f'"{self.database}"'))
            return
        if general.admin_auth_type == "trust":
            self._authenticated()
        else:
            self._start_auth(general.admin_auth_type, general.admin_password)

    def _find_pool(self, cluster):
        client = self.client
        user, database = self.user, self.database
        pool_cfg, user_cfg, user_pool = cluster.find(database, user)
        if pool_cfg is None:
            client._fatal(UnknownDatabase(f'no pool configured for database "{database}"'))
            return
        if user_cfg is None and not pool_cfg.auth_query_configured:
            client._fatal(InvalidAuthorization(
                f'no user "{user}" configured in pool "{database}"'))
            return
        self.pool_cfg = pool_cfg
        self.user_pool = user_pool
        self.user_cfg = user_cfg
        if user_cfg is not None and user_cfg.auth_type == "trust":
            self._authenticated()
        elif user_cfg is not None and user_cfg.password is not None:
            self._start_auth(user_cfg.auth_type, user_cfg.password)
        else:
            # auth_query: the secret comes from PostgreSQL; whatever the
            # client sends meanwhile waits in the buffer.
            client.dataReceived = self._auth_wait_data
            factory = client.factory
            queries = factory.auth_queries
            if queries is None:
                queries = factory.auth_queries = AuthQueries(client.reactor, factory.tls)
            d = queries.fetch(cluster.config, pool_cfg, user)
            d.addCallbacks(self._secret_fetched, self._secret_fetch_failed)

    def _auth_wait_data(self, data):
        # Nothing is expected before the authentication request.
        self.buf.feed(data)
        if len(self.buf) > MAX_AUTH_MESSAGE + 5:
            self.client._fatal(ProtocolViolation(
                "unexpected data before the authentication request"))

    # --- authentication ---------------------------------------------------------------

    def _start_auth(self, method, secret):
        """Ask for the password. ``method``: the user's auth_type (md5 or
        scram-sha-256); ``secret``: plaintext, md5 secret, SCRAM secret, or
        None for a user that does not exist (then a SCRAM exchange runs to
        its end and fails like a wrong password)."""
        client = self.client
        self._secret = secret
        if method == "md5" and secret is not None and not is_scram_secret(secret):
            self._salt = os.urandom(4)
            client.transport.write(m.auth_md5(self._salt))
            client.dataReceived = self._password_data
            if len(self.buf):
                self._password_data(b"")
            return
        # SCRAM-SHA-256; also for auth_type md5 with a SCRAM secret, as
        # PostgreSQL does.
        mock = secret is None
        scram_secret = None
        if not mock:
            try:
                scram_secret = secret_for(secret)
            except ValueError as e:
                log.warn('user "{user}" cannot log in with SCRAM: {reason}',
                         user=self.user, reason=str(e))
                mock = True
        if mock:
            scram_secret = mock_secret(self.user)
        binding = channel_binding(client.transport) if self.tls else None
        ex = ScramServerExchange(scram_secret, channel_binding=binding, mock=mock)
        # A stored SCRAM secret: keep the client's key to log in to servers.
        ex.passthrough = not mock and is_scram_secret(secret)
        self._scram = ex
        client.transport.write(m.auth_sasl(ex.mechanisms))
        client.dataReceived = self._sasl_data
        if len(self.buf):
            self._sasl_data(b"")

    def _secret_fetched(self, secret):
        if self.closing:
            return
        if secret is not None and not (is_md5_secret(secret) or is_scram_secret(secret)):
            log.warn('pool "{pool}": auth_query returned something that is neither an md5 '
                     'nor a SCRAM-SHA-256 secret for user "{user}"', pool=self.pool_cfg.name,
                     user=self.user)
        method = self.user_cfg.auth_type if self.user_cfg is not None else "md5"
        self._start_auth(method, secret)

    def _secret_fetch_failed(self, failure):
        if self.closing:
            return
        # The reason is logged (auth_query.py); the client learns nothing
        # about the user from it.
        self.client._fatal(ServerConnectionFailed(
            "authentication failed: the password could not be looked up (auth_query)",
            severity="FATAL"))

    def _auth_failed(self):
        # One message whatever was wrong: the password, the user, the method.
        self.client._fatal(AuthenticationFailed(
            f'password authentication failed for user "{self.user}"'))

    def _sasl_data(self, data):
        client = self.client
        self.buf.feed(data)
        while client.dataReceived == self._sasl_data and not client._closing:
            body = self._next_password_message("SASL response")
            if body is None:
                return
            ex = self._scram
            try:
                if ex.mechanism is None:
                    mechanism, first = m.parse_sasl_initial_response(body)
                    client.transport.write(
                        m.auth_sasl_continue(ex.client_first(mechanism, first)))
                    continue
                final = ex.client_final(body)
            except ScramAuthFailed:
                self._auth_failed()
                return
            except (ScramProtocolError, ValueError, struct.error) as e:
                client._fatal(ProtocolViolation(f"malformed SCRAM message: {e}"
                                                if not isinstance(e, ScramProtocolError)
                                                else str(e)))
                return
            if ex.passthrough:
                remember_client_key(ex.client_key)
            self._scram = None
            client.transport.write(m.auth_sasl_final(final))
            self._password_ok()
            return

    def _next_password_message(self, what):
        """The next PasswordMessage body from the buffer; None when it is
        incomplete or the client sent something else (then it was told)."""
        try:
            msg = self.buf.next_message()
        except FramingError as e:
            self.client._fatal(ProtocolViolation(e.message))
            return None
        if msg is None:
            return None
        t, body = msg
        if t != codes.F_PASSWORD:
            self.client._fatal(ProtocolViolation(
                f"expected {what}, got message type {chr(t)!r}"))
            return None
        return body

    def _password_data(self, data):
        self.buf.feed(data)
        body = self._next_password_message("password response")
        if body is None:
            return
        if not md5_auth.verify(self.user, self._secret or "", self._salt, body):
            self._auth_failed()
            return
        self._password_ok()

    def _password_ok(self):
        """The client proved its password: bind it to its pool (a user that
        only auth_query knows gets one now) and log in."""
        if self.admin:
            self._authenticated()
            return
        if self.user_pool is None or self.user_cfg is None \
                or self.user_cfg.password is None:
            cluster = self.client.factory.get_cluster()
            pool_cfg = cluster.config.pool(self.database)
            if pool_cfg is None:
                self.client._fatal(UnknownDatabase(
                    f'no pool configured for database "{self.database}"'))
                return
            up = self.user_pool
            if up is None or up.closed:
                _, _, up = cluster.find(self.database, self.user)
                if up is None:
                    up = cluster.add_auth_query_user(pool_cfg, self.user)
                self.pool_cfg, self.user_pool = pool_cfg, up
            ucfg = up.user_cfg
            if ucfg.server_password is None and ucfg.password is None \
                    and ucfg.server_username in (None, self.user) and self._secret:
                # The secret auth_query fetched logs in to the servers too.
                up.server_password = self._secret
                up.password_learned = True
            self.user_cfg = ucfg
        self._authenticated()

    # --- the greeting ----------------------------------------------------------------

    def _authenticated(self):
        client = self.client
        client.dataReceived = self._login_wait_data
        if self.admin:
            key = client.factory.cancel_keys.register(client)
            session = Session(self.user, self.database, startup_params=self.startup_params,
                              key=key, tls=self.tls, tls_direct=self.tls_direct, admin=True)
            client.transport.write(console.greeting(key))
            client.logged_in(session, self.buf.take_rest())
            return
        d = self._greet()
        d.addErrback(self._login_failed)

    def _login_wait_data(self, data):
        # The client may pipeline its first query after the password.
        self.buf.feed(data)

    def _login_failed(self, failure):
        err = failure.value
        if not isinstance(err, PgError):
            log.failure("login failed", failure)
            err = ServerConnectionFailed(f"login failed: {failure.getErrorMessage()}")
        if isinstance(err, ServerConnectionFailed):
            err = ServerConnectionFailed(
                f'pool "{self.database}" is down: {err.message}', sqlstate=err.sqlstate)
        self.client._fatal(err)

    @defer.inlineCallbacks
    def _greet(self):
        up = self.user_pool
        ref = yield up.get_reference_params()
        if self.closing:
            return
        # The client's tracked values: the pool's unless it sent its own.
        desired = {k: ref[k] for k in TRACKED_PARAMETERS if k in ref}
        wanted = {k: v for k, v in self.startup_params.items() if k in _TRACKED}
        unknown = [(k, v) for k, v in wanted.items()
                   if v != ref.get(k) and (k, v) not in up.canonical
                   and not _spelled_as_sent(k, v)]
        if unknown:
            yield self._learn_canonical(unknown)
            if self.closing:
                return
        for k, v in wanted.items():
            desired[k] = up.canonical.get((k, v), v)
        client = self.client
        greeting = [m.auth_ok()]
        for name, value in ref.items():
            greeting.append(m.parameter_status(name, desired.get(name, value)))
        key = client.factory.cancel_keys.register(client)
        greeting.append(m.backend_key_data(*key))
        greeting.append(m.READY_IDLE)
        session = Session(self.user, self.database, self.pool_cfg, self.user_cfg, up,
                          self.startup_params, ParameterValues(desired), key,
                          self.tls, self.tls_direct)
        up.logins += 1
        client.transport.write(b"".join(greeting))
        client.logged_in(session, self.buf.take_rest())

    @defer.inlineCallbacks
    def _learn_canonical(self, items):
        """Apply startup values on a server once to validate them and learn
        the server's spelling (``utf8`` -> ``UTF8``). A login-time need: it
        waits for one transaction's turn, not behind the work queue."""
        pool = self.user_pool.server_pool()
        conn = yield pool.acquire(urgent=True)
        try:
            results = yield conn.run([set_parameter_sql(k, v) for k, v in items],
                                     timeout=RESET_TIMEOUT)
        except Exception:
            pool.discard(conn)
            raise
        pool.release(conn)
        for (k, v), r in zip(items, results):
            if r.error:
                raise PgError(r.error.get("M", "invalid parameter value"),
                              sqlstate=r.error.get("C", "22023"), severity="FATAL")
            self.user_pool.canonical[(k, v)] = conn.params.get(k, v)
