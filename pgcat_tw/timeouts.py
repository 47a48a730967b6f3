"""Client and statement timeouts, swept on a tick (L2), never a timer per
transaction.

Each sweep looks at every client in its work phase and compares the times
the hot path already records (``ServerScanner.query_start``: when the
current request was sent or the last answer came; ``bound_at``; the
waiter's ``since``) with the settings in force:

- ``statement_timeout`` (per user, ms): a request unanswered for longer is
  cancelled on the server with a CancelRequest; the client gets the
  server's own error and stays connected (PgCat closes it);
- ``idle_client_in_transaction_timeout`` (ms): a client idle inside a
  transaction for longer loses the transaction: the server is rolled back
  (and, in transaction mode, goes back to its pool); the client's next
  request is answered with PgCat's error ``idle transaction timeout``
  (``ClientProtocol.idle_transaction_timeout``).

The sweep runs every ``SWEEP`` seconds while a timeout is configured.
"""

from twisted.application.internet import TimerService

from pgcat_tw.cancel import forward_cancel
from pgcat_tw.protocol import codes

SWEEP = 0.1   # seconds between two sweeps


class Timeouts(TimerService):
    def __init__(self, reactor, get_cluster, get_clients, interval=SWEEP):
        self._reactor = reactor
        self._get_cluster = get_cluster
        self._get_clients = get_clients
        TimerService.__init__(self, interval, self.sweep)
        self.clock = reactor

    def sweep(self, now=None):
        if now is None:
            now = self._reactor.seconds()
        g = self._get_cluster().config.general
        idle_tx = g.idle_client_in_transaction_timeout / 1000.0
        for client in list(self._get_clients()):
            server = client.server
            if server is None or client.scanner is None:
                continue
            statement = client.user_pool.settings.statement_timeout / 1000.0
            if not (statement or idle_tx):
                continue
            self._check(client, server, now, statement, idle_tx)

    def _check(self, client, server, now, statement, idle_tx):
        ss = server.scanner
        cs = client.scanner
        since = ss.query_start
        if cs.pending > 0 or cs.unsynced or cs.in_copy:
            if statement and now - since >= statement and ss.cancelled_at != since:
                ss.cancelled_at = since   # once per request
                forward_cancel(self._reactor, server.host, server.port, server.pid,
                               server.secret)
        elif idle_tx and ss.tx_status != codes.TX_IDLE and now - since >= idle_tx \
                and ss.at_boundary and cs.at_boundary:
            client.idle_transaction_timeout()
