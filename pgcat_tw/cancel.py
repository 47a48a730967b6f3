"""CancelRequest handling: the pooler's client keys and forwarding to servers."""

import os
import struct

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from pgcat_tw.protocol import messages as m

log = Logger()


class CancelKeys:
    """Maps the BackendKeyData the pooler gave each client to that client."""

    def __init__(self):
        self._clients = {}

    def register(self, client):
        while True:
            pid, secret = struct.unpack("!ii", os.urandom(8))
            pid &= 0x7FFFFFFF
            if pid and (pid, secret) not in self._clients:
                break
        self._clients[(pid, secret)] = client
        return pid, secret

    def unregister(self, key):
        self._clients.pop(key, None)

    def lookup(self, pid, secret):
        return self._clients.get((pid, secret))

    def __len__(self):
        return len(self._clients)


class _CancelSender(Protocol):
    def __init__(self, pid, secret):
        self._packet = m.cancel_request(pid, secret)

    def connectionMade(self):
        self.transport.write(self._packet)
        # The server closes the connection after reading the request.
        self.transport.loseConnection()


def forward_cancel(reactor, host, port, pid, secret, timeout=5):
    """Open a new connection to the server and send it a CancelRequest."""
    from pgcat_tw.backend import _endpoint, quiet_factory

    d = _endpoint(reactor, host, port, timeout).connect(
        quiet_factory(_CancelSender(pid, secret)))
    d.addErrback(lambda f: log.warn("could not forward cancel request to {host}:{port}: {e}",
                                    host=host, port=port, e=f.getErrorMessage()))
    return d
