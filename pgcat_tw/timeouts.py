"""Client and statement timeouts, swept on a tick (L2), never a timer per
transaction.

Each sweep looks at every client in its work phase and compares the times
the hot path already records (``ServerScanner.query_start``: when the
current request was sent or the last answer came; ``bound_at``; the
waiter's ``since``) with the settings in force:

- ``statement_timeout`` (per user, else ``[general]``'s, ms): a request
  unanswered for longer is cancelled on the server with a CancelRequest; the
  client gets the server's own error and stays connected (PgCat closes it);
- ``idle_client_in_transaction_timeout`` (ms): a client idle inside a
  transaction for longer loses the transaction: the server is rolled back
  (and, in transaction mode, goes back to its pool); the client's next
  request is answered with PgCat's error ``idle transaction timeout``
  (``ClientProtocol.idle_transaction_timeout``);
- ``transaction_timeout`` (ms, PgBouncer 1.25's): a client whose
  transaction lasts longer is disconnected (FATAL 25P04); its server is
  rolled back, or closed if it was mid-answer;
- ``client_idle_timeout`` (ms): a client that sent nothing for longer while
  it held no server is disconnected (FATAL 57P05);
- ``query_wait_notify`` (ms): a client waiting for a server longer gets one
  NOTICE per wait (it goes on waiting, up to its query_wait_timeout).

The sweep runs every ``SWEEP`` seconds; with no timeout set it does
nothing.
"""

from twisted.application.internet import TimerService

from pgcat_tw.cancel import forward_cancel
from pgcat_tw.errors import PgError
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m

SWEEP = 0.1   # seconds between two sweeps


class Limits:
    """The timeouts in force, in seconds (0: off)."""

    __slots__ = ("idle_tx", "transaction", "client_idle", "notify", "statement")

    def __init__(self, general):
        self.idle_tx = general.idle_client_in_transaction_timeout / 1000.0
        self.transaction = general.transaction_timeout / 1000.0
        self.client_idle = general.client_idle_timeout / 1000.0
        self.notify = general.query_wait_notify / 1000.0
        self.statement = general.statement_timeout / 1000.0


class Timeouts(TimerService):
    def __init__(self, reactor, get_cluster, get_clients, interval=SWEEP):
        self._reactor = reactor
        self._get_cluster = get_cluster
        self._get_clients = get_clients
        self._limits = (None, None)   # (general, Limits)
        TimerService.__init__(self, interval, self.sweep)
        self.clock = reactor

    def limits(self):
        general = self._get_cluster().config.general
        if self._limits[0] is not general:
            self._limits = (general, Limits(general))
        return self._limits[1]

    def sweep(self, now=None):
        if now is None:
            now = self._reactor.seconds()
        lim = self.limits()
        per_user = any(up.settings.statement_timeout
                       for up in self._get_cluster().user_pools.values())
        if not (per_user or lim.idle_tx or lim.transaction or lim.client_idle or lim.notify):
            return
        for client in list(self._get_clients()):
            if client.scanner is None or client._closing or client.transport is None:
                continue
            server = client.server
            if server is not None:
                self._bound(client, server, now, lim)
            elif client._waiting is not None:
                self._waiting(client, now, lim)
            elif lim.client_idle:
                self._idle(client, now, lim)

    def _bound(self, client, server, now, lim):
        ss = server.scanner
        cs = client.scanner
        if ss.tx_status == codes.TX_IDLE:
            ss.tx_seen = None
        elif ss.tx_seen is None:
            # (Transaction mode: it began when the server was bound.)
            ss.tx_seen = ss.bound_at if client.transaction_mode else now
        if lim.transaction and ss.tx_seen is not None and now - ss.tx_seen >= lim.transaction:
            client._fatal(PgError("terminating connection due to transaction timeout",
                                  sqlstate="25P04", severity="FATAL"))
            return
        since = ss.query_start
        if cs.pending > 0 or cs.unsynced or cs.in_copy:
            statement = client.user_pool.settings.statement_timeout / 1000.0
            if statement and now - since >= statement and ss.cancelled_at != since:
                ss.cancelled_at = since   # once per request
                forward_cancel(self._reactor, server.host, server.port, server.pid,
                               server.secret)
        elif lim.idle_tx and ss.tx_status != codes.TX_IDLE and now - since >= lim.idle_tx \
                and ss.at_boundary and cs.at_boundary:
            client.idle_transaction_timeout()

    def _waiting(self, client, now, lim):
        since = client._waiter.since
        if lim.notify and now - since >= lim.notify and client.notified_wait != since:
            client.notified_wait = since
            pool = client._waiting[0]
            client.transport.write(m.notice_response(
                f"waiting for a server connection for {now - since:.1f} s: all "
                f"{pool.pool_size} connections of {pool.name} are in use"))

    def _idle(self, client, now, lim):
        received = client.scanner.received
        if client.idle_mark is None or client.idle_mark[0] != received \
                or client._checking_out:
            client.idle_mark = (received, now)
        elif now - client.idle_mark[1] >= lim.client_idle:
            client._fatal(PgError("terminating connection due to idle-session timeout",
                                  sqlstate="57P05", severity="FATAL"))
