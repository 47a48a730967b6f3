"""TLS on the connection's own socket: OpenSSL reads and writes its descriptor.

Twisted's ``startTLS`` puts a ``TLSMemoryBIOProtocol`` between the TCP
transport and the protocol: every received chunk goes into a memory BIO and
is read back out (a Python exception per chunk to find the end), every write
is aggregated until the next reactor iteration (a ``callLater(0)`` per
write), encrypted into another memory BIO, read out and buffered, and sent
when the reactor next reports the socket writable (two ``epoll_ctl`` and a
poll round per write). Measured per ``pgbench -S`` transaction over TLS that
was about 110 more Python calls than the plain path (docs/architecture.rst,
"Where the time goes", TLS).

``start_tls(transport, creator, initial)`` instead makes a Twisted TCP
transport (an accepted ``tcp.Server``, an outgoing ``tcp.Client``) a TLS
transport in place:

- The pyOpenSSL ``Connection`` is made by the same creator Twisted would use
  (``CertificateOptions``, ``optionsForClientTLS``: TLS 1.2 at least, ALPN,
  client certificates, server verification are theirs), with a stand-in for
  Twisted's TLS protocol (``_Owner``) as its app data, so that verification
  failures and SNI errors reach the transport. Then OpenSSL is given the
  socket's descriptor (``SSL_set_fd``). A direct-TLS ClientHello already read
  goes through pyOpenSSL's memory BIO first, and the answer is sent before
  the switch.
- The transport's class becomes a subclass of its own: ``_Handshaking``
  until the handshake is done (writes are held, ``handshakeCompleted`` is
  called at the end), then ``_Established``: ``doRead`` is one ``SSL_read``
  into a buffer shared by every connection (copied out at once),
  ``writeSomeData`` one ``SSL_write`` (partial writes off: one call writes a
  whole chunk, record by record; a retry passes the same bytes again, as
  Twisted's buffer does). Twisted's buffering, producers, pausing and
  ``loseConnection`` then work unchanged on the plaintext; a close sends
  close_notify.
- ``fastpoll`` reads established connections inline (one ``SSL_read`` per
  event, more only after a large record), and the relay writes through them
  (``write_through``: one ``SSL_write`` when nothing is buffered).

Per transaction that is 3 library calls where Twisted's layer made about
110 Python calls, and one more system call than the plain path (OpenSSL
reads a record's header and body separately, as PgBouncer's does).

Everything here touches pyOpenSSL's and Twisted's internals, so ``start_tls``
checks them and returns False (the caller then uses ``transport.startTLS``)
for any other transport or layout.
"""

import os

from twisted.internet import main, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from zope.interface import classImplements

from pgcat_tw.relay import monomorphic_copy

try:
    from OpenSSL import SSL
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _SSL_read = _lib.SSL_read
    _SSL_write = _lib.SSL_write
    _SSL_get_error = _lib.SSL_get_error
    _ERR_clear_error = _lib.ERR_clear_error
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
    _unpack = _ffi.unpack
    _MODES = (_lib.SSL_set_mode, _lib.SSL_clear_mode, _lib.SSL_set_options, _lib.SSL_set_fd,
              _lib.SSL_shutdown, _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER,
              _lib.SSL_MODE_ENABLE_PARTIAL_WRITE, _lib.SSL_OP_NO_RENEGOTIATION)
    AVAILABLE = all(hasattr(SSL.Connection, a) for a in (
        "do_handshake", "bio_read", "bio_write", "set_app_data", "set_accept_state",
        "set_connect_state", "get_alpn_proto_negotiated", "get_certificate"))
except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
    AVAILABLE = False

BUFSIZE = tcp.Connection.bufferSize  # one read's room (Twisted's own)
RECORD = 16384  # the largest TLS record's plaintext
# A record this large is likely followed by more (bulk data: a COPY, a big
# result): read on in the same event. Smaller ones (a query, an answer) are
# delivered at once; the poll reports whatever follows.
MORE_AT = 4096
_RBUF = _ffi.new("char[]", BUFSIZE) if AVAILABLE else None
_AGAIN = (11, 4)  # EAGAIN/EWOULDBLOCK, EINTR (os.write of the first flight)


class _NoNegotiation:
    """A TLSMemoryBIOFactory's one attribute Twisted's creators read: no
    wrapped factory, so no protocols beyond the creator's own ALPN list."""

    wrappedFactory = None


class _Owner:
    """The stand-in for Twisted's TLSMemoryBIOProtocol that creators and
    OpenSSL callbacks see (``protocol`` argument, app data)."""

    __slots__ = ("transport",)
    factory = _NoNegotiation()

    def __init__(self, transport):
        self.transport = transport

    def failVerification(self, reason):
        self.transport.failVerification(reason)

    def abortConnection(self):
        self.transport.abortConnection()


def _connection(creator, server, owner):
    """A pyOpenSSL Connection (memory BIOs) as Twisted's TLS layer makes it."""
    if server:
        if IOpenSSLServerConnectionCreator.providedBy(creator):
            conn = creator.serverConnectionForTLS(owner)
        else:
            conn = SSL.Connection(creator.getContext(), None)
        conn.set_accept_state()
    else:
        if IOpenSSLClientConnectionCreator.providedBy(creator):
            conn = creator.clientConnectionForTLS(owner)
        else:
            conn = SSL.Connection(creator.getContext(), None)
        conn.set_connect_state()
    conn.set_app_data(owner)
    return conn


def _first_flight(conn, initial):
    """Feed ``initial`` (a ClientHello read before TLS started) through the
    memory BIOs: (the bytes to send, an SSL.Error or None)."""
    conn.bio_write(initial)
    err = None
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    except SSL.Error as e:
        err = e  # the alert is in the send BIO
    out = []
    while True:
        try:
            out.append(conn.bio_read(BUFSIZE))
        except SSL.WantReadError:
            break
    return b"".join(out), err


def _attach(conn, sock):
    """Let OpenSSL read and write ``sock`` (the memory BIOs, drained, are
    freed by OpenSSL; pyOpenSSL must not touch them again)."""
    if _lib.SSL_set_fd(conn._ssl, sock.fileno()) != 1:
        raise RuntimeError("SSL_set_fd failed")
    conn._into_ssl = conn._from_ssl = None
    conn._socket = sock


def _take_buffered(transport):
    """What Twisted's write buffer holds, removed from it."""
    data = bytes(transport.dataBuffer[transport.offset:]) + b"".join(transport._tempDataBuffer)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return data


def start_tls(transport, creator, initial=b""):
    """Start TLS on ``transport`` in place (see the module docstring); the
    role is the transport's (accepted: server). ``initial``: bytes of the
    handshake already read (direct TLS). False when not applicable: the
    caller uses ``transport.startTLS(creator)``."""
    phases = _PHASES.get(transport.__class__)
    if phases is None or transport.TLS or not transport.connected:
        return False
    handshaking = phases[0]
    conn = _connection(creator, not transport._tlsClientDefault, _Owner(transport))
    ssl = conn._ssl
    _lib.SSL_set_options(ssl, _lib.SSL_OP_NO_RENEGOTIATION)
    _lib.SSL_clear_mode(ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    _lib.SSL_set_mode(ssl, _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    raw, err = _first_flight(conn, initial) if initial else (b"", None)
    _attach(conn, transport.socket)
    # Bytes still in Twisted's buffer (the 'S' answering an SSLRequest) go
    # out first, in plain text.
    raw = _take_buffered(transport) + raw
    transport.__class__ = handshaking
    transport._tls_conn = conn
    transport._tls_pending = []
    if raw:
        transport._tls_raw = raw
        why = transport._tls_send_raw()
        err = err or why
    if err is None and not initial:
        err = transport._tls_handshake()  # a client's ClientHello goes out now
    if err is not None:
        transport._tls_fail(err)
    return True


class _TLSBase:
    """What both phases add to a TCP transport."""

    pgcat_tls = True
    _tls_conn = None      # the pyOpenSSL Connection
    _tls_ssl = None       # its SSL* once established (fastpoll and the writer read it)
    _tls_reason = None    # a verification failure, for connectionLost

    def getHandle(self):
        return self._tls_conn

    def getPeerCertificate(self):
        return self._tls_conn.get_peer_certificate()

    def startTLS(self, ctx, normal=True):
        raise RuntimeError("TLS already started")

    def failVerification(self, reason):
        """Certificate verification failed (Twisted's verify callbacks call
        this during the handshake): close with that reason."""
        self._tls_reason = reason
        self.abortConnection()

    def _tls_fail(self, err):
        from twisted.python.failure import Failure

        if self._tls_reason is None:
            self._tls_reason = err if isinstance(err, Failure) else Failure(err)
        self.abortConnection()

    def connectionLost(self, reason):
        if self._tls_reason is not None:
            reason, self._tls_reason = self._tls_reason, None
        self._tls_ssl = None
        conn = self._tls_conn
        if conn is not None:
            conn.set_app_data(None)  # (a cycle through the owner)
        super().connectionLost(reason)


class _Handshaking(_TLSBase):
    """Until the handshake is done: reads and writability drive it, writes
    are held, a close aborts (nothing could be sent)."""

    _tls_established = None  # the class to become (per base class)
    _tls_pending = None      # plaintext written meanwhile
    _tls_raw = b""           # the first flight's ciphertext not yet sent (direct TLS)
    _tls_want_write = False  # the handshake waits for the socket to drain

    def doRead(self):
        return self._tls_handshake()

    def doWrite(self):
        if self._tls_raw:
            why = self._tls_send_raw()
            if why is not None or self._tls_raw:
                return why
        if self._tls_want_write:
            return self._tls_handshake()
        self.stopWriting()
        return None

    def write(self, data):
        if data and self.connected and not self.disconnecting:
            self._tls_pending.append(data)

    def writeSequence(self, iovec):
        for data in iovec:
            self.write(data)

    def loseConnection(self):
        # As Twisted's TLS layer does before the handshake is done: nothing
        # could be sent yet, so there is nothing to wait for.
        self.abortConnection()

    def _tls_send_raw(self):
        try:
            sent = os.write(self.fileno(), self._tls_raw)
        except OSError as e:
            if e.errno not in _AGAIN:
                return main.CONNECTION_LOST
            sent = 0
        self._tls_raw = self._tls_raw[sent:]
        if self._tls_raw:
            self.startWriting()
        return None

    def _tls_handshake(self):
        conn = self._tls_conn
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            if self._tls_want_write:
                self._tls_want_write = False
                self.stopWriting()
            return None
        except SSL.WantWriteError:
            self._tls_want_write = True
            self.startWriting()
            return None
        except SSL.Error as e:
            _ERR_clear_error()
            return e  # to connectionLost (unless a verification failure was recorded)
        if self._tls_reason is not None or self._aborting:
            return None  # closing already
        return self._tls_up()

    def _tls_up(self):
        if self._tls_want_write:
            self._tls_want_write = False
            self.stopWriting()
        pending = self._tls_pending
        self._tls_pending = None
        self.__class__ = self._tls_established
        self._tls_ssl = self._tls_conn._ssl
        for data in pending:
            FileDescriptor.write(self, data)
        p = self.protocol
        if IHandshakeListener.providedBy(p):
            p.handshakeCompleted()
        return None


class _Established(_TLSBase):
    """After the handshake: OpenSSL on the socket, Twisted's buffering on
    the plaintext."""

    _tls_read_wants_write = False  # an SSL_read waits for the socket to drain

    def doRead(self):
        ssl = self._tls_ssl
        if ssl is None:
            return main.CONNECTION_LOST  # (never pass NULL to OpenSSL)
        return received(self, _SSL_read(ssl, _RBUF, BUFSIZE))

    def doWrite(self):
        if self._tls_read_wants_write:
            self._tls_read_wants_write = False
            why = self.doRead()
            if why is not None:
                return why
            if not (self.dataBuffer or self._tempDataBuffer):
                self.stopWriting()
                return None
        return FileDescriptor.doWrite(self)

    def writeSomeData(self, data):
        ssl = self._tls_ssl
        if ssl is None:
            return main.CONNECTION_LOST
        n = len(data)
        if not n:
            return 0
        if n > self.SEND_LIMIT:
            n = self.SEND_LIMIT  # (a retry passes at least as much: Twisted's buffer only grows)
        r = _SSL_write(ssl, data if type(data) is bytes else _ffi.from_buffer(data), n)
        if r > 0:
            return r
        return _write_failed(ssl, r)

    def _postLoseConnection(self):
        # Everything written has gone: close_notify, then the socket closes
        # (the peer's close_notify is not waited for). Bytes the peer sent
        # and nobody read (a TLS 1.3 server's session tickets, to a client
        # that never reads again) are read and dropped first: closing a
        # socket with unread data makes the kernel reset the connection,
        # and the peer may then lose what it had not read yet.
        _drain(self.fileno())
        ssl = self._tls_ssl
        if ssl is not None:
            _lib.SSL_shutdown(ssl)
            _ERR_clear_error()
        return main.CONNECTION_DONE


def _drain(fd, most=64):
    """Read and drop what is readable on ``fd`` now (at most ``most``
    reads of BUFSIZE)."""
    for _ in range(most):
        try:
            if not os.read(fd, BUFSIZE):
                return
        except OSError:
            return


def received(transport, n):
    """After ``SSL_read(transport._tls_ssl, _RBUF, BUFSIZE)`` returned ``n``:
    deliver what was read (reading on after a large record, while a whole
    record still fits) and return None, or a reason to disconnect."""
    if n <= 0:
        return _read_failed(transport, n)
    why = None
    if n >= MORE_AT:
        ssl = transport._tls_ssl
        last = n
        while last >= MORE_AT and n + RECORD <= BUFSIZE:
            last = _SSL_read(ssl, _RBUF + n, BUFSIZE - n)
            if last <= 0:
                why = _read_failed(transport, last)
                break
            n += last
    transport.protocol.dataReceived(_unpack(_RBUF, n))
    return why


def _read_failed(transport, n):
    ssl = transport._tls_ssl
    err = _SSL_get_error(ssl, n)
    if err == _WANT_READ:
        return None
    if err == _WANT_WRITE:
        # (A post-handshake message to answer and a full socket.)
        transport._tls_read_wants_write = True
        transport.startWriting()
        return None
    _ERR_clear_error()
    if err == _lib.SSL_ERROR_ZERO_RETURN:
        return main.CONNECTION_DONE  # the peer's close_notify
    return main.CONNECTION_LOST


def _write_failed(ssl, r):
    """0 (retry the same bytes when writable) or a reason to disconnect."""
    err = _SSL_get_error(ssl, r)
    if err == _WANT_WRITE or err == _WANT_READ:
        return 0
    _ERR_clear_error()
    return main.CONNECTION_LOST


def write_through(transport, data, peer):
    """relay.write_through for an established TLS transport: one SSL_write
    (straight to the socket) when nothing is buffered. What it cannot send
    now goes to Twisted's buffer whole (OpenSSL's retry needs the same bytes
    again), and only then is ``peer`` registered as its streaming producer.
    While the handshake runs (no SSL yet) writes are held by the transport."""
    ssl = transport._tls_ssl
    if ssl is not None and not (transport.dataBuffer or transport._tempDataBuffer) \
            and transport.connected and not transport.disconnecting:
        r = _SSL_write(ssl, data, len(data))
        if r > 0 or not data:
            return
        # Would block (the whole chunk is retried from the buffer), or the
        # connection failed (the retry reports it Twisted's way).
        _write_failed(ssl, r)
    # Not on a closing transport: Twisted stops a registered producer when the
    # connection is lost, which would close the (innocent) peer.
    if transport.producer is None and peer is not None and transport.connected \
            and not transport.disconnecting:
        transport.registerProducer(peer, True)
    transport.write(data)


def _phases(base):
    """The (handshaking, established) subclasses of a Twisted TCP class,
    with the established one's own copy of write_through (relay.writer_for
    hands it out; see relay.monomorphic_copy)."""
    name = base.__name__
    writer = staticmethod(monomorphic_copy(write_through))
    est = type("TLS" + name, (_Established, base), {"pgcat_writer": writer,
                                                     "__module__": __name__})
    hs = type("TLSHandshaking" + name, (_Handshaking, base),
              {"_tls_established": est, "pgcat_writer": writer, "__module__": __name__})
    classImplements(est, ISSLTransport)
    classImplements(hs, ISSLTransport)
    return hs, est


def _twisted_as_expected():
    fd = FileDescriptor
    return all(hasattr(fd, a) for a in ("doWrite", "writeSomeData", "_postLoseConnection",
                                        "dataBuffer", "offset", "SEND_LIMIT")) \
        and all(hasattr(c, "_tlsClientDefault") and hasattr(c, "abortConnection")
                and hasattr(c, "_aborting") for c in (tcp.Server, tcp.Client))


_PHASES = {tcp.Server: _phases(tcp.Server), tcp.Client: _phases(tcp.Client)} \
    if AVAILABLE and _twisted_as_expected() else {}
# For fastpoll: the established classes, and the accepted connections' one.
ESTABLISHED = frozenset(p[1] for p in _PHASES.values())
ESTABLISHED_ACCEPTED = _PHASES[tcp.Server][1] if _PHASES else None
