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
import os
import types

from pgcat_tw.prepared import (
    ACK_BIND,
    ACK_BIND_CUT,
    ACK_NODATA_CUT,
    ACK_CLOSE,
    ACK_CLOSE_CUT,
    ACK_PARSE,
    ACK_PARSE_CUT,
    ACK_PARSE_FAKE,
    ACK_SYNC,
)
from pgcat_tw.protocol import codes
from pgcat_tw.protocol.framing import INVALID, SKIP, Scanner, want_table
from pgcat_tw.protocol.framing import _HEAD, _NONE, _SKIP, _unpack_header
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



class ParameterValues(dict):
    """A dict of parameter values (a client's tracked ones, or what a server
    reported) that caches the tuple of its TRACKED_PARAMETERS values for the
    checkout's comparison (``frontend._got_server``): two equal tuples mean
    the server needs no SET, in one C-level compare. Every mutation clears
    the cache."""

    __slots__ = ("_tracked",)

    def __init__(self, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        self._tracked = None

    def tracked(self):
        t = self._tracked
        if t is None:
            t = self._tracked = tuple(map(self.get, TRACKED_PARAMETERS))
        return t

    def __setitem__(self, key, value):
        dict.__setitem__(self, key, value)
        self._tracked = None

    def __delitem__(self, key):
        dict.__delitem__(self, key)
        self._tracked = None

    def __ior__(self, other):
        self.update(other)
        return self

    def update(self, *args, **kwargs):
        dict.update(self, *args, **kwargs)
        self._tracked = None

    def pop(self, *args):
        self._tracked = None
        return dict.pop(self, *args)

    def popitem(self):
        self._tracked = None
        return dict.popitem(self)

    def setdefault(self, key, default=None):
        self._tracked = None
        return dict.setdefault(self, key, default)

    def clear(self):
        dict.clear(self)
        self._tracked = None


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
_PARSE_DONE = codes.B_PARSE_COMPLETE
_BIND_DONE = codes.B_BIND_COMPLETE
_CLOSE_DONE = codes.B_CLOSE_COMPLETE
_NO_DATA = codes.B_NO_DATA

# ClientScanner.feed's branch per message type (its inline loop): one list
# lookup instead of a chain of type comparisons. _A_OTHER: on_message.
_A_INVALID, _A_SKIP, _A_UNSYNCED, _A_SYNC, _A_EXEC, _A_QUERY, _A_PARSE, _A_OTHER = range(-1, 7)
_CLIENT_ACTION = [_A_INVALID] * 256
for _t, _a in {"B": _A_UNSYNCED, "D": _A_UNSYNCED, "C": _A_UNSYNCED, "S": _A_SYNC,
               "E": _A_EXEC, "Q": _A_QUERY, "P": _A_PARSE, "X": _A_OTHER, "F": _A_OTHER,
               "c": _A_OTHER, "f": _A_OTHER, "d": _A_SKIP, "H": _A_SKIP}.items():
    _CLIENT_ACTION[ord(_t)] = _a
del _t, _a

# Describe (portal ""), Execute (portal "", all rows), Sync.
_DES_TAIL = b"D\x00\x00\x00\x06P\x00" b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00" b"S\x00\x00\x00\x04"
_DES_LEN = len(_DES_TAIL)

# The generic machinery's table (split headers, peeks): the same types.
CLIENT_WANT = [INVALID if a == _A_INVALID else SKIP if a == _A_SKIP else 1
               for a in _CLIENT_ACTION]

# ParseComplete, BindComplete.
_PARSE_BIND_DONE = b"1\x00\x00\x00\x042\x00\x00\x00\x04"
_PARSE_BIND_LEN = len(_PARSE_BIND_DONE)

SERVER_WANT = want_table({"Z": 1, "S": 0x7FFFFFFF, "C": 16, "G": 1, "E": 1})
# With prepared statements: also the acknowledgements (ParseComplete,
# BindComplete, CloseComplete) and enough of an error to read its SQLSTATE.
SERVER_WANT_PREPARED = want_table({"Z": 1, "S": 0x7FFFFFFF, "C": 16, "G": 1, "E": 256,
                                   "1": 1, "2": 1, "3": 1, "n": 1})

# CommandComplete tags that leave session state on a server connection,
# by first byte (one set lookup for the common tags like SELECT/INSERT):
# settings (SET, RESET), statements, notifications, cursors (WITH HOLD ones
# outlive the transaction), a loaded library, and CREATE TABLE/VIEW/SEQUENCE
# (they may be TEMP ones: the tag does not say).
_DIRTY_TAGS = {ord("S"): (b"SET",), ord("P"): (b"PREPARE",), ord("L"): (b"LISTEN", b"LOAD"),
               ord("D"): (b"DECLARE",), ord("R"): (b"RESET",),
               ord("C"): (b"CREATE TABLE", b"CREATE VIEW", b"CREATE SEQUENCE")}
# Tags with those first bytes that leave nothing (skipped without a call).
_CLEAN_TAGS = (b"SELECT", b"COMMIT", b"COPY")


def _tag_in(buf, start, end, tags):
    """Is the CommandComplete tag at ``buf[start:end]`` one of ``tags``
    (whole words: SET, not SETTINGS)?"""
    for tag in tags:
        if buf.startswith(tag, start) and (
                end - start == len(tag) or buf[start + len(tag)] in (0, 32)):
            return True
    return False


class ClientScanner(Scanner):
    __slots__ = ("pending", "unsynced", "terminate_at", "last_extended", "since_exec",
                 "in_copy", "in_copy_ext", "copy_ended", "named_parse", "params", "queries",
                 "received", "xacts", "errors")

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
        self.params = ParameterValues()  # the client's tracked parameter values
        # Statistics (stats.py): queries sent, bytes received from the client,
        # transactions ended and errors of its servers while bound.
        self.queries = 0
        self.received = 0
        self.xacts = 0
        self.errors = 0

    @property
    def idle(self):
        """Nothing sent that the server has not answered, no partial message."""
        return (self.pending <= 0 and not self.unsynced and not self.in_copy
                and self.at_boundary)

    def feed(self, data):
        """Scanner.feed with the common messages handled inline (one Python
        call per chunk instead of one per message: on the hot path every
        call costs far more than in a warm micro-benchmark). One table
        lookup (``_CLIENT_ACTION``) picks a message's branch; anything not
        plain (a split header or a peek across chunks, Parse without its
        first body byte, a rare type) goes through the generic machinery
        and ``on_message``, with the same effect."""
        n = len(data)
        self.received += n
        pos = 0
        if self.state != _NONE:
            pos = self._resume(data, n)
            if pos < 0:
                return
        action = _CLIENT_ACTION
        max_len = self.max_len
        last = n - 5  # the last position a whole header can start at
        # The usual end of an extended-protocol request (libpq, psycopg,
        # JDBC, pgbench): Describe portal, Execute all rows, Sync. When the
        # chunk ends with those 22 bytes, walk only the messages before
        # them; if the walk lands exactly there, they are those three
        # messages (applied at once below), else they were the inside of a
        # longer message and the walk goes on as usual.
        tail = -1
        if n >= _DES_LEN and data[-1] == 4 and data.endswith(_DES_TAIL) and max_len >= 9:
            tail = n - _DES_LEN
            last = tail - 1
        while True:
            while pos <= last:
                t, ln = _unpack_header(data, pos)
                if ln < 4 or ln > max_len:
                    self._bad_length(t, ln)
                a = action[t]
                if a == _A_UNSYNCED:
                    self.unsynced = True
                elif a == _A_SYNC:
                    if not self.in_copy_ext:
                        self.pending += 1
                        self.since_exec += 1
                        self.unsynced = False
                elif a == _A_EXEC:
                    self.unsynced = True
                    self.last_extended = True
                    self.since_exec = 0
                    self.queries += 1
                elif a == _A_QUERY:
                    self.pending += 1
                    self.queries += 1
                    self.last_extended = False
                elif a == _A_PARSE and pos + 5 < n and ln > 4:
                    self.unsynced = True
                    if data[pos + 5]:
                        self.named_parse = True
                elif a:
                    if a < 0:
                        self._bad_type(t)
                    hend = pos + 5
                    end = hend + ln - 4
                    if hend < n or end == hend:
                        self.on_message(t, data, hend, hend + 1 if end > hend else end)
                    else:
                        self._start_peek(t, data, hend, n, 1, end - hend - 1)
                        return
                pos += ln + 1
            if tail >= 0:
                if pos == tail:
                    self.last_extended = True
                    self.queries += 1
                    if self.in_copy_ext:  # (the server ignores this Sync)
                        self.unsynced = True
                        self.since_exec = 0
                    else:
                        self.pending += 1
                        self.since_exec = 1
                        self.unsynced = False
                    pos = n
                else:
                    tail = -1
                    last = n - 5
                    continue
            break
        if pos < n:
            if self.want[data[pos]] < 0:
                self._bad_type(data[pos])
            self._head = data[pos:]
            self.state = _HEAD
        elif pos > n:
            self._skip = pos - n
            self.state = _SKIP

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
    __slots__ = ("client", "tx_status", "rfq", "params", "dirty", "errors", "stmts", "edits",
                 "rfqs", "xacts", "received", "sent", "sent_mark", "bound_at", "query_start",
                 "query_time", "xact_time", "binds", "cancelled_at", "sql_prepared",
                 "tx_seen")

    def __init__(self):
        Scanner.__init__(self, SERVER_WANT)
        self.client = None        # the bound client's ClientScanner
        self.tx_status = codes.TX_IDLE
        self.rfq = False          # a ReadyForQuery arrived in this chunk
        self.params = ParameterValues()  # the server's current reported parameters
        self.dirty = False        # session state left behind: reset before reuse
        self.sql_prepared = False # ... an SQL PREPARE among it (DISCARD ALL then)
        self.stmts = None         # prepared.ServerStatements in prepared mode
        self.edits = []           # (header position, None=cut | new type) for this chunk
        # Statistics (stats.py): requests answered (ReadyForQuery), transactions
        # ended (ReadyForQuery 'I'), ErrorResponses, bytes from the server and
        # to it (``sent``: folded in at unbind from the client's count since
        # ``sent_mark``); times in seconds, from the EventClock: bound since,
        # the current request since, the sums.
        self.rfqs = 0
        self.xacts = 0
        self.errors = 0
        self.received = 0
        self.sent = 0
        self.sent_mark = 0
        self.bound_at = 0.0
        self.query_start = 0.0
        self.query_time = 0.0
        self.xact_time = 0.0
        self.binds = 0            # times it was handed to a client
        self.cancelled_at = None  # query_start of the request a timeout cancelled
        self.tx_seen = None       # when the timeouts' sweep saw its transaction begin

    def use_prepared(self, stmts):
        self.stmts = stmts
        self.want = SERVER_WANT_PREPARED

    def _ack(self, t, start):
        """A ParseComplete/BindComplete/CloseComplete: match it with what was
        sent (prepared.py) and cut or retype it when the pooler caused it."""
        acks = self.stmts.acks
        if not acks:
            return
        kind = acks[0][0]
        if kind == ACK_SYNC:
            return  # not ours to judge (e.g. a Describe's reply order)
        entry = acks.popleft()
        if t == _PARSE_DONE:
            if kind == ACK_PARSE_CUT:
                self.edits.append((start - 5, None))
            elif kind != ACK_PARSE:
                acks.clear()  # out of step: stop editing rather than guess
                return
            cache = self.stmts.cache
            if cache is not None and entry[1] is not None:
                cache.confirmed.add(entry[1])
        elif t == _CLOSE_DONE:
            if kind == ACK_PARSE_FAKE:
                self.edits.append((start - 5, _PARSE_DONE))
            elif kind == ACK_CLOSE_CUT:
                self.edits.append((start - 5, None))
            elif kind != ACK_CLOSE:
                acks.clear()
        elif kind == ACK_BIND_CUT:
            self.edits.append((start - 5, None))
        elif kind != ACK_BIND:
            acks.clear()

    def _error_with_prepared(self, buf, start, end):
        """PostgreSQL skips every message up to the next Sync after an error:
        drop their acks, and forget statements whose Parse never ran."""
        stmts = self.stmts
        acks = stmts.acks
        if acks and acks[0][0] == ACK_BIND and acks[0][1] is not None \
                and _sqlstate(buf, start, end) == b"0A000":
            # "cached plan must not change result type": re-prepare next time.
            name = acks[0][1]
            stmts.names.pop(name, None)
            stmts.stale.add(name)
        while acks and acks[0][0] != ACK_SYNC:
            entry = acks.popleft()
            kind, name = entry[0], entry[1]
            if kind == ACK_PARSE or kind == ACK_PARSE_CUT:
                stmts.names.pop(name, None)
            elif kind == ACK_CLOSE_CUT:
                stmts.stale.add(name)  # still on the server: close before reuse
            if len(entry) > 2 and kind in (ACK_PARSE, ACK_PARSE_FAKE):
                # The client's own Parse was skipped: its name does not exist.
                statements, client_name, st = entry[2]
                if statements.get(client_name) is st:
                    del statements[client_name]

    def feed(self, data):
        """Scanner.feed with ReadyForQuery and CommandComplete handled
        inline when no statement tracking is on (see ClientScanner.feed).
        The loop is shaped for the messages nobody looks into (RowDescription,
        DataRow): one unpack, one table lookup, one length check, one add."""
        n = len(data)
        self.received += n
        pos = 0
        if self.state != _NONE:
            pos = self._resume(data, n)
            if pos < 0:
                return
        want = self.want
        unpack = _unpack_header
        plain = self.stmts is None
        last = n - 5  # the last position a whole header can start at
        if plain and data.startswith(_PARSE_BIND_DONE, pos):
            # How the answer to an extended-protocol request starts; both
            # are messages nobody looks into without statement tracking.
            pos += _PARSE_BIND_LEN
        while pos <= last:
            t, ln = unpack(data, pos)
            if ln < 4:  # (no maximum for a server's messages)
                self._bad_length(t, ln)
            w = want[t]
            if not w:
                pos += ln + 1
                continue
            hend = pos + 5
            end = pos + 1 + ln
            if hend < end <= n:
                # The whole message is in this chunk (the usual case).
                if t == _Z and plain:
                    status = self.tx_status = data[hend]
                    self.rfq = True
                    self.rfqs += 1
                    client = self.client
                    if client is not None:
                        client.pending -= 1
                    if status == 73:
                        self.xacts += 1
                        if client is not None:
                            client.xacts += 1
                elif t == _CC and (data[hend] not in _DIRTY_TAGS
                                   or data.startswith(_CLEAN_TAGS, hend)):
                    pass  # SELECT, INSERT, ...: nothing to note
                else:
                    pend = hend + w
                    self.on_message(t, data, hend, pend if pend < end else end)
            else:
                pend = hend + w
                if pend > end:
                    pend = end
                if pend > n:
                    self._start_peek(t, data, hend, n, pend - hend, end - pend)
                    return
                self.on_message(t, data, hend, pend)
            pos = end
        if pos < n:
            self._head = data[pos:]
            self.state = _HEAD
        elif pos > n:
            self._skip = pos - n
            self.state = _SKIP

    def on_message(self, t, buf, start, end):
        if t == _Z:
            status = self.tx_status = buf[start]
            self.rfq = True
            self.rfqs += 1
            client = self.client
            if client is not None:
                client.pending -= 1
            if status == 73:
                self.xacts += 1
                if client is not None:
                    client.xacts += 1
            stmts = self.stmts
            if stmts is not None:
                acks = stmts.acks
                while acks:
                    if acks.popleft()[0] == ACK_SYNC:
                        break
        elif t == _CC:
            first = buf[start]
            tags = _DIRTY_TAGS.get(first)
            if tags is not None and _tag_in(buf, start, end, tags):
                self.dirty = True
                if first == 80:   # PREPARE
                    self.sql_prepared = True
            elif first == 68 and self.stmts is not None and (
                    buf.startswith(b"DISCARD ALL", start)
                    or buf.startswith(b"DEALLOCATE ALL", start)):
                self.stmts.clear()
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
            client = self.client
            if client is not None:
                client.errors += 1
            if self.stmts is not None:
                self._error_with_prepared(buf, start, end)
        elif t == _PARSE_DONE or t == _BIND_DONE or t == _CLOSE_DONE:
            if self.stmts is not None:
                self._ack(t, start)
        elif t == _NO_DATA:
            # The NoData of a Describe the pooler injected (a mapped SQL
            # EXECUTE, prepared.py): a simple Query's answer has none.
            stmts = self.stmts
            if stmts is not None and stmts.acks and stmts.acks[0][0] == ACK_NODATA_CUT:
                stmts.acks.popleft()
                self.edits.append((start - 5, None))
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


def _sqlstate(buf, start, end):
    """The SQLSTATE field of an ErrorResponse body prefix, or None."""
    pos = start
    while pos < end and buf[pos] != 0:
        code = buf[pos]
        nul = buf.find(b"\x00", pos + 1, end)
        if nul < 0:
            return None
        if code == 67:  # 'C'
            return bytes(buf[pos + 1:nul])
        pos = nul + 1
    return None


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
        and callable(getattr(transport, "fileno", None))
        and not getattr(transport, "TLS", False)
        and not getattr(transport, "pgcat_tls", False)  # tlssock: OpenSSL writes it
    )


_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR)
_write = os.write


def write_through(transport, data, peer):
    """Write ``data`` to a plain TCP transport, sending directly when its
    buffer is empty. Whatever the kernel does not take goes to Twisted's
    buffer, and only then is ``peer`` (the transport feeding this one)
    registered as its streaming producer, so that a slow reader pauses the
    fast writer. Only for transports ``writer_for`` chose this function for."""
    if not (transport.dataBuffer or transport._tempDataBuffer) and transport.connected \
            and not transport.disconnecting:
        try:
            # send(2) without flags is write(2); os.write parses its
            # arguments faster than socket.send.
            sent = _write(transport.fileno(), data)
        except OSError as e:
            if e.errno not in _AGAIN:
                # Let Twisted discover and report the failure its own way.
                transport.write(data)
                return
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    # Not on a closing transport: Twisted stops a registered producer when the
    # connection is lost, which would close the (innocent) peer.
    if transport.producer is None and peer is not None and transport.connected \
            and not transport.disconnecting:
        transport.registerProducer(peer, True)
    transport.write(data)


def plain_write(transport, data, peer):
    """Buffered write through any ITransport (TLS, test transports)."""
    if peer is not None and getattr(transport, "producer", True) is None \
            and getattr(transport, "connected", True) \
            and not getattr(transport, "disconnecting", False):
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


def monomorphic_copy(func):
    """A copy of ``func`` with a code object of its own. CPython (3.11+)
    keeps its specializing interpreter's inline caches in the code object,
    one entry per attribute site: a function called with objects of two
    classes (a pooler's accepted and outgoing TCP transports) misses them
    at every alternation and falls back to generic attribute lookups. A
    copy per class keeps every site monomorphic. Same behaviour, same
    source: only the caches are separate."""
    if type(func) is not types.FunctionType:
        return func  # compiled (no bytecode, nothing to specialize)
    return types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__,
                              func.__defaults__, func.__closure__)


_write_through_by_class = {}


def writer_for(transport):
    """The write function to use for a transport (decided once per
    connection): for a plain TCP transport, ``write_through`` (its own copy
    per transport class, see ``monomorphic_copy``); for a transport that
    names its own (``pgcat_writer``: tlssock's TLS transports), that one."""
    w = getattr(type(transport), "pgcat_writer", None)
    if w is not None:
        return w
    if not _fast_capable(transport):
        return plain_write
    cls = transport.__class__
    w = _write_through_by_class.get(cls)
    if w is None:
        w = _write_through_by_class[cls] = monomorphic_copy(write_through)
    return w
