"""pgcat_tw.tlssock: TLS on the connection's own socket.

Both ends are Twisted TCP connections over loopback in trial's reactor, each
made TLS by ``tlssock.start_tls`` (the accepted one as server, with the
certificate options the pooler serves clients with; the outgoing one as
client, with the creators it uses towards servers): handshake, writes held
until it is done, the write-through, large records read in one chunk, a slow
reader (OpenSSL's write retries and the producer pausing), close_notify
both ways, direct TLS (a ClientHello read before TLS started), handshake and
verification failures, and the fallback for transports it does not know.

``FastPollTLSTests`` runs the fastpoll loop on a real epoll reactor in a
child process (as tests/test_fastpoll.py does): established TLS connections
are read inline, bulk data arrives intact, and an outgoing connection is
read before an accepted one when a poll reports both.
"""

import json
import os
import sys
import types

from OpenSSL import SSL
from twisted.internet import defer, error, protocol, reactor, task, utils
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from pgcat_tw import tls, tlssock
from pgcat_tw.relay import writer_for
from tests.certs import CertSet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_options(certs):
    """What the pooler serves clients with (tls.client_side_options)."""
    general = types.SimpleNamespace(tls_certificate=certs.server_cert,
                                    tls_private_key=certs.server_key,
                                    verify_client_certificate=False, tls_ca_file=None)
    return tls.client_side_options(general)


@implementer(IHandshakeListener)
class Side(protocol.Protocol):
    """One end: TLS started at connect (or, with ``direct``, at the first
    bytes, which are handed to start_tls); records what it receives."""

    def __init__(self, creator, direct=False, early=b""):
        self.creator = creator
        self.direct = direct
        self.early = early          # written right after start_tls (held)
        self.started = None
        self.chunks = []
        self.total = 0
        self.shaken = defer.Deferred()
        self.lost = defer.Deferred()  # fires (with None) at connectionLost
        self.reason = None            # ... whose reason is kept here
        self._want = None

    def connectionMade(self):
        if not self.direct:
            self._start(b"")

    def _start(self, initial):
        self.started = tlssock.start_tls(self.transport, self.creator, initial)
        if self.early:
            self.transport.write(self.early)

    def dataReceived(self, data):
        if self.started is None:
            self._start(data)
            return
        self.chunks.append(data)
        self.total += len(data)
        if self._want is not None and self.total >= self._want[0]:
            d, self._want = self._want[1], None
            d.callback(b"".join(self.chunks))

    def bytes(self, n):
        """Fires with everything received once ``n`` bytes have arrived."""
        d = defer.Deferred()
        if self.total >= n:
            d.callback(b"".join(self.chunks))
        else:
            self._want = (n, d)
        return d

    def handshakeCompleted(self):
        self.shaken.callback(self)

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class Bare(protocol.Protocol):
    """A peer without TLS; ``send`` is written at connect."""

    def __init__(self, send=b""):
        self.send = send
        self.lost = defer.Deferred()

    def connectionMade(self):
        if self.send:
            self.transport.write(self.send)

    def connectionLost(self, reason):
        self.lost.callback(None)


@implementer(IPushProducer)
class Producer:
    """Writes ``total`` bytes through ``writer`` in chunks while not paused,
    as a relayed peer would (the counting pattern makes any loss, repeat
    or reordering visible)."""

    def __init__(self, transport, total, chunk=65536):
        self.transport = transport
        self.writer = writer_for(transport)
        self.data = bytes(i % 251 for i in range(total))
        self.pos = 0
        self.chunk = chunk
        self.paused = False
        self.pauses = 0
        self.done = defer.Deferred()

    def run(self):
        while not self.paused and self.pos < len(self.data):
            piece = self.data[self.pos:self.pos + self.chunk]
            self.pos += len(piece)
            self.writer(self.transport, piece, self)
        if self.pos >= len(self.data) and not self.done.called:
            self.done.callback(None)

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False
        reactor.callLater(0, self.run)

    def stopProducing(self):
        self.paused = True


class TLSSocketTestCase(unittest.TestCase):
    def setUp(self):
        self.certs = CertSet(self.mktemp())
        self.options = server_options(self.certs)
        self.verify = tls.ServerConnector(True, self.certs.ca)

    def pair(self, server=None, client=None):
        """A connected (server side, client side) over loopback."""
        server = server or Side(self.options)
        client = client or Side(self.verify.creator("127.0.0.1"))
        f = protocol.Factory.forProtocol(lambda: server)
        f.noisy = False
        port = reactor.listenTCP(0, f, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", port.getHost().port)

        def close():
            for side in (server, client):
                t = side.transport
                if t is not None and t.connected:
                    t.abortConnection()
            return defer.DeferredList([server.lost, client.lost])
        self.addCleanup(close)
        return server, client

    @defer.inlineCallbacks
    def established(self, **kw):
        server, client = self.pair(**kw)
        yield defer.gatherResults([server.shaken, client.shaken])
        return server, client


class HandshakeTests(TLSSocketTestCase):
    @defer.inlineCallbacks
    def test_both_roles_and_writes_held_until_the_handshake(self):
        server, client = yield self.established(
            client=Side(self.verify.creator("127.0.0.1"), early=b"hello before handshake"))
        self.assertTrue(server.started)
        self.assertTrue(client.started)
        self.assertEqual(type(server.transport).__name__, "TLSServer")
        self.assertEqual(type(client.transport).__name__, "TLSClient")
        # What the pooler asks of a TLS transport: ALPN, its certificate
        # (channel binding), the peer's.
        handle = server.transport.getHandle()
        self.assertEqual(handle.get_alpn_proto_negotiated(), b"postgresql")
        self.assertEqual(handle.get_certificate().get_subject().CN, "pooler.test")
        self.assertEqual(client.transport.getPeerCertificate().get_subject().CN,
                         "pooler.test")
        got = yield server.bytes(22)
        self.assertEqual(got, b"hello before handshake")

    @defer.inlineCallbacks
    def test_writer_is_the_tls_write_through(self):
        server, client = yield self.established()
        w = writer_for(server.transport)
        self.assertIs(w, type(server.transport).pgcat_writer)
        self.assertEqual(w.__code__.co_code, tlssock.write_through.__code__.co_code)
        # One copy per transport class (relay.monomorphic_copy).
        self.assertIsNot(w, writer_for(client.transport))
        # With nothing buffered the bytes go straight to OpenSSL and the socket.
        w(server.transport, b"straight out", None)
        t = server.transport
        self.assertEqual((t.dataBuffer, t._tempDataBuffer), (b"", []))
        self.assertIsNone(t.producer)
        got = yield client.bytes(12)
        self.assertEqual(got, b"straight out")

    @defer.inlineCallbacks
    def test_direct_tls_with_the_client_hello_already_read(self):
        server, client = yield self.established(server=Side(self.options, direct=True))
        self.assertTrue(server.started)
        client.transport.write(b"ping")
        self.assertEqual((yield server.bytes(4)), b"ping")
        server.transport.write(b"pong")
        self.assertEqual((yield client.bytes(4)), b"pong")

    @defer.inlineCallbacks
    def test_wrong_ca_fails_with_openssl_reason(self):
        other = tls.ServerConnector(True, self.certs.other_ca)
        server, client = self.pair(client=Side(other.creator("127.0.0.1")))
        yield client.lost
        reason = client.reason
        self.assertIsInstance(reason.value, SSL.Error)
        self.assertIn("certificate verify failed", tls._ssl_reason(reason.value))
        self.assertFalse(client.shaken.called)
        yield server.lost

    @defer.inlineCallbacks
    def test_wrong_host_name_fails_with_verification_error(self):
        server, client = self.pair(client=Side(self.verify.creator("localhost")))
        yield client.lost
        reason = client.reason
        self.assertEqual(type(reason.value).__name__, "VerificationError")
        self.assertIn("not valid for host 'localhost'",
                      tls.describe_handshake_failure(reason, "localhost", 1))
        yield server.lost

    @defer.inlineCallbacks
    def test_plain_text_peer_fails_the_handshake(self):
        server, client = self.pair(client=Bare(b"\x00\x00\x00\x08\x04\xd2\x16\x2f" * 100))
        yield server.lost
        self.assertIsInstance(server.reason.value, SSL.Error)
        self.assertFalse(server.shaken.called)
        yield client.lost

    @defer.inlineCallbacks
    def test_close_during_handshake_aborts(self):
        server, client = self.pair(client=Bare())
        yield task.deferLater(reactor, 0.05, lambda: None)
        server.transport.write(b"held")
        server.transport.loseConnection()
        yield server.lost
        self.assertIsInstance(server.reason.value, error.ConnectionAborted)
        yield client.lost

    def test_other_transports_are_left_to_twisted(self):
        self.assertFalse(tlssock.start_tls(StringTransport(), self.options))


class DataTests(TLSSocketTestCase):
    @defer.inlineCallbacks
    def test_large_records_are_read_together(self):
        server, client = yield self.established()
        data = bytes(i % 253 for i in range(1024 * 1024))
        client.transport.write(data)
        got = yield server.bytes(len(data))
        self.assertEqual(got, data)
        # 16 KiB records, several per read (up to Twisted's 64 KiB).
        self.assertLess(len(server.chunks), len(data) // tlssock.RECORD)
        self.assertLessEqual(max(map(len, server.chunks)), tlssock.BUFSIZE)

    @defer.inlineCallbacks
    def test_slow_reader_pauses_the_writer_and_loses_nothing(self):
        """The reader stops reading: SSL_write meets a full socket (OpenSSL
        keeps a record half sent and needs the same bytes again), the chunk
        goes to Twisted's buffer whole, the producer is registered and
        paused; once the reader reads again everything arrives, in order."""
        server, client = yield self.established()
        client.transport.pauseProducing()
        total = 32 * 1024 * 1024
        p = Producer(server.transport, total)
        p.run()
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertTrue(p.paused)
        self.assertGreater(p.pauses, 0)
        self.assertIs(server.transport.producer, p)
        t = server.transport
        held = len(t.dataBuffer) - t.offset + t._tempDataLen
        self.assertLessEqual(held, 4 * 1024 * 1024)
        self.assertLess(p.pos, total)
        client.transport.resumeProducing()
        got = yield client.bytes(total)
        self.assertEqual(len(got), total)
        self.assertTrue(got == p.data, "bytes lost, repeated or reordered")
        yield p.done

    @defer.inlineCallbacks
    def test_writer_that_never_reads_closes_without_a_reset(self):
        """A TLS 1.3 client receives session tickets after the handshake; one
        that writes, closes and never reads them must not reset the
        connection (closing a socket with unread bytes sends RST, and the
        peer then loses what it had not read): all arrives, cleanly."""
        for _ in range(3):
            server, client = yield self.established()
            data = bytes(i % 249 for i in range(2 * 1024 * 1024))
            client.transport.write(data)
            client.transport.loseConnection()
            yield server.lost
            self.assertEqual(server.total, len(data))
            self.assertTrue(b"".join(server.chunks) == data)
            self.assertIsInstance(server.reason.value, error.ConnectionDone)

    @defer.inlineCallbacks
    def test_close_notify_both_ways(self):
        server, client = yield self.established()
        server.transport.write(b"last words")
        server.transport.loseConnection()
        self.assertEqual((yield client.bytes(10)), b"last words")
        yield client.lost
        # The peer's close_notify: a clean end, not a lost connection.
        self.assertIsInstance(client.reason.value, error.ConnectionDone)
        yield server.lost


CHILD = r'''
import json, os, signal, sys, time, types
signal.alarm(20)
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor, protocol
from pgcat_tw import fastpoll, tls, tlssock

certs = json.loads(os.environ["TLS_CERTS"])
general = types.SimpleNamespace(tls_certificate=certs["cert"], tls_private_key=certs["key"],
                                verify_client_certificate=False, tls_ca_file=None)
options = tls.client_side_options(general)
creator = tls.ServerConnector(True, certs["ca"]).creator("127.0.0.1")
result = {"installed": fastpoll.install(reactor), "round_trips": 0, "order": [],
          "bulk": None, "generic_reads": 0, "classes": []}

# fastpoll reads established TLS connections itself: count what still goes
# through the generic dispatch (doRead).
for cls in tlssock.ESTABLISHED:
    orig = cls.doRead
    def counted(self, orig=orig):
        result["generic_reads"] += 1
        return orig(self)
    cls.doRead = counted

class TLSSide(protocol.Protocol):
    creator = options
    def connectionMade(self):
        tlssock.start_tls(self.transport, self.creator)
    def handshakeCompleted(self):
        result["classes"].append(type(self.transport).__name__)
        self.up()
    def up(self):
        pass
from zope.interface import classImplements
from twisted.internet.interfaces import IHandshakeListener
classImplements(TLSSide, IHandshakeListener)

class Echo(TLSSide):
    def dataReceived(self, data):
        self.transport.write(data)

class Pinger(TLSSide):
    creator = creator
    def up(self):
        self.transport.write(b"ping")
    def dataReceived(self, data):
        result["round_trips"] += 1
        self.transport.write(b"ping")

pair = {}
class Recorder(TLSSide):
    side = None
    def up(self):
        pair[self.side] = self
        if len(pair) == 2:
            reactor.callLater(0.05, both_readable)
    def dataReceived(self, data):
        result["order"].append(self.side)
class Accepted(Recorder):
    side = "accepted"
class Outgoing(Recorder):
    side = "outgoing"
    creator = creator

def both_readable():
    # The accepted side becomes readable first; the next poll reports both.
    pair["outgoing"].transport.write(b"a")
    pair["accepted"].transport.write(b"b")

BULK = bytes(range(256)) * 8192  # 2 MiB: many 16 KiB records
class BulkSender(TLSSide):
    creator = creator
    def up(self):
        self.transport.write(BULK)
        self.transport.loseConnection()
class BulkReceiver(TLSSide):
    chunks = None
    def dataReceived(self, data):
        if self.chunks is None:
            self.chunks = []
        self.chunks.append(data)
    def connectionLost(self, reason):
        got = b"".join(self.chunks or [])
        result["bulk"] = {"intact": got == BULK, "chunks": len(self.chunks or []),
                          "received": len(got), "at": round(time.monotonic() - START, 3),
                          "reason": str(reason.value),
                          "clean": reason.check(protocol.connectionDone.type) is not None}

def listen(cls):
    return reactor.listenTCP(0, protocol.Factory.forProtocol(cls), interface="127.0.0.1")

def connect(cls, port):
    protocol.ClientCreator(reactor, cls).connectTCP("127.0.0.1", port.getHost().port)

p1, p2, p3 = listen(Echo), listen(Accepted), listen(BulkReceiver)
reactor.callWhenRunning(connect, Pinger, p1)
reactor.callWhenRunning(connect, Outgoing, p2)
reactor.callWhenRunning(connect, BulkSender, p3)
START = time.monotonic()
reactor.callLater(1.5, reactor.stop)
reactor.run()
print(json.dumps(result))
'''


class FastPollTLSTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_tls_read_inline_by_fastpoll(self):
        certs = CertSet(self.mktemp())
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TLS_CERTS=json.dumps({"cert": certs.server_cert, "key": certs.server_key,
                                         "ca": certs.ca}))
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-c", CHILD], env=env)
        self.assertEqual(code, 0, err.decode(errors="replace"))
        r = json.loads(out.decode().strip().splitlines()[-1])
        self.assertTrue(r["installed"])
        self.assertEqual(sorted(set(r["classes"])), ["TLSClient", "TLSServer"])
        # Ping-pong over TLS without pause, all read by fastpoll itself.
        self.assertGreater(r["round_trips"], 500)
        # (Events that are not a plain read, say readable and writable at
        # once, go through the generic dispatch.)
        self.assertLess(r["generic_reads"] * 20, r["round_trips"])
        # 2 MiB in 16 KiB records arrives whole, several records per read,
        # and the sender's close is a clean one (close_notify).
        self.assertEqual(r["bulk"]["intact"], True, r["bulk"])
        self.assertLess(r["bulk"]["chunks"], 128)
        self.assertTrue(r["bulk"]["clean"])
        # Outgoing (a pooler's servers) before accepted (its clients).
        self.assertEqual(r["order"], ["outgoing", "accepted"])
