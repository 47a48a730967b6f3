"""The startup phase of a client connection: what comes before the
StartupMessage is read.

SSLRequest (answered 'S' and TLS started when a certificate is configured,
'N' otherwise), PostgreSQL 17's direct TLS (a ClientHello as the very first
bytes, ALPN "postgresql" required), GSSENCRequest (answered 'N'),
CancelRequest (forwarded to the right server, then the connection closes)
and protocol version negotiation (3.0; NegotiateProtocolVersion for newer
minors and ``_pq_.`` options). A StartupMessage ends the phase: the
``Startup`` object hands its parameters, what it knows of TLS and the
unconsumed bytes to the login phase (``ClientProtocol.begin_login``) and is
dropped.
"""

from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import alsoProvides

from pgcat_tw.cancel import forward_cancel
from pgcat_tw.errors import ProtocolViolation
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import FramingError, MessageBuffer
from pgcat_tw.relay import writer_for
from pgcat_tw.tls import ALPN_PROTOCOL, end_point_hash
from pgcat_tw.tlssock import start_tls

log = Logger()


class Startup:
    """One client's startup phase. ``client``: its ClientProtocol (the
    transport, the factory, ``_fatal``)."""

    def __init__(self, client):
        self.client = client
        self.buf = MessageBuffer()
        self.tls = False           # the connection is encrypted
        self.tls_direct = False    # ... by direct TLS
        self.started = False       # a startup packet has been read
        self.done = False          # the StartupMessage was handed on

    def data_received(self, data):
        client = self.client
        if data[:1] == b"\x16" and not self.started and not self.tls and not len(self.buf):
            # A TLS ClientHello as the very first bytes: direct TLS
            # (sslnegotiation=direct); a startup packet cannot begin so.
            self._begin_direct_tls(data)
            return
        self.buf.feed(data)
        try:
            while not self.done and not client._closing:
                body = self.buf.next_startup()
                if body is None:
                    return
                self._on_packet(body)
        except FramingError as e:
            client._fatal(ProtocolViolation(f"invalid startup packet: {e.message}"))
        except ValueError as e:
            client._fatal(ProtocolViolation(f"invalid startup packet: {e}"))

    def _on_packet(self, body):
        if len(body) < 4:
            raise ValueError("too short")
        self.started = True
        (code,) = m._I32.unpack_from(body, 0)
        if code in (codes.SSL_REQUEST, codes.GSSENC_REQUEST):
            self._on_encryption_request(code, body)
            return
        if code == codes.CANCEL_REQUEST:
            if len(body) != 12:
                raise ValueError("CancelRequest of the wrong length")
            pid, secret = m._I32_PAIR.unpack_from(body, 4)
            self._on_cancel(pid, secret)
            self.client._close()
            return
        major, minor = code >> 16, code & 0xFFFF
        if major != 3:
            self.client._fatal(ProtocolViolation(
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"))
            return
        params = m.parse_startup_params(body[4:])
        unknown_opts = [k for k in params if k.startswith("_pq_.")]
        if minor > 0 or unknown_opts:
            # Offer 3.0 and decline protocol extensions (the client decides).
            payload = (m._I32.pack(codes.PROTOCOL_3_0) + m._I32.pack(len(unknown_opts))
                       + b"".join(m.cstr(o) for o in unknown_opts))
            self.client.transport.write(m._msg(b"v", payload))
            for o in unknown_opts:
                del params[o]
        self.done = True
        self.client.begin_login(params, self, self.buf.take_rest())

    def _on_encryption_request(self, code, body):
        client = self.client
        if len(body) != 4:
            raise ValueError("SSLRequest/GSSENCRequest with a payload")
        if self.tls:
            client._fatal(ProtocolViolation(
                "SSLRequest or GSSENCRequest received on an encrypted connection"))
            return
        if len(self.buf):
            # Bytes pipelined after the request before our answer: they
            # would be taken as sent under TLS (CVE-2021-23214).
            client._fatal(ProtocolViolation(
                "received unencrypted data after SSL or GSSAPI encryption request"))
            return
        options = self._tls_options() if code == codes.SSL_REQUEST else None
        if options is None:
            client.transport.write(b"N")
            return
        client.transport.write(b"S")
        self._start_tls(options)

    # --- TLS ------------------------------------------------------------------------

    def _tls_options(self):
        tls = self.client.factory.tls
        return tls.client_options if tls is not None else None

    def _start_tls(self, options, initial=b""):
        """TLS on the socket itself (tlssock), or else Twisted's TLS layer;
        ``initial``: the ClientHello already read (direct TLS)."""
        client = self.client
        self.tls = True
        alsoProvides(client, IHandshakeListener)
        if start_tls(client.transport, options, initial):
            # Written through OpenSSL on the socket (tlssock.write_through).
            client.writer = writer_for(client.transport)
            return
        client.transport.startTLS(options)
        # Twisted's TLS transports are written through Twisted, not straight
        # to the socket (relay.plain_write).
        client.writer = writer_for(client.transport)
        if initial:
            tls_layer = getattr(client.transport, "protocol", None)
            if tls_layer is None or tls_layer is client:
                client._fatal(ProtocolViolation("direct TLS is not available on this transport"))
                return
            # The ClientHello arrived before TLS started: hand it to the TLS layer.
            tls_layer.dataReceived(initial)

    def _begin_direct_tls(self, data):
        client = self.client
        options = self._tls_options()
        if options is None:
            # Nothing a TLS client could read: just close.
            log.info("client {peer}: direct TLS connection refused, no tls_certificate "
                     "configured", peer=str(client.peer))
            client._close()
            return
        self.tls_direct = True
        client.tls_direct = True
        self._start_tls(options, data)

    def _on_cancel(self, pid, secret):
        factory = self.client.factory
        target = factory.cancel_keys.lookup(pid, secret)
        if target is None:
            return
        server = target.server
        if server is None:
            return
        forward_cancel(self.client.reactor, server.host, server.port, server.pid,
                       server.secret)


def check_alpn(client):
    """After a direct TLS handshake: ALPN must have negotiated
    "postgresql", as in PostgreSQL 17 (else FATAL)."""
    try:
        proto = client.transport.getHandle().get_alpn_proto_negotiated()
    except Exception:  # noqa: BLE001 - no ALPN support
        proto = None
    if proto != ALPN_PROTOCOL:
        client._fatal(ProtocolViolation(
            "received direct SSL connection request without ALPN protocol "
            "negotiation extension"))


def channel_binding(transport):
    """tls-server-end-point data of an encrypted connection's certificate,
    or None."""
    try:
        cert = transport.getHandle().get_certificate()
    except Exception:  # noqa: BLE001
        return None
    return end_point_hash(cert) if cert is not None else None
