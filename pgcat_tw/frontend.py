"""The client side: one ClientProtocol per application connection.

Startup phase: SSLRequest / GSSENCRequest (answered 'N'), CancelRequest,
StartupMessage 3.0 (NegotiateProtocolVersion for newer minors and ``_pq_``
options), then authentication and the greeting (ParameterStatus taken from
a real server connection of the pool, the pooler's own BackendKeyData).

Work phase: every chunk the client sends is scanned (relay.ClientScanner)
and, when a server is bound, forwarded to it verbatim. Without a server the
chunk is held, the client transport is paused and a server is checked out:
synchronously when one is idle, through the pool's Deferred otherwise.
In transaction mode the server goes back to the pool at the first
ReadyForQuery 'I' that leaves no request of the client unanswered; in
session mode at disconnect, after ``DISCARD ALL``.
"""

import os
import re
import struct

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides

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
from pgcat_tw.auth_query import AuthQueries
from pgcat_tw.backend import set_keepalive
from pgcat_tw.cancel import forward_cancel
from pgcat_tw.cluster import set_parameter_sql
from pgcat_tw.errors import (
    AuthenticationFailed,
    InvalidAuthorization,
    PgError,
    ProtocolViolation,
    ServerConnectionFailed,
    UnknownDatabase,
)
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import SKIP, FramingError, MessageBuffer, Scanner, want_table
from pgcat_tw.relay import (
    TRACKED_PARAMETERS,
    ClientScanner,
    ParameterValues,
    detach_producer,
    writer_for,
)
from pgcat_tw.tls import ALPN_PROTOCOL, end_point_hash
from pgcat_tw.pool import Waiter
from pgcat_tw.prepared import Rewriter, ServerStatements
from pgcat_tw.router import custom
from pgcat_tw.router import sql as sqlcmd

log = Logger()

LOGIN_TIMEOUT = 60.0     # seconds a client may take to log in (PgBouncer's default)
RESET_TIMEOUT = 10.0     # seconds for ROLLBACK / DISCARD ALL before the server is closed
HOLD_LIMIT = 65536       # bytes held for a waiting client before it is paused
REQUEST_KEEP_LIMIT = 65536  # request bytes kept for a possible re-send (see request_chunks)
_LEN = struct.Struct("!i")
_MAYBE_COMMAND = re.compile(rb"\s*(?:set|show|prepare|execute|deallocate|discard)\s",
                            re.IGNORECASE)
_TRACKED = frozenset(TRACKED_PARAMETERS)
_ADMIN_DATABASES = ("pgcat", "pgbouncer")


# Everything DISCARD ALL does but DEALLOCATE ALL (shared prepared statements stay).
KEEP_STATEMENTS_RESET = ("CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; "
                         "UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; "
                         "DISCARD SEQUENCES")


class _SyncFinder(Scanner):
    """Finds where the next Sync ends, over chunks (skip-to-Sync after an error)."""

    def __init__(self):
        Scanner.__init__(self, want_table({"S": 1}, default=SKIP))
        self.sync_end = -1

    def feed(self, data):
        self.sync_end = -1
        try:
            Scanner.feed(self, data)
        except _SyncFound:
            pass  # the finder is dropped once the Sync is found

    def on_message(self, t, buf, start, end):
        self.sync_end = end  # a Sync has an empty body: it ends where it starts
        raise _SyncFound()


class _SyncFound(Exception):
    pass


def _shutdown_error():
    return PgError("terminating connection due to administrator command",
                   sqlstate="57P01", severity="FATAL")


class ClientFactory(Factory):
    noisy = False
    draining = False
    tls = None            # tls.TLSState of the service (None: no TLS at all)
    auth_queries = None   # auth_query.AuthQueries (made on first use if None)

    def __init__(self, reactor, get_cluster, cancel_keys):
        self.reactor = reactor
        self.get_cluster = get_cluster  # callable: the Cluster in force now
        self.cancel_keys = cancel_keys
        self.clients = set()

    def buildProtocol(self, addr):
        p = ClientProtocol(self)
        p.peer = addr
        return p


class ClientProtocol(Protocol):
    peer = None
    shard = 0                 # shard of the next transaction (set by sharding)
    _tried = None             # addresses tried by the running checkout

    def __init__(self, factory):
        self.factory = factory
        self.reactor = factory.reactor
        self._buf = MessageBuffer()
        self.user = None
        self.database = None
        self.user_pool = None
        self.transaction_mode = True
        self.params = {}
        self.startup_params = {}
        self.key = None
        self.server = None
        self._server_transport = None
        self._write_server = None
        self.scanner = None
        self._held = []
        self._held_len = 0
        self._paused_waiting = False
        self.writer = None            # how servers write to this client
        self._waiting = None          # (pool, Waiter) while queued for a server
        # The one Waiter this client queues with (it waits on one pool at a
        # time), and the balancer epoch under which its pool was chosen.
        self._waiter = Waiter(self._got_server, self._checkout_failed, 0.0)
        self._wait_epoch = -1
        self._checking_out = False
        self._login_timer = None
        self._closing = False
        self.connected_at = self.reactor.seconds()
        self.draining = False
        self.role = "any"
        self.primary_reads = False
        # Chunks sent to the current server since it was bound (transaction
        # mode), so a read whose server dies before answering can be re-sent
        # elsewhere; None when not kept (session mode, or too large).
        self.request_chunks = None
        self._request_bytes = 0
        self.rewriter = None          # prepared.Rewriter in transaction mode with a cache
        self._discard_until_sync = None  # a Scanner while skipping to Sync after an error
        self.dataReceived = self._startup_data

    # --- connection -----------------------------------------------------------

    def connectionMade(self):
        self.factory.clients.add(self)
        self.writer = writer_for(self.transport)
        g = self.factory.get_cluster().config.general
        set_keepalive(self.transport, g.tcp_keepalives_idle, g.tcp_keepalives_interval,
                      g.tcp_keepalives_count, g.tcp_user_timeout)
        self._login_timer = self.reactor.callLater(LOGIN_TIMEOUT, self._login_timeout)

    def _login_timeout(self):
        self._login_timer = None
        self._fatal(ProtocolViolation("login timeout: no complete startup and authentication "
                                      f"within {LOGIN_TIMEOUT:.0f} s", sqlstate="08P01"))

    def _send_error(self, err):
        if self.transport is not None and not self._closing:
            self.transport.write(err.to_message())

    def _fatal(self, err):
        """Tell the client (FATAL) and close."""
        if self._closing:
            return
        if err.severity not in ("FATAL", "PANIC"):
            err.severity = "FATAL"
        self._send_error(err)
        self._closing = True
        self.transport.loseConnection()

    # --- startup phase ------------------------------------------------------------

    _tls = False              # the client connection is encrypted
    _tls_direct = False       # ... by PostgreSQL 17's direct TLS (no SSLRequest)
    _started = False          # a startup packet has been read
    _secret = None            # the password or secret the client is checked against
    _scram = None             # auth.scram.ScramServerExchange while it runs

    def _startup_data(self, data):
        if data[:1] == b"\x16" and not self._started and not self._tls and not len(self._buf):
            # A TLS ClientHello as the very first bytes: direct TLS
            # (sslnegotiation=direct); a startup packet cannot begin so.
            self._begin_direct_tls(data)
            return
        self._buf.feed(data)
        try:
            while self.dataReceived == self._startup_data and not self._closing:
                body = self._buf.next_startup()
                if body is None:
                    return
                self._on_startup_packet(body)
        except FramingError as e:
            self._fatal(ProtocolViolation(f"invalid startup packet: {e.message}"))
        except ValueError as e:
            self._fatal(ProtocolViolation(f"invalid startup packet: {e}"))

    def _on_startup_packet(self, body):
        if len(body) < 4:
            raise ValueError("too short")
        self._started = True
        (code,) = m._I32.unpack_from(body, 0)
        if code in (codes.SSL_REQUEST, codes.GSSENC_REQUEST):
            if len(body) != 4:
                raise ValueError("SSLRequest/GSSENCRequest with a payload")
            if self._tls:
                self._fatal(ProtocolViolation(
                    "SSLRequest or GSSENCRequest received on an encrypted connection"))
                return
            if len(self._buf):
                # Bytes pipelined after the request before our answer: they
                # would be taken as sent under TLS (CVE-2021-23214).
                self._fatal(ProtocolViolation(
                    "received unencrypted data after SSL or GSSAPI encryption request"))
                return
            options = self._tls_options() if code == codes.SSL_REQUEST else None
            if options is None:
                self.transport.write(b"N")
                return
            self.transport.write(b"S")
            self._start_tls(options)
            return
        if code == codes.CANCEL_REQUEST:
            if len(body) != 12:
                raise ValueError("CancelRequest of the wrong length")
            pid, secret = m._I32_PAIR.unpack_from(body, 4)
            self._on_cancel(pid, secret)
            self._closing = True
            self.transport.loseConnection()
            return
        major, minor = code >> 16, code & 0xFFFF
        if major != 3:
            self._fatal(ProtocolViolation(
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"))
            return
        params = m.parse_startup_params(body[4:])
        unknown_opts = [k for k in params if k.startswith("_pq_.")]
        if minor > 0 or unknown_opts:
            # Offer 3.0 and decline protocol extensions (the client decides).
            payload = (m._I32.pack(codes.PROTOCOL_3_0) + m._I32.pack(len(unknown_opts))
                       + b"".join(m.cstr(o) for o in unknown_opts))
            self.transport.write(m._msg(b"v", payload))
            for o in unknown_opts:
                del params[o]
        self._on_startup(params)

    # --- TLS ------------------------------------------------------------------------

    def _tls_options(self):
        tls = self.factory.tls
        return tls.client_options if tls is not None else None

    def _start_tls(self, options):
        self._tls = True
        alsoProvides(self, IHandshakeListener)
        self.transport.startTLS(options)
        # TLS transports are written through Twisted, not straight to the
        # socket (relay.plain_write).
        self.writer = writer_for(self.transport)

    def _begin_direct_tls(self, data):
        options = self._tls_options()
        if options is None:
            # Nothing a TLS client could read: just close.
            log.info("client {peer}: direct TLS connection refused, no tls_certificate "
                     "configured", peer=str(self.peer))
            self._closing = True
            self.transport.loseConnection()
            return
        self._tls_direct = True
        self._start_tls(options)
        tls_layer = getattr(self.transport, "protocol", None)
        if tls_layer is None or tls_layer is self:
            self._fatal(ProtocolViolation("direct TLS is not available on this transport"))
            return
        # The ClientHello arrived before TLS started: hand it to the TLS layer.
        tls_layer.dataReceived(data)

    def handshakeCompleted(self):
        """IHandshakeListener (declared once TLS starts). Direct TLS must
        negotiate ALPN "postgresql", as in PostgreSQL 17."""
        if self._tls_direct:
            try:
                proto = self.transport.getHandle().get_alpn_proto_negotiated()
            except Exception:  # noqa: BLE001 - no ALPN support
                proto = None
            if proto != ALPN_PROTOCOL:
                self._fatal(ProtocolViolation(
                    "received direct SSL connection request without ALPN protocol "
                    "negotiation extension"))

    def _channel_binding(self):
        """tls-server-end-point data of this connection's certificate, or None."""
        if not self._tls:
            return None
        try:
            cert = self.transport.getHandle().get_certificate()
        except Exception:  # noqa: BLE001
            return None
        return end_point_hash(cert) if cert is not None else None

    def _on_cancel(self, pid, secret):
        client = self.factory.cancel_keys.lookup(pid, secret)
        if client is None:
            return
        server = client.server
        if server is None:
            return
        forward_cancel(self.reactor, server.host, server.port, server.pid, server.secret)

    def _on_startup(self, params):
        if self.factory.draining:
            self._fatal(PgError("the pooler is shutting down", sqlstate="57P03",
                                severity="FATAL"))
            return
        user = params.get("user")
        if not user:
            self._fatal(InvalidAuthorization("no PostgreSQL user name specified in startup packet"))
            return
        database = params.get("database") or user
        self.user, self.database, self.startup_params = user, database, params
        cluster = self.factory.get_cluster()
        if cluster.config.general.log_client_connections:
            log.info("client connected: user={user} database={database} peer={peer}",
                     user=user, database=database, peer=str(self.peer))
        if cluster.config.general.tls_require and not self._tls:
            self._fatal(InvalidAuthorization(
                f'connection for user "{user}" refused: TLS is required (tls_require) and '
                "this connection is not encrypted; connect with sslmode=require"))
            return
        pool_cfg, user_cfg, user_pool = cluster.find(database, user)
        if pool_cfg is None:
            if database in _ADMIN_DATABASES:
                self._fatal(UnknownDatabase(
                    f'the admin database "{database}" is not available in this version'))
            else:
                self._fatal(UnknownDatabase(f'no pool configured for database "{database}"'))
            return
        auth_query = pool_cfg.auth_query_configured
        if user_cfg is None and not auth_query:
            self._fatal(InvalidAuthorization(
                f'no user "{user}" configured in pool "{database}"'))
            return
        if user_pool is not None:
            self._use_user_pool(pool_cfg, user_pool)
        self._user_cfg = user_cfg
        # PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH: an unauthenticated client
        # cannot make the pooler buffer more than this.
        self._buf.max_len = 65535
        if user_cfg is not None and user_cfg.auth_type == "trust":
            self._authenticated()
        elif user_cfg is not None and user_cfg.password is not None:
            self._start_auth(user_cfg.auth_type, user_cfg.password)
        else:
            # auth_query: the secret comes from PostgreSQL; whatever the
            # client sends meanwhile waits in the buffer.
            self.dataReceived = self._auth_wait_data
            queries = self.factory.auth_queries
            if queries is None:
                queries = self.factory.auth_queries = AuthQueries(self.reactor, self.factory.tls)
            d = queries.fetch(cluster.config, pool_cfg, user)
            d.addCallbacks(self._secret_fetched, self._secret_fetch_failed,
                           callbackArgs=(pool_cfg, user_cfg))

    def _auth_wait_data(self, data):
        # Nothing is expected before the authentication request.
        self._buf.feed(data)
        if len(self._buf) > 65540:
            self._fatal(ProtocolViolation("unexpected data before the authentication request"))

    def _use_user_pool(self, pool_cfg, user_pool):
        self.user_pool = user_pool
        self.transaction_mode = user_pool.mode == "transaction"
        self.role = pool_cfg.default_role          # 'primary' | 'replica' | 'any' | 'auto'
        self.primary_reads = pool_cfg.primary_reads_enabled
        if self.transaction_mode and user_pool.statement_cache is not None:
            self.rewriter = Rewriter(user_pool.statement_cache)

    # --- authentication ---------------------------------------------------------------

    def _start_auth(self, method, secret):
        """Ask for the password. ``method``: the user's auth_type (md5 or
        scram-sha-256); ``secret``: plaintext, md5 secret, SCRAM secret, or
        None for a user that does not exist (then a SCRAM exchange runs to
        its end and fails like a wrong password)."""
        self._secret = secret
        if method == "md5" and secret is not None and not is_scram_secret(secret):
            self._salt = os.urandom(4)
            self.transport.write(m.auth_md5(self._salt))
            self.dataReceived = self._password_data
            if len(self._buf):
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
        ex = ScramServerExchange(scram_secret, channel_binding=self._channel_binding(),
                                 mock=mock)
        # A stored SCRAM secret: keep the client's key to log in to servers.
        ex.passthrough = not mock and is_scram_secret(secret)
        self._scram = ex
        self.transport.write(m.auth_sasl(ex.mechanisms))
        self.dataReceived = self._sasl_data
        if len(self._buf):
            self._sasl_data(b"")

    def _secret_fetched(self, secret, pool_cfg, user_cfg):
        if self.transport is None or self._closing:
            return
        if secret is not None and not (is_md5_secret(secret) or is_scram_secret(secret)):
            log.warn('pool "{pool}": auth_query returned something that is neither an md5 '
                     'nor a SCRAM-SHA-256 secret for user "{user}"', pool=pool_cfg.name,
                     user=self.user)
        method = user_cfg.auth_type if user_cfg is not None else "md5"
        self._start_auth(method, secret)

    def _secret_fetch_failed(self, failure):
        if self.transport is None or self._closing:
            return
        # The reason is logged (auth_query.py); the client learns nothing
        # about the user from it.
        self._fatal(ServerConnectionFailed(
            "authentication failed: the password could not be looked up (auth_query)",
            severity="FATAL"))

    def _auth_failed(self):
        # One message whatever was wrong: the password, the user, the method.
        self._fatal(AuthenticationFailed(
            f'password authentication failed for user "{self.user}"'))

    def _sasl_data(self, data):
        self._buf.feed(data)
        while self.dataReceived == self._sasl_data and not self._closing:
            body = self._next_password_message("SASL response")
            if body is None:
                return
            ex = self._scram
            try:
                if ex.mechanism is None:
                    mechanism, first = m.parse_sasl_initial_response(body)
                    self.transport.write(m.auth_sasl_continue(ex.client_first(mechanism, first)))
                    continue
                final = ex.client_final(body)
            except ScramAuthFailed:
                self._auth_failed()
                return
            except (ScramProtocolError, ValueError, struct.error) as e:
                self._fatal(ProtocolViolation(f"malformed SCRAM message: {e}"
                                              if not isinstance(e, ScramProtocolError)
                                              else str(e)))
                return
            if ex.passthrough:
                remember_client_key(ex.client_key)
            self._scram = None
            self.transport.write(m.auth_sasl_final(final))
            self._password_ok()
            return

    def _password_ok(self):
        """The client proved its password: bind it to its pool (a user that
        only auth_query knows gets one now) and log in."""
        if self.user_pool is None or self._user_cfg is None \
                or self._user_cfg.password is None:
            cluster = self.factory.get_cluster()
            pool_cfg = cluster.config.pool(self.database)
            if pool_cfg is None:
                self._fatal(UnknownDatabase(f'no pool configured for database "{self.database}"'))
                return
            up = self.user_pool
            if up is None or up.closed:
                _, _, up = cluster.find(self.database, self.user)
                if up is None:
                    up = cluster.add_auth_query_user(pool_cfg, self.user)
                self._use_user_pool(pool_cfg, up)
            ucfg = up.user_cfg
            if ucfg.server_password is None and ucfg.password is None \
                    and ucfg.server_username in (None, self.user) and self._secret:
                # The secret auth_query fetched logs in to the servers too.
                up.server_password = self._secret
                up.password_learned = True
            self._user_cfg = ucfg
        self._authenticated()

    def _next_password_message(self, what):
        """The next PasswordMessage body from the buffer; None when it is
        incomplete or the client sent something else (then it was told)."""
        try:
            msg = self._buf.next_message()
        except FramingError as e:
            self._fatal(ProtocolViolation(e.message))
            return None
        if msg is None:
            return None
        t, body = msg
        if t != codes.F_PASSWORD:
            self._fatal(ProtocolViolation(f"expected {what}, got message type {chr(t)!r}"))
            return None
        return body

    def _password_data(self, data):
        self._buf.feed(data)
        body = self._next_password_message("password response")
        if body is None:
            return
        if not md5_auth.verify(self.user, self._secret or "", self._salt, body):
            self._auth_failed()
            return
        self._password_ok()

    # --- login ----------------------------------------------------------------------

    def _authenticated(self):
        self.dataReceived = self._login_wait_data
        d = self._login()
        d.addErrback(self._login_failed)

    def _login_wait_data(self, data):
        # The client may pipeline its first query after the password.
        self._buf.feed(data)

    def _login_failed(self, failure):
        err = failure.value
        if not isinstance(err, PgError):
            log.failure("login failed", failure)
            err = ServerConnectionFailed(f"login failed: {failure.getErrorMessage()}")
        if isinstance(err, ServerConnectionFailed):
            err = ServerConnectionFailed(
                f'pool "{self.database}" is down: {err.message}', sqlstate=err.sqlstate)
        self._fatal(err)

    @defer.inlineCallbacks
    def _login(self):
        up = self.user_pool
        ref = yield up.get_reference_params()
        if self.transport is None or self._closing:
            return
        # The client's tracked values: the pool's unless it sent its own.
        desired = {k: ref[k] for k in TRACKED_PARAMETERS if k in ref}
        wanted = {k: v for k, v in self.startup_params.items() if k in _TRACKED}
        unknown = [(k, v) for k, v in wanted.items()
                   if v != ref.get(k) and (k, v) not in up.canonical]
        if unknown:
            yield self._learn_canonical(unknown)
            if self.transport is None or self._closing:
                return
        for k, v in wanted.items():
            desired[k] = up.canonical.get((k, v), v)
        self.params = ParameterValues(desired)
        greeting = [m.auth_ok()]
        for name, value in ref.items():
            greeting.append(m.parameter_status(name, desired.get(name, value)))
        self.key = self.factory.cancel_keys.register(self)
        greeting.append(m.backend_key_data(*self.key))
        greeting.append(m.READY_IDLE)
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None
        self.transport.write(b"".join(greeting))
        self._enter_work_phase()

    @defer.inlineCallbacks
    def _learn_canonical(self, items):
        """Apply startup values on a server once to validate them and learn
        the server's spelling (``utf8`` -> ``UTF8``)."""
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

    # --- work phase ---------------------------------------------------------------------

    def _enter_work_phase(self):
        max_len = self.factory.get_cluster().config.general.max_packet_size
        self.scanner = ClientScanner(max_len)
        if type(self.params) is not ParameterValues:
            self.params = ParameterValues(self.params)
        self.scanner.params = self.params
        self.dataReceived = self._work_data
        rest = self._buf.take_rest()
        self._buf = None
        if rest:
            self._work_data(rest)

    def _work_data(self, data):
        sc = self.scanner
        try:
            sc.feed(data)
        except FramingError as e:
            self._protocol_error(e)
            return
        if sc.terminate_at is not None:
            self._on_terminate(data)
            return
        if sc.named_parse and self.transaction_mode and self.rewriter is None:
            self._reject_named_parse(data)
            return
        st = self._server_transport
        if st is not None:
            # One whole command-shaped simple Query (an anchored probe, no
            # allocation) that the pooler may answer itself.
            if data[0] == 81 and self.transaction_mode and sc.pending == 1 \
                    and _MAYBE_COMMAND.match(data, 5) is not None \
                    and len(data) == 1 + _LEN.unpack_from(data, 1)[0] \
                    and self.server.scanner.at_boundary and self._sql_command(data, True):
                return
            rw = self.rewriter
            if rw is not None:
                data = rw.process(data, self.server.stmts)
                if data:
                    self._write_server(st, data, self.transport)
            else:
                self._write_server(st, data, self.transport)
                rc = self.request_chunks
                if rc is not None:
                    self._request_bytes += len(data)
                    if self._request_bytes > REQUEST_KEEP_LIMIT:
                        self.request_chunks = None
                    else:
                        rc.append(data)
            if sc.copy_ended:
                self._after_copy_end()
            return
        if data[0] == 81 and not self._checking_out and sc.pending == 1 and not self._held \
                and _MAYBE_COMMAND.match(data, 5) is not None \
                and len(data) == 1 + _LEN.unpack_from(data, 1)[0]:
            # One whole simple Query between transactions that may be ours.
            cmd = custom.match(data, 5, len(data))
            if cmd is not None:
                sc.pending -= 1
                self._custom_command(*cmd)
                return
            if self.transaction_mode and self._sql_command(data, False):
                return
        if self.rewriter is not None and not self._checking_out and not self._held \
                and data[0] == codes.F_PARSE and sc.at_boundary:
            reply = self.rewriter.answer_locally(data)
            if reply is not None:
                sc.pending = 0
                sc.unsynced = False
                self.transport.write(reply)
                return
        if not self._checking_out:
            # Fast paths: an idle server of the balancer's pick, or else a
            # place in that address's queue (no idle server there at all).
            up = self.user_pool
            bal = up.balancer
            server = bal.take_idle(self.role, self.primary_reads, self.shard)
            self._checking_out = True
            self._held.append(data)
            self._held_len += len(data)
            if server is not None:
                self._wait_epoch = bal.epoch
                self._got_server(server)
                return
            pool = bal.picked
            if pool is not None and not pool.idle and not pool.closed and not up.closed:
                self._tried = None
                w = self._waiter
                self._waiting = (pool, w)
                self._wait_epoch = bal.epoch
                pool.enqueue(w)
                return
            self._checkout(False)
            return
        self._held.append(data)
        self._held_len += len(data)
        if not self._checking_out:
            self._checkout(False)
        elif self._held_len > HOLD_LIMIT and not self._paused_waiting:
            # Stop reading a client that keeps sending while it waits.
            self._paused_waiting = True
            self.transport.pauseProducing()

    def _protocol_error(self, err):
        # Whatever reached a server so far leaves it in an unknown state
        # (possibly a partial message): it is closed, never reset and reused.
        if self.server is not None:
            self.scanner.unsynced = True
        self._fatal(err)

    def _on_terminate(self, data):
        sc = self.scanner
        pos = sc.terminate_at
        sc.terminate_at = None
        if pos < 0:
            # The Terminate header started in the previous chunk, which went
            # to the server: it holds a partial message now.
            sc.unsynced = True
        elif pos > 0:
            if self.server is not None:
                head = data[:pos]
                if self.rewriter is not None:
                    head = self.rewriter.process(head, self.server.stmts)
                if head:
                    self._write_server(self._server_transport, head, self.transport)
            else:
                self._held.append(data[:pos])
        self._closing = True
        self.transport.loseConnection()

    # --- checkout -----------------------------------------------------------------------

    def _checkout(self, try_idle=True):
        """The slow path of a checkout (the fast one, an idle fresh server
        of the balancer's pick, is in ``_work_data``): the balancer picks an
        address for (shard, role); its idle server is health-checked first
        if it rested longer than healthcheck_delay; without one the client
        queues on that address. A connect error or timeout, a failed health
        check or a lost server bans a replica and the transaction goes to
        the next candidate; an exhausted pool bans nobody (its error says
        so)."""
        self._checking_out = True
        # The wait begins now; a move to another address keeps this place
        # (pool.requeue).
        self._waiter.since = self.reactor.seconds()
        up = self.user_pool
        if up.closed:
            # The configuration was reloaded: use the pool in force now.
            _, _, fresh = self.factory.get_cluster().find(self.database, self.user)
            if fresh is not None:
                self.user_pool = up = fresh
        self._tried = []
        # try_idle False: the fast path's pick had no idle server; queue there.
        self._checkout_next(None, None if try_idle else up.balancer.picked)

    def _checkout_next(self, err, prefer=None):
        """Try the next candidate address; ``err``: why the last one failed."""
        bal = self.user_pool.balancer
        tried = self._tried
        if tried is None:
            tried = self._tried = []
        pool = bal.choose(self.shard, self.role, self.primary_reads, tried, prefer)
        if pool is None:
            self._tried = None
            self._checkout_failed(bal.unavailable_error(self.shard, self.role,
                                                        self.primary_reads, err))
            return
        tried.append(pool)
        self._wait_epoch = bal.epoch
        server = pool.take_idle_any()
        if server is not None:
            if pool.is_stale(server):
                d = server.run([";"], timeout=pool.healthcheck_timeout)
                d.addCallbacks(self._health_checked, self._health_failed,
                               callbackArgs=(server,), errbackArgs=(server,))
                return
            self._got_server(server)
            return
        w = self._waiter
        self._waiting = (pool, w)
        pool.requeue(w)

    def _health_checked(self, results, server):
        self.user_pool.note_role(server)
        self._got_server(server)

    def _health_failed(self, failure, server):
        pool = server.pool
        pool.discard(server)
        self._waiting = (pool, None)
        self._checkout_failed(ServerConnectionFailed(
            f"{pool.name}: health check failed: {failure.getErrorMessage()}"))

    def _got_server(self, server, params_synced=False):
        """A server for this client's checkout (from its pool's queue, the
        idle fast path or a health check): bind it and send what was held
        for it. Tracked parameters that differ on it are SET first, unless
        that was just done (``_params_synced``). One function on purpose:
        this runs for every transaction."""
        self._waiting = None
        transport = self.transport
        if transport is None or self._closing or not transport.connected:
            server.pool.release(server)
            return
        pool = server.pool
        if server.closed:
            # Closing under us (never write to a closing transport).
            pool.discard(server)
            self._waiting = (pool, None)
            self._checkout_failed(ServerConnectionFailed(
                f"{pool.name}: server connection closed before use"))
            return
        bal = self.user_pool.balancer
        if bal.epoch != self._wait_epoch and \
                not bal.serves(pool, self.role, self.primary_reads, self.shard):
            # Its role changed (or it was banned) while we waited for it.
            pool.release(server)
            if self._tried is None:
                self._tried = [pool]
            self._checkout_next(None)
            return
        self._tried = None
        if not params_synced:
            # Equal tracked tuples (cached, see relay.ParameterValues): no
            # SET needed. Otherwise compare the values this client has.
            params = self.params
            sparams = server.params
            mine = params._tracked
            if mine is None:
                mine = params.tracked()
            theirs = sparams._tracked
            if theirs is None:
                theirs = sparams.tracked()
            if mine != theirs:
                for k, v in params.items():
                    if sparams.get(k) != v:
                        self._sync_params(server)
                        return
        st = server.transport
        held = self._held
        rw = self.rewriter
        if held and rw is None:
            # The query first (it is what the server waits for), the
            # bookkeeping after: nothing can arrive before we return.
            self._held = []
            server.writer(st, held[0] if len(held) == 1 else b"".join(held), self.transport)
        self._checking_out = False
        self.server = server
        self._server_transport = st
        self._write_server = server.writer
        # server.bind(), inline (hot path)
        server.client = self
        server.scanner.client = self.scanner
        server._write_client = self.writer
        server._client_transport = self.transport
        server.state = "active"
        server.dataReceived = server.relay_data
        if self._paused_waiting:
            self._paused_waiting = False
            self.transport.resumeProducing()
        if rw is not None:
            stmts = server.stmts
            if stmts is None:
                stmts = server.stmts = ServerStatements(rw.cache.size, rw.cache)
                server.scanner.use_prepared(stmts)
            if held:
                self._held = []
                self._held_len = 0
                out = rw.process(held[0] if len(held) == 1 else b"".join(held), stmts)
                if out:
                    self._write_server(st, out, self.transport)
            return
        if self.transaction_mode:
            # The held list (already replaced by a new one above) becomes
            # request_chunks, kept for a possible re-send: not copied.
            self.request_chunks = held if held else []
            self._request_bytes = self._held_len
        self._held_len = 0

    def _sync_params(self, server):
        """SET the tracked parameters whose values differ on ``server``,
        then attach it (``_params_synced``)."""
        sparams = server.params
        diff = [(k, v) for k, v in self.params.items() if sparams.get(k) != v]
        d = server.run([set_parameter_sql(k, v) for k, v in diff], timeout=RESET_TIMEOUT)
        d.addCallbacks(self._params_synced, self._sync_failed,
                       callbackArgs=(server, diff), errbackArgs=(server,))

    def _params_synced(self, results, server, diff):
        for (k, v), r in zip(diff, results):
            if r.error:
                server.pool.release(server)
                self._checking_out = False
                self._fail_held(PgError(
                    f"could not apply {k}={v!r} on the server: {r.error.get('M')}",
                    sqlstate=r.error.get("C", "22023")))
                return
        # Adopt the server's spelling of the values, and tell the client if
        # it differs from what it was told.
        news = []
        for k, v in diff:
            new = server.params.get(k, v)
            if new != v:
                self.params[k] = new
                news.append(m.parameter_status(k, new))
        if self.transport is None or self._closing:
            server.pool.release(server)
            return
        if news:
            self.transport.write(b"".join(news))
        self._got_server(server, True)

    def _sync_failed(self, failure, server):
        pool = server.pool
        pool.discard(server)
        self._waiting = (pool, None)
        self._checkout_failed(failure)

    def _checkout_failed(self, err):
        """``err``: an exception (from the pool) or a Failure. A server
        failure on the address we waited for (``self._waiting``) bans it
        (a replica) and tries the next candidate; anything else (an
        exhausted pool, nothing left to try) is the client's error."""
        waiting, self._waiting = self._waiting, None
        if isinstance(err, Failure):
            err = err.value
        if waiting is not None and isinstance(err, ServerConnectionFailed):
            pool = waiting[0]
            if not pool.closed:
                self.user_pool.server_failed(pool, err)
            if self.transport is not None and not self._closing:
                tried = self._tried
                if tried is None:
                    tried = self._tried = []
                if pool not in tried:
                    tried.append(pool)
                self._checkout_next(err)
                return
        self._tried = None
        self._checking_out = False
        if self.transport is None or self._closing:
            return
        if not isinstance(err, PgError):
            err = ServerConnectionFailed(f"could not get a server connection: {err}")
        log.warn("client {user}@{db}: checkout failed: {err}", user=self.user,
                 db=self.database, err=err.message)
        if self._paused_waiting:
            self._paused_waiting = False
            self.transport.resumeProducing()
        self._fail_held(err)

    def _fail_held(self, err):
        """Answer every request held for a server with ``err``."""
        sc = self.scanner
        self._held = []
        self._held_len = 0
        if sc.unsynced or sc.in_copy or not sc.at_boundary:
            self._fatal(err)
            return
        n = max(sc.pending, 1)
        sc.pending = 0
        self.transport.write((err.to_message() + m.READY_IDLE) * n)

    # --- server events --------------------------------------------------------------------

    def _sql_command(self, data, bound):
        """Transaction mode: SQL-level PREPARE/EXECUTE (refused: they would
        meet another server later) and DEALLOCATE (answered for the client's
        own statements). ``data`` is one whole Query; True if answered."""
        cmd = sqlcmd.match(data, 5, len(data))
        if cmd is None:
            return False
        kind, arg = cmd
        if kind == "discard_all":
            # The server runs it (and drops its statements, relay.py); the
            # client's own view of its statements is emptied too.
            if self.rewriter is not None:
                self.rewriter.deallocate(None)
            return False
        sc = self.scanner
        status = self.server.scanner.tx_status if bound else codes.TX_IDLE
        if kind in ("prepare", "execute"):
            err = PgError(
                f"SQL {kind.upper()} is not supported in transaction pooling mode: the "
                "statement would be prepared on one server connection and executed on "
                "another",
                sqlstate="0A000",
                hint="use protocol-level prepared statements (enable "
                     "prepared_statements_cache_size for this pool) or session mode")
            reply = err.to_message()
        elif self.rewriter is None:
            return False  # no pooler-side statements: the server answers
        else:
            self.rewriter.deallocate(arg)
            reply = m.command_complete("DEALLOCATE ALL" if arg is None else "DEALLOCATE")
        sc.pending -= 1
        self.transport.write(reply + m.ready_for_query(bytes((status,))))
        return True

    def _reject_named_parse(self, data):
        """Transaction mode without a statement cache: a named Parse cannot
        work (the next transaction may land on another server)."""
        err = PgError(
            "named prepared statements need a prepared statement cache in transaction "
            "pooling mode: set prepared_statements_cache_size > 0 for this pool "
            "(or use session mode, or unnamed statements)",
            sqlstate="0A000")
        sc = self.scanner
        if self.server is not None or self._checking_out or self._held \
                or data[0] != codes.F_PARSE or not sc.at_boundary:
            self._fatal(err)
            return
        # Like PostgreSQL after an error: answer, then skip to the next Sync.
        self.transport.write(err.to_message())
        sc.pending = 0
        sc.unsynced = False
        sc.named_parse = False
        sc.queries = 0
        self._discard_until_sync = _SyncFinder()
        self.dataReceived = self._discarding
        self._discarding(data)

    def _discarding(self, data):
        finder = self._discard_until_sync
        try:
            finder.feed(data)
        except FramingError as e:
            self._protocol_error(e)
            return
        if finder.sync_end < 0:
            return
        rest = data[finder.sync_end:]
        self._discard_until_sync = None
        self.dataReceived = self._work_data
        self.transport.write(m.READY_IDLE)
        if rest:
            self._work_data(rest)

    def _custom_command(self, cmd, arg):
        """Answer one of PgCat's custom commands (reference §4.1)."""
        pool_cfg = self.user_pool.pool_cfg
        if cmd == "set_server_role":
            self.role = pool_cfg.default_role if arg == "default" else arg
            reply = m.command_complete("SET SERVER ROLE")
        elif cmd == "show_server_role":
            reply = (m.row_description([("server role", 25)]) + m.data_row([self.role])
                     + m.command_complete("SELECT 1"))
        elif cmd == "set_primary_reads":
            self.primary_reads = (pool_cfg.primary_reads_enabled if arg == "default"
                                  else arg == "on")
            reply = m.command_complete("SET PRIMARY READS")
        else:  # show_primary_reads
            reply = (m.row_description([("primary reads", 25)])
                     + m.data_row(["on" if self.primary_reads else "off"])
                     + m.command_complete("SELECT 1"))
        self.transport.write(reply + m.READY_IDLE)

    def _after_copy_end(self):
        """The client ended a COPY FROM STDIN. If the server had already
        answered (the COPY failed), nothing else will: release now."""
        sc = self.scanner
        sc.copy_ended = False
        server = self.server
        if server is not None and (self.transaction_mode or self.draining) \
                and server.scanner.tx_status == codes.TX_IDLE and sc.idle:
            self.release_server(server)

    def drain(self):
        """Shutdown: close now if between transactions, else after the
        current one (backend's release check sees ``draining``)."""
        self.draining = True
        if self.scanner is None:
            # Still logging in.
            self._fatal(_shutdown_error())
            return
        server = self.server
        if server is None:
            if not self._checking_out:
                self._fatal(_shutdown_error())
            return
        sc = self.scanner
        ss = server.scanner
        if ss.tx_status == codes.TX_IDLE and sc.idle and ss.at_boundary:
            self.release_server(server)

    def release_server(self, server):
        """The bound server answered everything and is idle: transaction mode
        (backend.ServerConnection._relay_data decides), or a draining client."""
        self.server = None
        self._server_transport = None
        self._write_server = None
        # server.unbind(), inline (hot path)
        ct = self.transport
        st = server.transport
        server.client = None
        server.scanner.client = None
        server._write_client = None
        server._client_transport = None
        server.state = "idle"
        server.dataReceived = server.idle_data
        # Writers register producers only when a write had to be buffered.
        if getattr(ct, "producer", None) is not None:
            detach_producer(ct, st)
        if getattr(st, "producer", None) is not None:
            detach_producer(st, ct)
        pool = server.pool
        if server.scanner.dirty or not self.transaction_mode or (
                self.scanner.named_parse and self.rewriter is None):
            self.scanner.named_parse = False
            self._reset_then_release(server, [self._reset_query(server)])
        else:
            pool.release(server)
        if self.draining:
            self._fatal(_shutdown_error())

    @staticmethod
    def _standby(server):
        """Was this server in recovery (a hot standby: it can have written
        nothing) at its last report?"""
        hs = server.params.get("in_hot_standby")
        if hs is not None:
            return hs == "on"
        pool = server.pool
        return pool is not None and pool.health is not None \
            and pool.health.effective_role == "replica"

    def dying_server(self, server, data):
        """backend: the first answer chunk to a request that could still be
        re-sent starts with an ErrorResponse. A FATAL 57P0x (shutdown, crash
        of another backend, postmaster gone) from a standby means the
        statement did not run there: the server is dropped without passing
        the error on, and ``server_lost`` re-sends the request. -> True if so."""
        if len(data) < 5:
            return False
        n = _LEN.unpack_from(data, 1)[0]
        if n < 4 or len(data) < 1 + n:
            return False
        try:
            fields = m.parse_error_fields(data[5:1 + n])
        except ValueError:
            return False
        if fields.get("V", fields.get("S")) != "FATAL" or not fields.get("C", "").startswith("57P") \
                or not self._standby(server):
            return False
        # Let go of it now, not at its connectionLost: nothing more may be
        # written to a transport that is closing (a writer would register
        # this client as its producer, and Twisted stops the producer of a
        # transport that is lost: the client would be closed).
        server.unbind_quietly()
        server.close()
        self.server_lost(server)
        return True

    def server_lost(self, server):
        """The bound server connection died: a replica is banned. If it was
        a replica (a hot standby: nothing it ran can have written anything)
        and no byte of its answer reached the client since it was bound,
        the request is re-sent to another server and the client sees no
        error. Otherwise the client gets a FATAL error and is closed."""
        self.server = None
        self._server_transport = None
        self._write_server = None
        chunks = self.request_chunks
        self.request_chunks = None
        pool = server.pool
        standby = self._standby(server)
        if pool is not None and pool.health is not None and not pool.closed:
            self.user_pool.server_failed(pool, "server connection lost")
        if self.transport is None or self._closing:
            return
        if chunks is not None and standby and not self._checking_out \
                and server.scanner.tx_status == codes.TX_IDLE and not self.scanner.in_copy:
            self._held = chunks + self._held
            self._held_len = sum(map(len, self._held))
            self._checkout()
            return
        if server.scanner.at_boundary:
            self._send_error(ServerConnectionFailed(
                f"server connection to {server.host}:{server.port} was lost",
                severity="FATAL"))
        self._closing = True
        self.transport.loseConnection()

    # --- disconnect -------------------------------------------------------------------------

    def connectionLost(self, reason):
        self.factory.clients.discard(self)
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        if self.key is not None:
            self.factory.cancel_keys.unregister(self.key)
        if self._waiting is not None:
            (pool, w), self._waiting = self._waiting, None
            if w is not None:
                pool.cancel_wait(w)
        server = self.server
        if server is not None:
            self.server = None
            self._cleanup_server(server)
        if self.user is not None and self.factory.get_cluster().config.general.log_client_disconnections:
            log.info("client disconnected: user={user} database={database}",
                     user=self.user, database=self.database)

    def _cleanup_server(self, server):
        """The client left while bound: roll back or reset, or close the
        server if it may be mid-answer."""
        server.unbind()
        sc = self.scanner
        ss = server.scanner
        if not (ss.at_boundary and sc.at_boundary and sc.pending <= 0 and not sc.unsynced
                and not sc.in_copy):
            server.pool.discard(server)
            return
        queries = []
        if ss.tx_status != codes.TX_IDLE:
            queries.append("ROLLBACK")
        if not self.transaction_mode or ss.dirty or (sc.named_parse and self.rewriter is None):
            queries.append(self._reset_query(server))
        if queries:
            self._reset_then_release(server, queries)
        else:
            server.pool.release(server)

    def _reset_query(self, server):
        """DISCARD ALL, except on a server holding shared prepared statements
        (transaction mode with a cache), where everything but them is reset."""
        if server.stmts is not None and self.transaction_mode:
            return KEEP_STATEMENTS_RESET
        if server.stmts is not None:
            server.stmts.clear()
        return "DISCARD ALL"

    def _reset_then_release(self, server, queries):
        pool = server.pool
        d = server.run(queries, timeout=RESET_TIMEOUT)

        def done(results):
            if any(r.error for r in results) or server.scanner.tx_status != codes.TX_IDLE:
                pool.discard(server)
            else:
                server.scanner.dirty = False
                pool.release(server)

        def failed(f):
            pool.discard(server)

        d.addCallbacks(done, failed)
