"""Message framing for the PostgreSQL v3 protocol.

Two tools, for two different jobs:

``MessageBuffer``
    Accumulates bytes and hands out whole messages. Used only off the hot
    path: startup, authentication and the pooler's own internal queries.

``Scanner``
    The hot-path header walker. It never copies a message: it reads each
    5-byte header with ``struct.unpack_from`` straight from the received
    chunk, and only for the message types its owner asked about does it call
    ``on_message(type, buf, start, end)`` with ``buf[start:end]`` being the
    first ``want[type]`` bytes of the body (or the whole body if shorter).
    Between chunks it keeps at most a split header (< 5 bytes) and, for a
    wanted message whose peeked prefix straddles chunks, that prefix.
"""

import struct

from pgcat_tw.errors import ProtocolViolation

_LEN = struct.Struct("!i")
_unpack_len = _LEN.unpack_from
_unpack_header = struct.Struct("!Bi").unpack_from  # type byte and length, one call

MAX_STARTUP_PACKET = 10000  # the same limit PostgreSQL applies

# Scanner states (what is carried over between chunks). ``Scanner.state`` is
# 0 (false) exactly when the scanner is at a message boundary, so hot paths
# test ``not scanner.state`` instead of calling the ``at_boundary`` property.
_NONE, _SKIP, _HEAD, _PEEK = range(4)

# want[] values
SKIP = 0       # valid type, not interesting
INVALID = -1   # not a valid message type here: protocol violation


class FramingError(ProtocolViolation):
    pass


class MessageBuffer:
    """Whole-message reassembly for the slow paths."""

    __slots__ = ("_buf", "max_len")

    def __init__(self, max_len=0x7FFFFFFF):
        self._buf = bytearray()
        self.max_len = max_len

    def feed(self, data):
        self._buf += data

    def __len__(self):
        return len(self._buf)

    def next_startup(self):
        """Next untyped, length-prefixed packet (StartupMessage, SSLRequest,
        CancelRequest) as its body, or None when incomplete."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = _unpack_len(buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise FramingError(f"invalid startup packet length {length}")
        if len(buf) < length:
            return None
        body = bytes(buf[4:length])
        del buf[:length]
        return body

    def next_message(self):
        """Next typed message as (type int, body bytes), or None when incomplete."""
        buf = self._buf
        if len(buf) < 5:
            return None
        (length,) = _unpack_len(buf, 1)
        if length < 4 or length > self.max_len:
            raise FramingError(
                f"invalid message length {length} for message type {chr(buf[0])!r}"
            )
        end = 1 + length
        if len(buf) < end:
            return None
        msg_type = buf[0]
        body = bytes(buf[5:end])
        del buf[:end]
        return msg_type, body

    def take_rest(self):
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def want_table(peeks, default=SKIP):
    """Build the 256-entry table a Scanner consults: ``peeks`` maps a type
    (int or 1-char str) to how many body bytes its handler needs (>= 1), or to
    SKIP / INVALID."""
    table = [default] * 256
    for t, n in peeks.items():
        if isinstance(t, str):
            t = ord(t)
        table[t] = n
    return table


class Scanner:
    """Incremental header scanner (see module docstring).

    Subclasses (or owners) set ``want`` and implement ``on_message``.
    ``feed`` raises FramingError for a bad length or an INVALID type.
    """

    __slots__ = ("want", "max_len", "state", "_skip", "_head", "_peek", "_peek_type",
                 "_peek_need", "_peek_after")

    def __init__(self, want, max_len=0x7FFFFFFF):
        self.want = want
        self.max_len = max_len
        self.state = _NONE
        self._skip = 0
        self._head = b""
        self._peek = None
        self._peek_type = 0
        self._peek_need = 0
        self._peek_after = 0

    def on_message(self, msg_type, buf, start, end):  # pragma: no cover - overridden
        pass

    @property
    def at_boundary(self):
        """True when no message is partially received."""
        return self.state == _NONE

    @property
    def partial_header(self):
        """Bytes of a split header held from the last chunk (0 to 4)."""
        return len(self._head) if self.state == _HEAD else 0

    def reset(self):
        self.state = _NONE
        self._skip = 0
        self._head = b""
        self._peek = None

    def _bad_length(self, msg_type, length):
        raise FramingError(
            f"invalid message length {length} for message type {chr(msg_type)!r}"
            + (f" (maximum {self.max_len})" if length > self.max_len else "")
        )

    def _bad_type(self, msg_type):
        raise FramingError(f"unexpected message type {chr(msg_type)!r} (0x{msg_type:02x})")

    def feed(self, data):
        n = len(data)
        pos = 0
        if self.state != _NONE:
            pos = self._resume(data, n)
            if pos < 0:
                return
        want = self.want
        max_len = self.max_len
        while True:
            hend = pos + 5
            if hend > n:
                break
            t, ln = _unpack_header(data, pos)
            if ln < 4 or ln > max_len:
                self._bad_length(t, ln)
            end = pos + 1 + ln
            w = want[t]
            if w:
                if w < 0:
                    self._bad_type(t)
                pend = hend + w
                if pend > end:
                    pend = end
                if pend <= n:
                    self.on_message(t, data, hend, pend)
                else:
                    self._start_peek(t, data, hend, n, pend - hend, end - pend)
                    return
            pos = end
        if pos < n:
            if want[data[pos]] < 0:
                # Refuse a bad type byte now, before the chunk is forwarded.
                self._bad_type(data[pos])
            self._head = data[pos:]
            self.state = _HEAD
        elif pos > n:
            self._skip = pos - n
            self.state = _SKIP

    def _start_peek(self, t, data, start, n, need, after):
        self._peek = bytearray(data[start:n])
        self._peek_type = t
        self._peek_need = need
        self._peek_after = after
        self.state = _PEEK

    def _resume(self, data, n):
        """Finish what the previous chunk left open. Returns the position in
        ``data`` where the next header starts (may be >= n), or -1 if the
        whole chunk was consumed and state remains."""
        state = self.state
        if state == _SKIP:
            skip = self._skip
            if skip > n:
                self._skip = skip - n
                return -1
            self._skip = 0
            self.state = _NONE
            return skip
        if state == _HEAD:
            head = self._head
            need = 5 - len(head)
            if n < need:
                self._head = head + data
                return -1
            hdr = head + data[:need]
            self._head = b""
            self.state = _NONE
            t = hdr[0]
            ln = _unpack_len(hdr, 1)[0]
            if ln < 4 or ln > self.max_len:
                self._bad_length(t, ln)
            w = self.want[t]
            end = need + ln - 4
            if w:
                if w < 0:
                    self._bad_type(t)
                pend = need + w
                if pend > end:
                    pend = end
                if pend <= n:
                    self.on_message(t, data, need, pend)
                else:
                    self._start_peek(t, data, need, n, pend - need, end - pend)
                    return -1
            return self._advance(end, n)
        # _PEEK
        peek = self._peek
        need = self._peek_need - len(peek)
        if n < need:
            peek += data
            return -1
        peek += data[:need]
        self._peek = None
        self.state = _NONE
        self.on_message(self._peek_type, peek, 0, len(peek))
        return self._advance(need + self._peek_after, n)

    def _advance(self, pos, n):
        if pos > n:
            self._skip = pos - n
            self.state = _SKIP
            return -1
        return pos
