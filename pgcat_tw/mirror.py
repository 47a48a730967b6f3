"""Mirroring (PgCat's ``mirrors = [[host, port, server_index]]`` per
shard): every byte a client sends to a mirrored server is also sent to
each of its mirrors, best effort (L2).

Each server connection of a mirrored address gets one ``Mirror`` per
mirror address: a connection of its own (same user, password and database)
that lives and dies with its main connection. What the client writes to
the main server goes through ``mirrored_writer``: first to the main server
(exactly as without a mirror), then appended to each mirror. A mirror that
is not logged in yet, or whose socket does not take more, keeps at most
``QUEUE_LIMIT`` bytes queued; beyond that chunks are dropped and counted
(``dropped``, ``dropped_bytes``). What a mirror answers is read and
dropped. A mirror that fails or closes is connected again after
``RETRY`` seconds while its main connection lives; nothing it does reaches
the client or slows the main traffic.

A pool without mirrors pays nothing: its servers keep the plain writer.

Mirror answers are not parsed: a mirror that cannot run what the main
server ran (a statement prepared by the pooler there, not here) logs its
own errors, which are dropped like its results.
"""

from collections import deque

from twisted.logger import Logger

from pgcat_tw import backend

log = Logger()

QUEUE_LIMIT = 1 << 20    # bytes queued per mirror while it cannot take them
RETRY = 1.0              # seconds before a failed mirror connection is retried
WRITE_LIMIT = 1 << 20    # bytes buffered in a mirror's transport before chunks are dropped
READ_INTERVAL = 0.02     # seconds between reads of a mirror's (dropped) answers


class MirrorStats:
    """Counters of one mirror address (over its connections)."""

    __slots__ = ("host", "port", "index", "sent", "sent_bytes", "dropped", "dropped_bytes",
                 "connected", "failures")

    def __init__(self, host, port, index):
        self.host, self.port, self.index = host, port, index
        self.sent = self.sent_bytes = self.dropped = self.dropped_bytes = 0
        self.connected = 0      # mirror connections up now
        self.failures = 0


class Mirror:
    """One mirror connection, paired with one main server connection."""

    def __init__(self, reactor, stats, connect):
        self.reactor = reactor
        self.stats = stats
        self._connect = connect      # () -> Deferred firing with a logged-in ServerConnection
        self.conn = None
        self.queue = deque()
        self.queued = 0
        self.closed = False
        self._retry = None
        self._resume = None          # the DelayedCall that reads the answers again
        self._start()

    def _start(self):
        self._retry = None
        if self.closed:
            return
        d = self._connect()
        d.addCallbacks(self._up, self._failed)

    def _up(self, conn):
        if self.closed:
            conn.close()
            return
        self.conn = conn
        self.stats.connected += 1
        conn.dataReceived = self._answers   # answers are read and dropped
        lost = conn.connectionLost

        def connection_lost(reason, lost=lost, conn=conn):
            lost(reason)
            self._lost(conn)
        conn.connectionLost = connection_lost
        queue, self.queue, self.queued = self.queue, deque(), 0
        for data in queue:
            self.write(data)

    def _answers(self, data):
        """Answers are dropped. Read one by one they would cost the pooler
        a wakeup and a read per statement: the mirror's socket is read
        every READ_INTERVAL instead, its kernel buffer holding what comes
        in between (PostgreSQL only stops when that buffer is full)."""
        conn = self.conn
        if conn is None or conn.transport is None:
            return
        conn.transport.pauseProducing()
        if self._resume is None:
            self._resume = self.reactor.callLater(READ_INTERVAL, self._read_again)

    def _read_again(self):
        self._resume = None
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.resumeProducing()

    def _failed(self, failure):
        self.stats.failures += 1
        if not self.closed:
            log.debug("mirror {host}:{port}: {why}", host=self.stats.host,
                      port=self.stats.port, why=failure.getErrorMessage())
            self._retry = self.reactor.callLater(RETRY, self._start)

    def _lost(self, conn):
        if conn is self.conn:
            self.conn = None
            self.stats.connected -= 1
            if not self.closed:
                self.stats.failures += 1
                self._retry = self.reactor.callLater(RETRY, self._start)

    def write(self, data):
        """Send ``data`` if the mirror can take it, else queue or drop it."""
        if self.closed:
            return
        stats = self.stats
        conn = self.conn
        if conn is not None:
            t = conn.transport
            if t is not None and t.connected and not t.disconnecting:
                buffered = len(getattr(t, "dataBuffer", b"")) + sum(
                    map(len, getattr(t, "_tempDataBuffer", ())))
                if buffered <= WRITE_LIMIT:
                    # The server connection's own writer: sent at once when
                    # nothing is buffered (no writer registration per
                    # chunk); no peer, so the client is never paused for it.
                    conn.writer(t, data, None)
                    stats.sent += 1
                    stats.sent_bytes += len(data)
                    return
        if self.queued + len(data) <= QUEUE_LIMIT and conn is None:
            self.queue.append(data)
            self.queued += len(data)
            return
        stats.dropped += 1
        stats.dropped_bytes += len(data)

    def close(self):
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        self.queue.clear()
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.stats.connected -= 1
            conn.close()


def mirrored_writer(write, mirrors):
    """The writer a client uses for a mirrored server: the main write, then
    each mirror (``write(transport, data, peer)`` is the plain writer)."""
    def write_mirrored(transport, data, peer):
        write(transport, data, peer)
        for m in mirrors:
            m.write(data)
    return write_mirrored


class MirrorSet:
    """The mirrors of one address pool (from its shard's ``mirrors``), and
    their counters; attaches mirrors to each new server connection."""

    def __init__(self, reactor, targets, user_pool):
        self.reactor = reactor
        self.user_pool = user_pool
        self.stats = [MirrorStats(host, port, index) for host, port, index in targets]

    def attach(self, conn, database):
        """A new main server connection: give it its mirrors."""
        up = self.user_pool
        mirrors = []
        for st in self.stats:
            def connect(st=st):
                return backend.connect(self.reactor, st.host, st.port, up.server_user,
                                       up.server_password, database,
                                       conn.pool.connect_timeout if conn.pool else 5.0,
                                       keepalive=up.keepalive, tls=up.tls)
            mirrors.append(Mirror(self.reactor, st, connect))
        conn.mirrors = mirrors
        plain = getattr(conn, "unmirrored_writer", None) or conn.writer
        conn.unmirrored_writer = plain
        conn.writer = mirrored_writer(plain, mirrors)

    @staticmethod
    def detach(conn):
        """The main connection is gone, or its mirrors changed on a reload:
        its mirrors go, and it gets its plain writer back."""
        for m in getattr(conn, "mirrors", ()):
            m.close()
        conn.mirrors = ()
        plain = getattr(conn, "unmirrored_writer", None)
        if plain is not None:
            conn.writer = plain

    @staticmethod
    def replace(connections, mirror_set, database):
        """A reload changed an address's mirrors: its existing connections
        drop their mirrors and get the new set's (``mirror_set``, or None
        for none). A client inside a transaction keeps the writer it was
        bound with until the transaction ends (its old mirrors drop what
        it still sends)."""
        for conn in connections:
            MirrorSet.detach(conn)
            if mirror_set is not None:
                mirror_set.attach(conn, database)
