"""The hot path: bytes between a client and its server.

Rules (docs/architecture.rst, "Hot-path rules"): every received chunk is
forwarded verbatim with one write; message headers are walked with
``struct.unpack_from`` by a ``Scanner`` that only looks into the few bodies
that matter; no Deferreds, logging or exceptions per message.

The transaction bookkeeping lives in two scanners:

``ClientScanner`` counts the sync points a client has sent (each Query,
Sync and FunctionCall is answered by exactly one ReadyForQuery; Syncs sent
while an extended-protocol COPY FROM STDIN is in progress are ignored by the
server and so are not counted), notes extended-protocol messages not yet
followed by a Sync, named Parse messages and Terminate.

``ServerScanner`` sees ReadyForQuery (status and one answered sync point),
ParameterStatus (server value and, when bound, the client's tracked value),
CommandComplete tags that leave session state behind, CopyInResponse and
errors.

A transaction-mode server can go back to its pool when ReadyForQuery 'I'
arrives and ``ClientScanner.idle`` is true.
"""

import errno

from pgcat_tw.protocol import codes
from pgcat_tw.protocol.framing import INVALID, SKIP, Scanner, want_table
from pgcat_tw.protocol.messages import parse_parameter_status

# Parameters whose client value is re-applied on whichever server a client's
# transaction lands on (the same five PgCat tracks).
TRACKED_PARAMETERS = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "standard_conforming_strings",
    "application_name",
)

_Q = codes.F_QUERY
_SYNC = codes.F_SYNC
_EXEC = codes.F_EXECUTE
_PARSE = codes.F_PARSE
_TERM = codes.F_TERMINATE
_FCALL = codes.F_FUNCTION_CALL
_CDONE = codes.F_COPY_DONE
_CFAIL = codes.F_COPY_FAIL

_Z = codes.B_READY_FOR_QUERY
_PSTATUS = codes.B_PARAMETER_STATUS
_CC = codes.B_COMMAND_COMPLETE
_COPYIN = codes.B_COPY_IN_RESPONSE
_ERR = codes.B_ERROR

CLIENT_WANT = want_table(
    {
        "Q": 1, "S": 1, "E": 1, "P": 1, "X": 1, "F": 1, "c": 1, "f": 1,
        "B": 1, "D": 1, "C": 1, "d": SKIP, "H": SKIP,
    },
    default=INVALID,
)

SERVER_WANT = want_table({"Z": 1, "S": 0x7FFFFFFF, "C": 8, "G": 1, "E": 1})

# CommandComplete tags that leave session state on a server connection,
# by first byte (one set lookup for the common tags like SELECT/INSERT).
_DIRTY_TAGS = {ord("S"): b"SET", ord("P"): b"PREPARE", ord("L"): b"LISTEN",
               ord("D"): b"DECLARE"}


class ClientScanner(Scanner):
    __slots__ = ("pending", "unsynced", "terminate_at", "last_extended", "since_exec",
                 "in_copy", "in_copy_ext", "copy_ended", "named_parse", "params", "queries")

    def __init__(self, max_len):
        Scanner.__init__(self, CLIENT_WANT, max_len)
        self.pending = 0          # sync points not yet answered by ReadyForQuery
        self.unsynced = False     # extended messages sent since the last Sync
        self.terminate_at = None  # offset of Terminate in the current chunk
                                  # (negative: its header began in the previous one)
        self.last_extended = False
        self.since_exec = 0       # Syncs sent since the last Execute
        self.in_copy = False      # COPY FROM STDIN: client has not sent CopyDone/Fail
        self.in_copy_ext = False  # ... and it was started by an extended Execute
        self.copy_ended = False   # CopyDone/CopyFail seen in this chunk
        self.named_parse = False  # a named Parse was sent (statement on server)
        self.params = {}          # the client's tracked parameter values
        self.queries = 0

    @property
    def idle(self):
        """Nothing sent that the server has not answered, no partial message."""
        return (self.pending <= 0 and not self.unsynced and not self.in_copy
                and self.at_boundary)

    def on_message(self, t, buf, start, end):
        if t == _Q:
            self.pending += 1
            self.queries += 1
            self.last_extended = False
        elif t == _SYNC:
            if not self.in_copy_ext:
                self.pending += 1
                self.since_exec += 1
                self.unsynced = False
        elif t == _EXEC:
            self.unsynced = True
            self.last_extended = True
            self.since_exec = 0
            self.queries += 1
        elif t == _PARSE:
            self.unsynced = True
            if end > start and buf[start] != 0:
                self.named_parse = True
        elif t == _TERM:
            self.terminate_at = start - 5
        elif t == _FCALL:
            self.pending += 1
        elif t == _CDONE or t == _CFAIL:
            # After a failed COPY the server has already answered and drops
            # these silently: the owner re-checks release when it sees this.
            self.in_copy = False
            self.in_copy_ext = False
            self.copy_ended = True
        else:  # Bind, Describe, Close: answered only after a Sync/Flush
            self.unsynced = True


class ServerScanner(Scanner):
    __slots__ = ("client", "tx_status", "rfq", "params", "dirty", "errors")

    def __init__(self):
        Scanner.__init__(self, SERVER_WANT)
        self.client = None        # the bound client's ClientScanner
        self.tx_status = codes.TX_IDLE
        self.rfq = False          # a ReadyForQuery arrived in this chunk
        self.params = {}          # the server's current reported parameters
        self.dirty = False        # session state left behind: reset before reuse
        self.errors = 0

    def on_message(self, t, buf, start, end):
        if t == _Z:
            self.tx_status = buf[start]
            self.rfq = True
            client = self.client
            if client is not None:
                client.pending -= 1
        elif t == _CC:
            tag = _DIRTY_TAGS.get(buf[start])
            if tag is not None and buf.startswith(tag, start) \
                    and (end - start == len(tag) or buf[start + len(tag)] in (0, 32)):
                self.dirty = True
        elif t == _PSTATUS:
            try:
                name, value = parse_parameter_status(buf[start:end])
            except ValueError:
                return
            self.params[name] = value
            client = self.client
            if client is not None and name in client.params:
                client.params[name] = value
        elif t == _ERR:
            self.errors += 1
        else:  # CopyInResponse
            client = self.client
            if client is not None:
                client.in_copy = True
                if client.last_extended:
                    # The Syncs the client sent after the Execute that started
                    # this COPY are ignored by the server until CopyDone/CopyFail.
                    client.pending -= client.since_exec
                    client.since_exec = 0
                    client.in_copy_ext = True


# --- write-through -----------------------------------------------------------
#
# Twisted's transport.write() only appends to a buffer and asks the reactor to
# watch the socket for writability; the data goes out on the next reactor pass
# (two epoll_ctl calls and a loop iteration per relayed chunk). When nothing is
# queued we send straight away and hand only what the kernel did not take to
# the normal buffering (which also keeps producer pausing working).

def _fast_capable(transport):
    """True for a plain twisted TCP transport whose internals we know."""
    try:
        from twisted.internet import tcp
    except ImportError:  # pragma: no cover
        return False
    return (
        isinstance(transport, tcp.Connection)
        and hasattr(transport, "_tempDataBuffer")
        and hasattr(transport, "dataBuffer")
        and hasattr(transport, "socket")
        and not getattr(transport, "TLS", False)
    )


_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR)


def write_through(transport, data, peer):
    """Write ``data`` to a plain TCP transport, sending directly when its
    buffer is empty. Whatever the kernel does not take goes to Twisted's
    buffer, and only then is ``peer`` (the transport feeding this one)
    registered as its streaming producer, so that a slow reader pauses the
    fast writer. Only for transports ``writer_for`` chose this function for."""
    if not (transport.dataBuffer or transport._tempDataBuffer) and transport.connected \
            and not transport.disconnecting:
        try:
            sent = transport.socket.send(data)
        except OSError as e:
            if e.errno not in _AGAIN:
                # Let Twisted discover and report the failure its own way.
                transport.write(data)
                return
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    if transport.producer is None and peer is not None and transport.connected:
        transport.registerProducer(peer, True)
    transport.write(data)


def plain_write(transport, data, peer):
    """Buffered write through any ITransport (TLS, test transports)."""
    if peer is not None and getattr(transport, "producer", True) is None \
            and getattr(transport, "connected", True):
        transport.registerProducer(peer, True)
    transport.write(data)


def detach_producer(transport, peer):
    """Undo a registration made by a writer and resume ``peer`` in case it
    was paused on ``transport``'s behalf."""
    if transport is not None and peer is not None \
            and registered_producer(transport) is peer:
        transport.unregisterProducer()
        peer.resumeProducing()


def registered_producer(transport):
    """The producer registered on ``transport``. On a TLS transport Twisted
    registers a wrapper (``_ProducerMembrane``) holding it."""
    p = getattr(transport, "producer", None)
    if p is not None and getattr(transport, "TLS", False):
        p = getattr(p, "_producer", p)
    return p


def writer_for(transport):
    """The write function to use for a transport (decided once per connection)."""
    return write_through if _fast_capable(transport) else plain_write
