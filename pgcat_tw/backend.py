"""One connection to a PostgreSQL server.

Phases (``self.dataReceived`` is swapped per phase, no per-message branching):

login     StartupMessage, authentication (trust, cleartext, md5, SCRAM-SHA-256),
          ParameterStatus/BackendKeyData capture, until ReadyForQuery.
idle      in its pool; anything but async notices here means trouble.
relay     bound to a client: chunks are scanned and forwarded (relay.py).
internal  the pooler's own queries (parameter sync, reset, rollback).

The connection never imports the pool or the client side: it reports its
death through ``self.pool.connection_lost(self)``, and it calls the client
it is bound to only through the members ``IBoundClient`` lists. Binding is
done by the client (``frontend.ClientProtocol._got_server``, inline: it is
the hot path); letting go is ``unbind``, the one place it is done. Putting
a server back in shape for the next client (ROLLBACK, DISCARD ALL, or
everything but the shared prepared statements) is ``reset_query``,
``reset_and_release`` and ``client_left``.
"""

import itertools
import socket

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import Attribute, Interface, alsoProvides

from pgcat_tw.auth import md5 as md5_auth
from pgcat_tw.auth.scram import ScramClientExchange, is_scram_secret
from pgcat_tw.errors import PgError, ServerConnectionFailed
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import FramingError, MessageBuffer
from pgcat_tw.prepared import apply_edits
from pgcat_tw.stats import LiveClock
from pgcat_tw.relay import ServerScanner, detach_producer, writer_for
from pgcat_tw.tls import describe_handshake_failure
from pgcat_tw.tlssock import start_tls

log = Logger()

_ids = itertools.count(1)

RESET_TIMEOUT = 10.0     # seconds for SET / ROLLBACK / DISCARD ALL before the server is closed

# Everything DISCARD ALL does but DEALLOCATE ALL (shared prepared statements stay).
KEEP_STATEMENTS_RESET = ("CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; "
                         "UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; "
                         "DISCARD SEQUENCES")


class IBoundClient(Interface):
    """What a ServerConnection uses of the client it is bound to
    (``frontend.ClientProtocol``), and nothing else. While bound, the
    server's scanner also holds the client's ``ClientScanner``
    (``scanner.client``: ``pending``, ``unsynced``, ``in_copy``, ``state``,
    ``params``, ``last_extended``, ``since_exec``, ``in_copy_ext``)."""

    transaction_mode = Attribute("True: the server goes back at the end of each transaction")
    draining = Attribute("True: the client is closed after its current transaction")
    request_chunks = Attribute(
        "What the client sent since the server was bound, kept for a re-send "
        "elsewhere (a list), or None; the server sets it to None at the first "
        "answer that is not a standby's shutdown error")

    def release_server(server):
        """The server answered everything and is idle: take it back
        (transaction mode, or a draining client)."""

    def dying_server(server, data):
        """The first answer chunk to a re-sendable request starts with an
        ErrorResponse: True if it is a standby's FATAL shutdown error and
        the client let go of the server (the request goes elsewhere)."""

    def server_lost(server):
        """The server connection died while bound (the server has already
        let go of the client: ``unbind``)."""


class QueryResult:
    __slots__ = ("columns", "rows", "tag", "error")

    def __init__(self):
        self.columns = []
        self.rows = []
        self.tag = None
        self.error = None  # dict of ErrorResponse fields


def set_keepalive(transport, idle=5, interval=5, count=5, user_timeout_ms=0):
    """TCP_NODELAY plus the keepalive settings PgCat applies to every socket."""
    try:
        transport.setTcpNoDelay(True)
    except Exception:  # noqa: BLE001 - not a TCP transport (tests)
        return
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        if idle:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if user_timeout_ms and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    except OSError:
        pass


def unwrap_endpoint_protocol(proto):
    """HostnameEndpoint wraps our protocol in one that forwards every event
    (one more Python frame per received chunk). Once connected, point the TCP
    transport straight at us. Guarded: no-op if Twisted's layout differs."""
    transport = proto.transport
    wrapper = getattr(transport, "protocol", None)
    if wrapper is not None and wrapper is not proto \
            and getattr(wrapper, "_wrappedProtocol", None) is proto:
        transport.protocol = proto


class ServerConnection(Protocol):
    # The attributes every relayed transaction reads or writes are slots: on
    # CPython a slot is read and written faster than an instance-dict entry
    # (an instance with more than 30 attributes loses the shared-key dict
    # layout the specializing interpreter is quickest with). Everything else
    # stays in the instance dict (Protocol has no __slots__).
    __slots__ = ("scanner", "client", "pool", "transport", "connected", "closed", "params",
                 "stmts", "writer", "_write_client", "_client_transport", "state",
                 "relay_data", "idle_data", "clock", "last_used", "created_at")

    def __init__(self, reactor, host, port, user, password, database, extra_params=None,
                 clock=None):
        self.reactor = reactor
        self.transport = None
        self.connected = 0
        self.id = next(_ids)          # for the admin console
        # The time of the event being handled (stats.EventClock), for the
        # statistics: an attribute read, not a call.
        self.clock = clock if clock is not None else LiveClock(reactor.seconds)
        self.host = host
        self.port = port
        self.user = user
        self._password = password
        self.database = database
        self._extra = extra_params or {}
        self.ready = defer.Deferred(self._cancel_login)
        self._buf = MessageBuffer()
        self.scanner = ServerScanner()
        self.params = self.scanner.params
        self.pid = 0
        self.secret = 0
        self.pool = None
        self.client = None            # bound ClientProtocol
        self._write_client = None
        self._client_transport = None
        self._carry = b""             # held-back split header (prepared mode)
        self.stmts = None             # prepared.ServerStatements (prepared mode)
        self.writer = None            # how clients write to this server
        self.created_at = reactor.seconds()
        self.last_used = self.created_at
        self.state = "login"
        self._scram = None
        self._iq = None               # running internal query
        self.closed = False
        self.lost_reason = None
        self.keepalive = (5, 5, 5, 0)
        # The two dataReceived handlers a client switches between when it
        # binds and unbinds this server (made once, not per transaction).
        self.relay_data = self._relay_data
        self.idle_data = self._idle_data
        self.dataReceived = self._login_data

    def __repr__(self):
        return f"<ServerConnection {self.user}@{self.host}:{self.port}/{self.database} pid={self.pid} {self.state}>"

    # --- login --------------------------------------------------------------

    tls = None            # a TLS connection creator when server_tls is on
    tls_state = None      # None, "requested", "handshake", "up"

    def connectionMade(self):
        set_keepalive(self.transport, *self.keepalive)
        self.writer = writer_for(self.transport)
        unwrap_endpoint_protocol(self)
        if self.tls is not None:
            self.tls_state = "requested"
            self.dataReceived = self._ssl_answer
            self.transport.write(m.ssl_request())
            return
        self._send_startup()

    def _send_startup(self):
        params = {"user": self.user, "database": self.database}
        params.update(self._extra)
        self.transport.write(m.startup_message(params))

    def _ssl_answer(self, data):
        """The server's one-byte answer to SSLRequest."""
        answer = data[:1]
        where = f"server {self.host}:{self.port}"
        if answer == b"S":
            if len(data) > 1:
                # Bytes before the handshake did not come from the server's
                # TLS layer: someone is injecting (CVE-2021-23222).
                self._login_failed(ServerConnectionFailed(
                    f"{where} sent unencrypted data after its SSL response"))
                return
            self.tls_state = "handshake"
            alsoProvides(self, IHandshakeListener)
            self.dataReceived = self._login_data
            # TLS on the socket itself (tlssock; its writer writes through),
            # or else Twisted's TLS layer (written through Twisted).
            if not start_tls(self.transport, self.tls):
                self.transport.startTLS(self.tls)
            self.writer = writer_for(self.transport)
            self._send_startup()
        elif answer == b"N":
            self._login_failed(ServerConnectionFailed(
                f"{where} does not accept TLS connections (it answered SSLRequest with "
                f"'N') and server_tls = true: enable ssl on the server or set "
                f"server_tls = false"))
        else:
            self._login_failed(ServerConnectionFailed(
                f"{where}: unexpected answer {bytes(answer)!r} to SSLRequest"))

    def handshakeCompleted(self):
        """IHandshakeListener (declared once TLS starts)."""
        self.tls_state = "up"

    def _cancel_login(self, d):
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()

    def _login_failed(self, err):
        self.state = "failed"
        if not self.ready.called:
            self.ready.errback(err)
        if self.transport is not None:
            self.transport.loseConnection()

    def _login_data(self, data):
        self._buf.feed(data)
        try:
            while True:
                msg = self._buf.next_message()
                if msg is None:
                    return
                t, body = msg
                if t == codes.B_AUTHENTICATION:
                    self._on_auth(body)
                elif t == codes.B_PARAMETER_STATUS:
                    name, value = m.parse_parameter_status(body)
                    self.params[name] = value
                elif t == codes.B_BACKEND_KEY_DATA:
                    self.pid, self.secret = m._I32_PAIR.unpack_from(body, 0)
                elif t == codes.B_ERROR:
                    fields = m.parse_error_fields(body)
                    self._login_failed(ServerConnectionFailed(
                        f"server {self.host}:{self.port} refused login for user "
                        f"\"{self.user}\": {fields.get('M', 'error')}",
                        sqlstate=fields.get("C", "08006"),
                    ))
                    return
                elif t == codes.B_READY_FOR_QUERY:
                    self.scanner.tx_status = body[0]
                    self.state = "idle"
                    self.dataReceived = self._idle_data
                    rest = self._buf.take_rest()
                    self.ready.callback(self)
                    if rest:
                        self.dataReceived(rest)
                    return
                # NoticeResponse, NegotiateProtocolVersion: nothing to do
        except (FramingError, ValueError, KeyError) as e:
            self._login_failed(ServerConnectionFailed(
                f"server {self.host}:{self.port}: protocol error during login: {e}"))
        except Exception as e:  # scramp errors, bad server signature...
            self._login_failed(ServerConnectionFailed(
                f"server {self.host}:{self.port}: authentication failed: {e}"))

    def _on_auth(self, body):
        (code,) = m._I32.unpack_from(body, 0)
        password = self._password
        if code == codes.AUTH_OK:
            return
        if code in (codes.AUTH_CLEARTEXT, codes.AUTH_MD5, codes.AUTH_SASL) and password is None:
            raise ValueError(f"server asks for a password but none is configured for user \"{self.user}\"")
        if code == codes.AUTH_CLEARTEXT:
            if md5_auth.is_md5_secret(password) or is_scram_secret(password):
                raise ValueError("server asks for a cleartext password but only a secret "
                                 "(md5 or SCRAM) is known for this user")
            self.transport.write(m.password_message(m.cstr(password)))
        elif code == codes.AUTH_MD5:
            if is_scram_secret(password):
                raise ValueError("server asks for md5 authentication but only a SCRAM secret "
                                 "is known for this user")
            self.transport.write(m.password_message(
                md5_auth.client_response(self.user, password, body[4:8])[:-1] + b"\x00"))
        elif code == codes.AUTH_SASL:
            if md5_auth.is_md5_secret(password):
                raise ValueError("server asks for SCRAM authentication but only an md5 secret "
                                 "is known for this user")
            self._scram = ScramClientExchange(self.user, password)
            mech, first = self._scram.start(m.parse_sasl_mechanisms(body[4:]))
            self.transport.write(m.sasl_initial_response(mech, first))
        elif code == codes.AUTH_SASL_CONTINUE:
            self.transport.write(m.sasl_response(self._scram.server_first(body[4:])))
        elif code == codes.AUTH_SASL_FINAL:
            self._scram.server_final(body[4:])
        else:
            raise ValueError(f"unsupported authentication method {code} requested by server")

    # --- idle -----------------------------------------------------------------

    def _idle_data(self, data):
        # Only asynchronous messages may arrive here (NOTICE, ParameterStatus,
        # or an ErrorResponse before the server closes the connection).
        self._buf.feed(data)
        try:
            while True:
                msg = self._buf.next_message()
                if msg is None:
                    return
                t, body = msg
                if t == codes.B_PARAMETER_STATUS:
                    name, value = m.parse_parameter_status(body)
                    self.params[name] = value
                elif t == codes.B_ERROR:
                    fields = m.parse_error_fields(body)
                    log.warn("server {host}:{port} pid {pid} error while idle: {msg}",
                             host=self.host, port=self.port, pid=self.pid, msg=fields.get("M"))
                    self.close()
                    return
        except FramingError:
            self.close()

    # --- relay ------------------------------------------------------------------

    def unbind(self):
        """Let go of the bound client: the one place it is done (a release
        at the end of a transaction, a client that left, a server that died
        or is dying). Producer registrations between the two transports
        (made only when a write had to be buffered) are undone and the
        peer resumed, unless its connection is going away."""
        ct = self._client_transport
        st = self.transport
        self.client = None
        ss = self.scanner
        cs = ss.client
        if cs is not None:
            # What the client sent while bound was sent to this server.
            ss.sent += cs.received - ss.sent_mark
            ss.client = None
        self._write_client = None
        self._client_transport = None
        if not self.closed:
            self.state = "idle"
        self.dataReceived = self.idle_data  # (bound once: no allocation)
        if getattr(ct, "producer", None) is not None:
            detach_producer(ct, st)
        if getattr(st, "producer", None) is not None:
            detach_producer(st, ct)

    def _relay_data(self, data):
        sc = self.scanner
        client = self.client
        if client.request_chunks is not None:
            # The first answer to a request the client could re-send
            # elsewhere (frontend.server_lost): a FATAL shutdown error instead
            # of an answer still allows it; anything else ends that chance.
            if data[0] == 69 and client.dying_server(self, data):
                return
            client.request_chunks = None
        # Nobody is queued for this server: forward first and scan after,
        # so the answer reaches the client without waiting for the pooler's
        # bookkeeping. Otherwise scan first: if the answer ends the
        # transaction, the server is handed on before it is forwarded.
        pool = self.pool
        stmts = sc.stmts
        forwarded = stmts is None and (pool is None or not pool.waiters)
        if forwarded:
            self._write_client(self._client_transport, data, self.transport)
        try:
            sc.feed(data)
        except FramingError as e:
            log.error("server {host}:{port} sent a malformed message: {e}", host=self.host,
                      port=self.port, e=e)
            self.close()
            return
        if stmts is not None:
            data = self._prepared_reply(data)
        if sc.rfq:
            sc.rfq = False
            now = self.clock.now
            sc.query_time += now - sc.query_start
            sc.query_start = now
            cs = sc.client
            # Transaction mode: back to the pool once nothing the client sent
            # is unanswered (relay.ClientScanner.idle, inlined; state 0: at a
            # message boundary).
            if (client.transaction_mode or client.draining) and sc.tx_status == 73 \
                    and cs.pending <= 0 \
                    and not cs.unsynced and not cs.in_copy and not cs.state:
                if forwarded:
                    client.release_server(self)
                    return
                write, ct = self._write_client, self._client_transport
                if client.draining:
                    # The answer first: a draining client is closed with an
                    # error once its server is released.
                    if data:
                        write(ct, data, self.transport)
                    client.release_server(self)
                    return
                # Hand the server on before forwarding this last chunk of the
                # answer, so the next client's query is already on its way to
                # the server while the answer goes out. No producer: the
                # server belongs to somebody else now, and nothing follows.
                client.release_server(self)
                if data:
                    write(ct, data, None)
                return
        if data and not forwarded:
            self._write_client(self._client_transport, data, self.transport)

    def _prepared_reply(self, data):
        """Prepared mode: apply the scanner's edits (cut or retyped
        acknowledgements, prepared.py) and hold back a split header so an
        acknowledgement is never half-forwarded before it can be edited."""
        sc = self.scanner
        carry = self._carry
        edits = sc.edits
        if edits:
            data = apply_edits(carry + data if carry else data, edits, len(carry))
            edits.clear()
        elif carry:
            data = carry + data
        k = sc.partial_header
        if k:
            self._carry = data[-k:]
            return data[:-k]
        self._carry = b""
        return data

    # --- internal queries ---------------------------------------------------------

    def run(self, queries, timeout=None):
        """Run simple queries as the pooler (not bound to a client). Fires
        with a list of QueryResult, one per query; fails with
        ServerConnectionFailed if the connection dies or times out."""
        assert self._iq is None, "internal query already running"
        d = defer.Deferred()
        results = [QueryResult() for _ in queries]
        self._iq = [d, results, 0]
        self.state = "internal"
        self.dataReceived = self._internal_data
        self.transport.write(b"".join(m.query(q) for q in queries))
        if timeout:
            d.addTimeout(timeout, self.reactor, onTimeoutCancel=self._iq_timeout)
        return d

    def run_extended(self, sql, params, timeout=None):
        """Run one statement with bound text parameters (extended protocol,
        so a parameter can never be read as SQL). Fires like ``run`` with a
        one-element list; the QueryResult has rows but no column names."""
        assert self._iq is None, "internal query already running"
        d = defer.Deferred()
        results = [QueryResult()]
        self._iq = [d, results, 0]
        self.state = "internal"
        self.dataReceived = self._internal_data
        self.transport.write(m.extended_query(sql, params))
        if timeout:
            d.addTimeout(timeout, self.reactor, onTimeoutCancel=self._iq_timeout)
        return d

    def _iq_timeout(self, result, timeout):
        # Raised, not returned: what onTimeoutCancel returns becomes the
        # Deferred's *result* (a timed-out health check looked successful).
        self.close()
        raise ServerConnectionFailed(
            f"server {self.host}:{self.port}: no answer within {timeout:.3g} s")

    def _internal_data(self, data):
        self._buf.feed(data)
        iq = self._iq
        if iq is None:
            return
        d, results, i = iq
        try:
            while True:
                msg = self._buf.next_message()
                if msg is None:
                    iq[2] = i
                    return
                t, body = msg
                if i >= len(results):
                    continue
                r = results[i]
                if t == codes.B_DATA_ROW:
                    r.rows.append(_decode_row(body))
                elif t == codes.B_ROW_DESCRIPTION:
                    r.columns = _decode_columns(body)
                elif t == codes.B_COMMAND_COMPLETE:
                    r.tag = body[:-1].decode("utf-8", "replace")
                elif t == codes.B_ERROR:
                    r.error = m.parse_error_fields(body)
                    self.scanner.errors += 1
                elif t == codes.B_PARAMETER_STATUS:
                    name, value = m.parse_parameter_status(body)
                    self.params[name] = value
                elif t == codes.B_READY_FOR_QUERY:
                    self.scanner.tx_status = body[0]
                    i += 1
                    if i == len(results):
                        self._iq = None
                        self.state = "idle"
                        self.dataReceived = self._idle_data
                        rest = self._buf.take_rest()
                        d.callback(results)
                        if rest and self._iq is None and self.dataReceived == self._idle_data:
                            self._idle_data(rest)
                        return
        except FramingError as e:
            self._iq = None
            self.close()
            d.errback(ServerConnectionFailed(f"server {self.host}:{self.port}: {e}"))

    # --- end ----------------------------------------------------------------------

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            if self.state in ("idle",) and self.transport.connected:
                self.transport.write(m.TERMINATE)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.closed = True
        self.lost_reason = reason
        prev = self.state
        self.state = "closed"
        if prev == "login" or not self.ready.called:
            if not self.ready.called:
                if self.tls_state == "handshake":
                    why = describe_handshake_failure(reason, self.host, self.port)
                else:
                    why = (f"server {self.host}:{self.port} closed the connection during "
                           f"login: {reason.getErrorMessage()}")
                self.ready.errback(ServerConnectionFailed(why))
            return
        if self._iq is not None:
            d = self._iq[0]
            self._iq = None
            if not d.called:
                d.errback(ServerConnectionFailed(
                    f"server {self.host}:{self.port} closed the connection"))
        client = self.client
        if client is not None:
            self.unbind()
            client.server_lost(self)
        if self.pool is not None:
            self.pool.connection_lost(self)

    # --- back to the pool, in shape -------------------------------------------------

    def reset_query(self, transaction_mode):
        """DISCARD ALL, except on a server holding shared prepared statements
        (transaction mode with a cache), where everything but them is reset."""
        if self.stmts is not None and transaction_mode and not self.scanner.sql_prepared:
            return KEEP_STATEMENTS_RESET
        if self.stmts is not None:
            # (An SQL PREPARE's statement must go too: the shared ones are
            # prepared again where they are needed.)
            self.stmts.clear()
        return "DISCARD ALL"

    def reset_and_release(self, queries):
        """Run ``queries`` (ROLLBACK, a reset), then go back to the pool; a
        failure, or a transaction still open after them, closes the server
        instead: it is never handed out dirty."""
        pool = self.pool
        d = self.run(queries, timeout=RESET_TIMEOUT)

        def done(results):
            if any(r.error for r in results) or self.scanner.tx_status != codes.TX_IDLE:
                pool.discard(self)
            else:
                self.scanner.dirty = self.scanner.sql_prepared = False
                pool.release(self)

        def failed(f):
            pool.discard(self)

        d.addCallbacks(done, failed)

    def client_left(self, cs, transaction_mode, needs_reset):
        """The bound client went away (``cs``: its ClientScanner). Roll back
        an open transaction and reset what it left behind, or close the
        server if it may be mid-answer (never guess where a half-read
        result ends)."""
        self.unbind()
        ss = self.scanner
        if not (ss.at_boundary and cs.at_boundary and cs.pending <= 0 and not cs.unsynced
                and not cs.in_copy):
            self.pool.discard(self)
            return
        queries = []
        if ss.tx_status != codes.TX_IDLE:
            queries.append("ROLLBACK")
        if needs_reset:
            queries.append(self.reset_query(transaction_mode))
        if queries:
            self.reset_and_release(queries)
        else:
            self.pool.release(self)


def _decode_row(body):
    (n,) = m.struct.unpack_from("!h", body, 0)
    pos = 2
    row = []
    for _ in range(n):
        (ln,) = m._I32.unpack_from(body, pos)
        pos += 4
        if ln < 0:
            row.append(None)
        else:
            row.append(body[pos:pos + ln].decode("utf-8", "replace"))
            pos += ln
    return tuple(row)


def _decode_columns(body):
    (n,) = m.struct.unpack_from("!h", body, 0)
    pos = 2
    cols = []
    for _ in range(n):
        end = body.index(b"\x00", pos)
        cols.append(body[pos:end].decode("utf-8", "replace"))
        pos = end + 1 + 18
    return cols


def quiet_factory(proto):
    """A one-shot client factory that does not log each connection."""
    f = Factory.forProtocol(lambda: proto)
    f.noisy = False
    return f


def _endpoint(reactor, host, port, timeout):
    """An IP address is connected to directly; a name through
    HostnameEndpoint, whose resolver runs getaddrinfo in the reactor's
    thread pool (busy threads would hold every new server connection up)."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def connect(reactor, host, port, user, password, database, timeout, extra_params=None,
            keepalive=None, tls=None, clock=None):
    """Connect and log in; fires with a ready ServerConnection.
    ``tls``: the service's tls.TLSState (TLS is used when its server_tls is on);
    ``clock``: the service's stats.EventClock."""
    proto = ServerConnection(reactor, host, port, user, password, database, extra_params,
                             clock)
    if keepalive is not None:
        proto.keepalive = keepalive
    if tls is not None:
        proto.tls = tls.server_creator(host)
    endpoint = _endpoint(reactor, host, port, timeout)
    d = endpoint.connect(quiet_factory(proto))

    def connected(_):
        return proto.ready

    def failed(f):
        if f.check(defer.CancelledError, defer.TimeoutError):
            raise ServerConnectionFailed(
                f"could not connect to server {host}:{port}: timed out after {timeout:.3g} s")
        if f.check(PgError):
            return f
        raise ServerConnectionFailed(
            f"could not connect to server {host}:{port}: {f.getErrorMessage()}")

    d.addCallback(connected)
    d.addTimeout(timeout, reactor)
    d.addErrback(failed)
    return d
