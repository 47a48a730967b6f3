"""Named prepared statements in transaction mode (``prepared_statements_cache_size``).

A client's named Parse is mapped to a pooler-wide statement name keyed by the
query text and parameter types, so one server-side statement serves every
client that prepares the same SQL. Bind and Describe are rewritten to that
name; a statement missing on the server a transaction lands on is prepared
there first. Every reply the client sees still comes from the server, in the
server's order: nothing is synthesized out of band.

- A Parse the server already has is replaced by a Close of a statement name
  that cannot exist; PostgreSQL answers CloseComplete, which the relay
  retypes to the ParseComplete the client expects (same 5-byte message).
- A Parse the pooler injects (statement missing on this server) and a Close
  it injects (LRU eviction, stale statement) have their ParseComplete /
  CloseComplete cut from the reply stream.
- The client's own Close of a named statement becomes a Close of the
  impossible name (the shared statement stays; the client gets its
  CloseComplete).

The relay knows which acknowledgement is which through ``ServerStatements.acks``:
one entry per Parse, Bind, Close, Sync, Query and FunctionCall sent, in order:
(kind, server statement name or None[, (client map, client name, statement)]).
On an ErrorResponse the entries up to the next Sync are dropped (PostgreSQL
skips those messages), undoing the registration of statements whose Parse
was skipped; "cached plan must not change result type" on a Bind marks that
statement stale so it is closed and prepared again at its next use.
"""

import hashlib
import struct
from collections import OrderedDict, deque

from pgcat_tw.protocol import codes
from pgcat_tw.router import sql as sqlcmd

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")

NOOP_NAME = b"\x01pgcat_tw_noop"   # a statement name no client can have created
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
READY_IDLE = b"Z\x00\x00\x00\x05I"

# Ack kinds (entries of ServerStatements.acks)
ACK_PARSE = 1        # client's Parse: ParseComplete passes
ACK_PARSE_CUT = 2    # injected Parse: ParseComplete is cut
ACK_PARSE_FAKE = 3   # skipped Parse sent as Close(NOOP): CloseComplete -> ParseComplete
ACK_BIND = 4         # Bind: BindComplete passes
ACK_CLOSE = 5        # client's Close: CloseComplete passes
ACK_CLOSE_CUT = 6    # injected Close: CloseComplete is cut
ACK_SYNC = 7         # Sync / Query / FunctionCall: ReadyForQuery
ACK_BIND_CUT = 8     # injected Bind: BindComplete is cut
ACK_NODATA_CUT = 9   # injected Describe: its NoData is cut (a RowDescription passes)

_P = codes.F_PARSE
_B = codes.F_BIND
_D = codes.F_DESCRIBE
_C = codes.F_CLOSE
_Q = codes.F_QUERY
_S = codes.F_SYNC
_F = codes.F_FUNCTION_CALL
_E = codes.F_EXECUTE
_SYNC_MSG = b"S\x00\x00\x00\x04"
_REWRITE = frozenset((_P, _B, _D, _C, _Q, _S, _F))


def _msg(t, body):
    return bytes((t,)) + _I32.pack(len(body) + 4) + body


def close_statement(name):
    return _msg(_C, b"S" + name + b"\x00")


class StatementCache:
    """Pool-level: (query, parameter types) -> server-side statement name (LRU)."""

    def __init__(self, size):
        self.size = size
        self._names = OrderedDict()
        self.confirmed = set()  # server names some server acknowledged (ParseComplete)

    def is_confirmed(self, query, types):
        name = self._names.get((query, types))
        return name is not None and name in self.confirmed

    def name_for(self, query, types):
        key = (query, types)
        names = self._names
        name = names.get(key)
        if name is not None:
            names.move_to_end(key)
            return name
        # Deterministic per (query, types): the same SQL gets the same name
        # on every server and across cache evictions.
        digest = hashlib.blake2b(query + b"\x00" + types, digest_size=10).hexdigest()
        name = b"PGCAT_" + digest.encode()
        names[key] = name
        if len(names) > self.size:
            names.popitem(last=False)
        return name


class ServerStatements:
    """Per server connection: the statements it holds (LRU), the ones to
    re-prepare, the acknowledgements in flight, and counters."""

    __slots__ = ("size", "names", "stale", "acks", "hits", "misses", "evictions", "cache")

    def __init__(self, size, cache=None):
        self.size = size
        self.cache = cache          # the pool's StatementCache (confirmations)
        self.names = OrderedDict()  # server name -> None
        self.stale = set()          # names present on the server but unusable
        self.acks = deque()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def clear(self):
        self.names.clear()
        self.stale.clear()


class ClientStatement:
    __slots__ = ("server_name", "parse")

    def __init__(self, server_name, parse):
        self.server_name = server_name
        self.parse = parse  # the renamed Parse message, to prepare it elsewhere


class Rewriter:
    """Client -> server rewriting for one client. ``process(data, stmts)``
    returns the bytes to send to the bound server whose ServerStatements is
    ``stmts``. Messages that may need rewriting are held until complete;
    others are forwarded as they arrive."""

    def __init__(self, cache):
        self.cache = cache
        self.statements = {}      # client name (bytes) -> ClientStatement
        self._tail = b""          # an incomplete message to rewrite, or a split header
        self._skip = 0            # bytes of a pass-through message still to come

    def process(self, data, stmts):
        if self._tail:
            data = self._tail + data
            self._tail = b""
        n = len(data)
        pos = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return data
            pos = self._skip
            self._skip = 0
        out = []
        seg = 0
        acks = stmts.acks
        while pos < n:
            if n - pos < 5:
                out.append(data[seg:pos])
                self._tail = data[pos:]
                return b"".join(out)
            t = data[pos]
            end = pos + 1 + _I32.unpack_from(data, pos + 1)[0]
            if t in _REWRITE:
                if end > n:
                    out.append(data[seg:pos])
                    self._tail = data[pos:]
                    return b"".join(out)
                rep = None
                if t == _Q and self.statements:
                    rep = self._sql_execute(data, pos + 5, end, stmts)
                if rep is not None:
                    out.append(data[seg:pos])
                    out.append(rep)
                    seg = end
                elif t == _S or t == _Q or t == _F:
                    acks.append((ACK_SYNC, None))
                else:
                    rep = self._rewrite(t, data, pos + 5, end, stmts)
                    if rep is not None:
                        out.append(data[seg:pos])
                        out.append(rep)
                        seg = end
            elif end > n:
                self._skip = end - n
                break
            pos = end
        if not out:
            return data if seg == 0 else data[seg:]
        out.append(data[seg:])
        return b"".join(out)

    # --- per message --------------------------------------------------------------

    def _ensure(self, st, stmts, pieces):
        """Make sure the server has ``st``; append what must be sent first."""
        name = st.server_name
        names = stmts.names
        if name in names and name not in stmts.stale:
            names.move_to_end(name)
            return
        if name in stmts.stale:
            stmts.stale.discard(name)
            pieces.append(close_statement(name))
            stmts.acks.append((ACK_CLOSE_CUT, name))
        self._register(name, stmts, pieces)
        pieces.append(st.parse)
        stmts.acks.append((ACK_PARSE_CUT, name))

    def _register(self, name, stmts, pieces):
        names = stmts.names
        names[name] = None
        stmts.misses += 1
        while len(names) > stmts.size:
            evicted, _ = names.popitem(last=False)
            stmts.evictions += 1
            pieces.append(close_statement(evicted))
            stmts.acks.append((ACK_CLOSE_CUT, evicted))

    def _rewrite(self, t, buf, start, end, stmts):
        acks = stmts.acks
        if t == _P:
            nul = buf.index(b"\x00", start, end)
            if nul == start:  # unnamed: untouched
                acks.append((ACK_PARSE, None))
                return None
            client_name = bytes(buf[start:nul])
            qend = buf.index(b"\x00", nul + 1, end)
            query = bytes(buf[nul + 1:qend])
            types = bytes(buf[qend + 1:end])
            server_name = self.cache.name_for(query, types)
            parse = _msg(_P, server_name + b"\x00" + query + b"\x00" + types)
            st = ClientStatement(server_name, parse)
            self.statements[client_name] = st
            names = stmts.names
            # The client's name is forgotten again if PostgreSQL skips this
            # Parse after an earlier error (relay.ServerScanner).
            owner = (self.statements, client_name, st)
            if server_name in names and server_name not in stmts.stale:
                names.move_to_end(server_name)
                stmts.hits += 1
                acks.append((ACK_PARSE_FAKE, owner))
                return close_statement(NOOP_NAME)
            pieces = []
            if server_name in stmts.stale:
                stmts.stale.discard(server_name)
                pieces.append(close_statement(server_name))
                acks.append((ACK_CLOSE_CUT, server_name))
            self._register(server_name, stmts, pieces)
            pieces.append(parse)
            acks.append((ACK_PARSE, server_name, owner))
            return b"".join(pieces)
        if t == _B:
            pnul = buf.index(b"\x00", start, end)
            snul = buf.index(b"\x00", pnul + 1, end)
            if snul == pnul + 1:  # unnamed statement
                acks.append((ACK_BIND, None))
                return None
            st = self.statements.get(bytes(buf[pnul + 1:snul]))
            if st is None:  # unknown: the server answers "does not exist"
                acks.append((ACK_BIND, None))
                return None
            pieces = []
            self._ensure(st, stmts, pieces)
            acks.append((ACK_BIND, st.server_name))
            pieces.append(_msg(_B, bytes(buf[start:pnul + 1]) + st.server_name
                               + bytes(buf[snul:end])))
            return b"".join(pieces)
        if t == _D:
            if end - start < 2 or buf[start] != 83 or buf[start + 1] == 0:  # 'S', named
                return None
            st = self.statements.get(bytes(buf[start + 1:end - 1]))
            if st is None:
                return None
            pieces = []
            self._ensure(st, stmts, pieces)
            pieces.append(_msg(_D, b"S" + st.server_name + b"\x00"))
            return b"".join(pieces)
        # Close
        if end - start >= 2 and buf[start] == 83 and buf[start + 1] != 0:
            client_name = bytes(buf[start + 1:end - 1])
            if self.statements.pop(client_name, None) is not None:
                acks.append((ACK_CLOSE, None))
                return close_statement(NOOP_NAME)
        acks.append((ACK_CLOSE, None))
        return None

    # --- answered without a server ----------------------------------------------

    def answer_locally(self, data):
        """A chunk made only of named Parse messages for SQL some server of
        the pool already prepared successfully, plus Syncs (and Flushes),
        ending with a Sync: register the statements and return the replies
        (ParseComplete per Parse, ReadyForQuery 'I' per Sync) so no server is
        needed; the statements are prepared on a server at their first Bind.
        Returns None when the chunk is anything else.

        This keeps synchronous preparers (libpq PQprepare, as in
        ``pgbench -M prepared``) from needing a server while other clients of
        the same thread hold every server of the pool mid-transaction."""
        n = len(data)
        pos = 0
        parsed = []
        reply = []
        cache = self.cache
        while pos < n:
            if n - pos < 5:
                return None
            t = data[pos]
            end = pos + 1 + _I32.unpack_from(data, pos + 1)[0]
            if end > n:
                return None
            if t == _P:
                start = pos + 5
                nul = data.find(b"\x00", start, end)
                if nul <= start:
                    return None  # unnamed or malformed
                qend = data.find(b"\x00", nul + 1, end)
                if qend < 0:
                    return None
                query = data[nul + 1:qend]
                types = data[qend + 1:end]
                if not cache.is_confirmed(query, types):
                    return None
                parsed.append((data[start:nul], query, types))
                reply.append(PARSE_COMPLETE)
            elif t == _S:
                reply.append(READY_IDLE)
            elif t != codes.F_FLUSH:
                return None
            pos = end
        if data[-5] != _S or not parsed:
            return None
        for client_name, query, types in parsed:
            server_name = cache.name_for(query, types)
            self.statements[client_name] = ClientStatement(
                server_name, _msg(_P, server_name + b"\x00" + query + b"\x00" + types))
        return b"".join(reply)

    # --- SQL-level statements ---------------------------------------------------

    def sql_prepare(self, name, statement, oids):
        """SQL ``PREPARE name (types) AS statement``, mapped onto the shared
        statement of that text and types (the same one a protocol-level
        Parse of it gets): False if the client already has ``name``."""
        if name in self.statements:
            return False
        types = _I16.pack(len(oids)) + b"".join(_I32.pack(o) for o in oids)
        server_name = self.cache.name_for(statement, types)
        self.statements[name] = ClientStatement(
            server_name, _msg(_P, server_name + b"\x00" + statement + b"\x00" + types))
        return True

    def _sql_execute(self, buf, start, end, stmts):
        """A Query that is one ``EXECUTE name(args)`` of a mapped statement:
        the bytes to send instead (the shared statement prepared first if
        this server lacks it, then the EXECUTE of its server name as an
        unnamed extended-protocol statement whose ParseComplete,
        BindComplete and NoData are cut: the client sees what a simple Query
        gets), or None to send the Query as it is."""
        if sqlcmd.EXECUTE_PREFIX.match(buf, start, end) is None:
            return None
        parts = sqlcmd.execute_parts(bytes(buf[start:end - 1]))
        if parts is None:
            return None
        st = self.statements.get(parts[0])
        if st is None:
            return None
        acks = stmts.acks
        pieces = []
        self._ensure(st, stmts, pieces)
        sql = b'EXECUTE "' + st.server_name + b'"' + parts[1]
        pieces.append(_msg(_P, b"\x00" + sql + b"\x00\x00\x00"))
        acks.append((ACK_PARSE_CUT, None))
        pieces.append(_msg(_B, b"\x00\x00" + b"\x00" * 6))
        acks.append((ACK_BIND_CUT, None))
        pieces.append(_msg(_D, b"P\x00"))
        acks.append((ACK_NODATA_CUT, None))
        pieces.append(_msg(_E, b"\x00" + b"\x00" * 4))
        pieces.append(_SYNC_MSG)
        acks.append((ACK_SYNC, None))
        return b"".join(pieces)

    def deallocate(self, name):
        """DEALLOCATE name / ALL from the client's point of view."""
        if name is None:
            self.statements.clear()
            return True
        return self.statements.pop(name, None) is not None


def apply_edits(data, edits, offset):
    """Apply relay edits to a reply chunk: (header position, action) pairs,
    action None = cut the 5-byte message, else the new type byte."""
    out = bytearray(data)
    for pos, action in reversed(edits):
        pos += offset
        if action is None:
            del out[pos:pos + 5]
        else:
            out[pos] = action
    return bytes(out)
