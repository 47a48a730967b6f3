"""A fault-injecting TCP proxy for the integration tests, running in trial's
reactor: put it between the pooler and a PostgreSQL node and switch its mode
while clients run.

Modes (``proxy.mode``):

``pass``       forward both ways (``delay`` seconds added to each chunk if set);
``blackhole``  accept connections but forward nothing, either way (a host
               that stopped answering: connects "hang" at login, queries
               never return);
``mute``       forward what the pooler sends but drop what the server answers
               (the server got the query, the answer never comes back);
``reset``      abort every link (RST) and every new connection at once
               (a crashed host whose port refuses).

``reset_links()`` aborts the current links without changing the mode.
Counters: ``accepted`` (connections accepted), ``up_bytes`` (bytes received
from the pooler side), ``links`` (live links).
"""

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint


class _Upstream(protocol.Protocol):
    """The proxy's connection to the real server."""

    def __init__(self, link):
        self.link = link

    def connectionMade(self):
        self.link.upstream_ready(self)

    def dataReceived(self, data):
        self.link.from_server(data)

    def connectionLost(self, reason):
        self.link.upstream_lost()


class _Link(protocol.Protocol):
    """One accepted connection (pooler side) and its upstream."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.upstream = None
        self.pending = []
        self.closed = False

    def connectionMade(self):
        p = self.proxy
        p.accepted += 1
        if p.mode == "reset":
            self.transport.abortConnection()
            return
        p.links.add(self)
        ep = TCP4ClientEndpoint(p.reactor, p.host, p.port, timeout=5)
        d = ep.connect(protocol.Factory.forProtocol(lambda: _Upstream(self)))
        d.addErrback(lambda f: self.abort())

    def upstream_ready(self, up):
        if self.closed:
            up.transport.abortConnection()
            return
        self.upstream = up
        pending, self.pending = self.pending, []
        for data in pending:
            self._to_server(data)

    def dataReceived(self, data):
        p = self.proxy
        p.up_bytes += len(data)
        if p.mode == "blackhole":
            return
        if self.upstream is None:
            self.pending.append(data)
        else:
            self._to_server(data)

    def _to_server(self, data):
        self._later(self.upstream.transport, data)

    def from_server(self, data):
        p = self.proxy
        if p.mode in ("blackhole", "mute"):
            return
        self._later(self.transport, data)

    def _later(self, transport, data):
        delay = self.proxy.delay
        if delay:
            self.proxy.reactor.callLater(delay, self._write, transport, data)
        else:
            transport.write(data)

    def _write(self, transport, data):
        if not self.closed:
            transport.write(data)

    def upstream_lost(self):
        if not self.closed:
            self.transport.loseConnection()

    def abort(self):
        if self.transport is not None:
            self.transport.abortConnection()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()

    def connectionLost(self, reason):
        self.closed = True
        self.proxy.links.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class FaultProxy:
    def __init__(self, host, port, reactor=reactor):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.mode = "pass"
        self.delay = 0.0
        self.accepted = 0
        self.up_bytes = 0
        self.links = set()
        self.listening = None
        self.listen_port = None

    @defer.inlineCallbacks
    def start(self):
        factory = protocol.Factory.forProtocol(lambda: _Link(self))
        factory.noisy = False
        ep = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.listening = yield ep.listen(factory)
        self.listen_port = self.listening.getHost().port
        return self

    def set_mode(self, mode, delay=None):
        assert mode in ("pass", "blackhole", "mute", "reset"), mode
        self.mode = mode
        if delay is not None:
            self.delay = delay
        if mode == "reset":
            self.reset_links()

    def reset_links(self):
        for link in list(self.links):
            link.abort()

    @defer.inlineCallbacks
    def stop(self):
        if self.listening is not None:
            yield self.listening.stopListening()
            self.listening = None
        self.reset_links()
        # Let the aborted links finish closing (clean reactor for trial).
        for _ in range(50):
            if not self.links:
                break
            d = defer.Deferred()
            self.reactor.callLater(0.01, d.callback, None)
            yield d
