"""Tests for pgcat_tw.relay: the client/server scanners' transaction
bookkeeping and the write-through helper."""

import errno
import os
import socket
import struct

from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw.errors import ProtocolViolation
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw import relay
from pgcat_tw.protocol.framing import FramingError
from pgcat_tw.relay import (
    TRACKED_PARAMETERS,
    ClientScanner,
    ServerScanner,
    detach_producer,
    plain_write,
    write_through,
    writer_for,
)


def raw(type_byte, body):
    return type_byte + struct.pack("!i", len(body) + 4) + body


# --- frontend messages --------------------------------------------------------

def parse(sql, name=b"", ntypes=0):
    return raw(b"P", name + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", ntypes))


def bind(portal=b"", stmt=b"", values=()):
    body = portal + b"\x00" + stmt + b"\x00" + struct.pack("!h", 0)
    body += struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", len(v)) + v
    body += struct.pack("!h", 0)
    return raw(b"B", body)


def describe(kind=b"P", name=b""):
    return raw(b"D", kind + name + b"\x00")


def execute(portal=b"", max_rows=0):
    return raw(b"E", portal + b"\x00" + struct.pack("!i", max_rows))


def close(kind=b"S", name=b"s1"):
    return raw(b"C", kind + name + b"\x00")


SYNC = raw(b"S", b"")
FLUSH = raw(b"H", b"")
TERMINATE = raw(b"X", b"")
COPY_DONE = raw(b"c", b"")


def copy_data(data):
    return raw(b"d", data)


def copy_fail(msg):
    return raw(b"f", msg.encode() + b"\x00")


def function_call(oid=1598):
    return raw(b"F", struct.pack("!ihhh", oid, 0, 0, 0) + struct.pack("!h", 0))


def extended(sql="SELECT 1", name=b""):
    return parse(sql, name) + bind(stmt=name) + describe() + execute() + SYNC


# --- backend messages ---------------------------------------------------------

def copy_in_response(ncols=1):
    return raw(b"G", b"\x00" + struct.pack("!h", ncols) + b"\x00\x00" * ncols)


def copy_out_response(ncols=1):
    return raw(b"H", b"\x00" + struct.pack("!h", ncols) + b"\x00\x00" * ncols)


class ClientScannerTests(SynchronousTestCase):
    def setUp(self):
        self.sc = ClientScanner(1 << 20)

    def test_initial_state(self):
        sc = self.sc
        self.assertEqual(sc.pending, 0)
        self.assertFalse(sc.unsynced)
        self.assertIsNone(sc.terminate_at)
        self.assertFalse(sc.named_parse)
        self.assertFalse(sc.in_copy_ext)
        self.assertTrue(sc.idle)

    def test_simple_query(self):
        sc = self.sc
        sc.feed(m.query("SELECT 1"))
        self.assertEqual(sc.pending, 1)
        self.assertFalse(sc.unsynced)
        self.assertFalse(sc.idle)
        self.assertEqual(sc.queries, 1)

    def test_multi_statement_query_is_one(self):
        sc = self.sc
        sc.feed(m.query("BEGIN; SELECT 1; SELECT 2; COMMIT"))
        self.assertEqual(sc.pending, 1)

    def test_two_queries_pipelined(self):
        sc = self.sc
        sc.feed(m.query("SELECT 1") + m.query("SELECT 2"))
        self.assertEqual(sc.pending, 2)

    def test_extended(self):
        sc = self.sc
        p, b, d, e = parse("SELECT $1", ntypes=0), bind(values=[b"1"]), describe(), execute()
        sc.feed(p)
        self.assertTrue(sc.unsynced)
        self.assertEqual(sc.pending, 0)
        self.assertFalse(sc.idle)
        for msg in (b, d, e):
            sc.feed(msg)
            self.assertTrue(sc.unsynced)
            self.assertEqual(sc.pending, 0)
        sc.feed(SYNC)
        self.assertFalse(sc.unsynced)
        self.assertEqual(sc.pending, 1)
        self.assertFalse(sc.named_parse)

    def test_extended_one_chunk(self):
        sc = self.sc
        sc.feed(extended())
        self.assertEqual(sc.pending, 1)
        self.assertFalse(sc.unsynced)
        self.assertTrue(sc.at_boundary)

    def test_pipeline_with_three_syncs(self):
        sc = self.sc
        sc.feed(extended("SELECT 1") + extended("SELECT 2") + bind() + execute() + SYNC)
        self.assertEqual(sc.pending, 3)
        self.assertFalse(sc.unsynced)

    def test_pipeline_byte_by_byte(self):
        sc = self.sc
        data = extended("SELECT 1") + m.query("SELECT 2") + extended("SELECT 3")
        for i in range(len(data)):
            sc.feed(data[i:i + 1])
        self.assertEqual(sc.pending, 3)
        self.assertFalse(sc.unsynced)
        self.assertTrue(sc.at_boundary)

    def test_flush_without_sync(self):
        sc = self.sc
        sc.feed(parse("SELECT 1") + bind() + describe() + execute() + FLUSH)
        self.assertTrue(sc.unsynced)
        self.assertEqual(sc.pending, 0)
        self.assertFalse(sc.idle)

    def test_flush_alone(self):
        # A bare Flush asks for nothing: no sync point, no answer expected.
        sc = self.sc
        sc.feed(FLUSH)
        self.assertEqual(sc.pending, 0)
        self.assertTrue(sc.at_boundary)

    def test_sync_alone(self):
        sc = self.sc
        sc.feed(SYNC)
        self.assertEqual(sc.pending, 1)
        self.assertFalse(sc.unsynced)

    def test_function_call(self):
        sc = self.sc
        sc.feed(function_call())
        self.assertEqual(sc.pending, 1)
        sc.feed(function_call() + m.query("SELECT 1"))
        self.assertEqual(sc.pending, 3)

    def test_terminate_offset(self):
        sc = self.sc
        sc.feed(TERMINATE)
        self.assertEqual(sc.terminate_at, 0)
        sc = ClientScanner(1 << 20)
        q = m.query("SELECT 1")
        sc.feed(q + TERMINATE)
        self.assertEqual(sc.terminate_at, len(q))
        self.assertEqual(sc.pending, 1)
        # The offset is relative to the chunk the Terminate arrived in.
        sc = ClientScanner(1 << 20)
        sc.feed(q)
        self.assertIsNone(sc.terminate_at)
        sc.feed(SYNC + TERMINATE)
        self.assertEqual(sc.terminate_at, len(SYNC))

    def test_terminate_after_split_message(self):
        # The chunk starts with the tail of a message split across chunks.
        sc = self.sc
        q = m.query("SELECT " + "x" * 100)
        sc.feed(q[:50])
        self.assertIsNone(sc.terminate_at)
        sc.feed(q[50:] + TERMINATE)
        self.assertEqual(sc.terminate_at, len(q) - 50)

    def test_terminate_split_header(self):
        # Whatever the split, the owner must be able to tell that a Terminate
        # arrived (frontend checks terminate_at against the -1 sentinel).
        q = m.query("SELECT 1")
        for cut in range(1, 5):
            sc = ClientScanner(1 << 20)
            sc.feed(q + TERMINATE[:cut])
            self.assertIsNone(sc.terminate_at)
            sc.feed(TERMINATE[cut:])
            self.assertIsNotNone(sc.terminate_at, f"Terminate split after {cut} byte(s)")


    def test_unsynced_describe_or_close_with_flush(self):
        # libpq pipeline mode (PQsendDescribePrepared / PQsendClosePrepared +
        # PQsendFlushRequest) sends Describe or Close with no Parse/Execute
        # after an earlier sync point. The earlier ReadyForQuery 'I' must not
        # make the client look idle while the Describe/Close is unanswered.
        for msg in (describe(b"S", b"s1"), close(b"S", b"s1"), bind(stmt=b"s1")):
            c = ClientScanner(1 << 20)
            ss = ServerScanner()
            ss.client = c
            c.feed(m.query("SELECT 1") + msg + FLUSH)
            ss.feed(m.command_complete("SELECT 1") + m.ready_for_query(b"I"))
            self.assertEqual(c.pending, 0)
            self.assertTrue(c.unsynced, chr(msg[0]))
            self.assertFalse(c.idle, chr(msg[0]))


    def test_named_parse(self):
        sc = self.sc
        sc.feed(extended("SELECT 1", name=b""))
        self.assertFalse(sc.named_parse)
        sc.feed(extended("SELECT 1", name=b"s1"))
        self.assertTrue(sc.named_parse)

    def test_named_parse_body_in_next_chunk(self):
        for name, expected in ((b"stmt", True), (b"", False)):
            p = parse("SELECT 1", name)
            for cut in range(1, 6):  # split header, or the whole body in the next chunk
                sc = ClientScanner(1 << 20)
                sc.feed(m.query("SELECT 0") + p[:cut])
                self.assertFalse(sc.named_parse)
                sc.feed(p[cut:] + SYNC)
                self.assertEqual(sc.named_parse, expected, (name, cut))
                self.assertEqual(sc.pending, 2)

    def test_invalid_types(self):
        for bad in (raw(b"p", b"md5abc\x00"), m.ready_for_query(b"I"),
                    raw(b"R", b"\x00\x00\x00\x00"), raw(b"\x00", b"")):
            sc = ClientScanner(1 << 20)
            with self.assertRaises(FramingError) as cm:
                sc.feed(m.query("SELECT 1") + bad)
            self.assertIsInstance(cm.exception, ProtocolViolation)
            self.assertEqual(cm.exception.sqlstate, "08P01")
            # also when the header is split: refused with its first byte
            sc = ClientScanner(1 << 20)
            with self.assertRaises(FramingError):
                sc.feed(bad[:2])

    def test_valid_types_accepted(self):
        sc = self.sc
        data = (m.query("SELECT 1") + extended() + close() + SYNC + FLUSH
                + function_call() + copy_data(b"x") + COPY_DONE + copy_fail("no"))
        sc.feed(data)
        self.assertEqual(sc.pending, 4)

    def test_max_len(self):
        sc = ClientScanner(100)
        sc.feed(m.query("x" * (100 - 5)))  # length field exactly 100
        self.assertEqual(sc.pending, 1)
        with self.assertRaises(FramingError):
            sc.feed(m.query("x" * (100 - 4)))
        sc = ClientScanner(100)
        big = copy_data(b"z" * 200)
        with self.assertRaises(FramingError):
            sc.feed(big[:3])
            sc.feed(big[3:])

    # Describe portal + Execute + Sync ending a chunk: feed() applies the
    # three at once when the walk lands on them (see ClientScanner.feed).
    DES = describe() + execute() + SYNC

    @staticmethod
    def state(sc):
        return (sc.pending, sc.unsynced, sc.since_exec, sc.last_extended, sc.queries,
                sc.named_parse, sc.in_copy_ext, sc.at_boundary)

    def fed(self, chunks, **attrs):
        sc = ClientScanner(1 << 20)
        for k, v in attrs.items():
            setattr(sc, k, v)
        for chunk in chunks:
            sc.feed(chunk)
        return self.state(sc)

    def test_describe_execute_sync_tail_same_as_one_by_one(self):
        self.assertEqual(len(self.DES), 22)
        for data in (extended(), extended("SELECT 1", b"s1"), extended() + extended(),
                     m.query("SELECT 1") + extended(), bind() + self.DES, self.DES,
                     extended() + FLUSH + self.DES):
            whole = self.fed([data])
            by_byte = self.fed([data[i:i + 1] for i in range(len(data))])
            self.assertEqual(whole, by_byte, data)
            for attrs in ({"in_copy_ext": True, "in_copy": True}, {"since_exec": 3}):
                self.assertEqual(self.fed([data], **attrs),
                                 self.fed([data[i:i + 1] for i in range(len(data))], **attrs),
                                 (data, attrs))
        self.assertEqual(self.fed([extended() + extended()])[:3], (2, False, 1))

    def test_tail_bytes_inside_a_message_are_not_messages(self):
        # The 22 bytes end a Bind's body: one unsynced Bind, no Sync.
        data = parse("SELECT 1") + raw(b"B", b"\x00\x00" + self.DES)
        self.assertTrue(data.endswith(self.DES))
        self.assertEqual(self.fed([data])[:2], (0, True))
        self.assertEqual(self.fed([data]), self.fed([data[i:i + 1] for i in range(len(data))]))
        # ... or straddle a message boundary.
        data = raw(b"B", b"\x00" + self.DES[:10]) + self.DES[10:]
        with self.assertRaises(FramingError):
            ClientScanner(1 << 20).feed(data)  # the rest is not a valid message

    def test_tail_respects_max_len(self):
        sc = ClientScanner(8)  # Execute's length (9) is over it
        with self.assertRaises(FramingError):
            sc.feed(bind() + self.DES)

    def test_partial_message_not_idle(self):
        sc = self.sc
        q = m.query("SELECT 1")
        sc.feed(q[:4])
        self.assertEqual(sc.pending, 0)
        self.assertFalse(sc.idle)


class ServerScannerTests(SynchronousTestCase):
    def setUp(self):
        self.client = ClientScanner(1 << 20)
        self.ss = ServerScanner()
        self.ss.client = self.client

    def test_ready_for_query(self):
        c, ss = self.client, self.ss
        c.feed(m.query("BEGIN"))
        self.assertEqual(c.pending, 1)
        ss.feed(m.command_complete("BEGIN") + m.ready_for_query(b"T"))
        self.assertEqual(c.pending, 0)
        self.assertTrue(ss.rfq)
        self.assertEqual(ss.tx_status, codes.TX_IN_BLOCK)
        self.assertTrue(c.idle)
        c.feed(m.query("SELECT 1/0"))
        ss.feed(m.error_response("ERROR", "22012", "division by zero")
                + m.ready_for_query(b"E"))
        self.assertEqual(ss.tx_status, codes.TX_FAILED)
        self.assertEqual(c.pending, 0)
        c.feed(m.query("ROLLBACK"))
        ss.feed(m.command_complete("ROLLBACK")[:3])
        self.assertEqual(c.pending, 1)
        ss.feed(m.command_complete("ROLLBACK")[3:] + m.ready_for_query(b"I")[:5])
        self.assertEqual(c.pending, 1)
        self.assertEqual(ss.tx_status, codes.TX_FAILED)
        ss.feed(b"I")
        self.assertEqual(c.pending, 0)
        self.assertEqual(ss.tx_status, codes.TX_IDLE)

    def test_extended_answer(self):
        # ParseComplete + BindComplete first: skipped at once (no tracking).
        c, ss = self.client, self.ss
        c.feed(extended("SET x.y = 1"))
        answer = (raw(b"1", b"") + raw(b"2", b"") + raw(b"n", b"")
                  + m.command_complete("SET") + m.ready_for_query(b"I"))
        ss.feed(answer)
        self.assertEqual(c.pending, 0)
        self.assertTrue(ss.rfq)
        self.assertTrue(ss.dirty)  # the tag after them was seen
        self.assertEqual(ss.tx_status, codes.TX_IDLE)
        self.assertTrue(ss.at_boundary)
        # Split right after the two: the rest still scans.
        ss2 = ServerScanner()
        ss2.client = c
        c.feed(extended())
        ss2.feed(answer[:10])
        self.assertEqual(c.pending, 1)
        ss2.feed(answer[10:])
        self.assertEqual(c.pending, 0)
        self.assertTrue(ss2.dirty)

    def test_pipelined_sync_points(self):
        c, ss = self.client, self.ss
        c.feed(extended() + extended() + m.query("SELECT 3"))
        self.assertEqual(c.pending, 3)
        answer = (raw(b"1", b"") + raw(b"2", b"") + raw(b"n", b"")
                  + m.command_complete("SELECT 1") + m.ready_for_query(b"I"))
        ss.feed(answer)
        self.assertEqual(c.pending, 2)
        self.assertFalse(c.idle)
        ss.feed(answer)
        self.assertEqual(c.pending, 1)
        self.assertFalse(c.idle)
        ss.feed(m.row_description([("x", 23)]) + m.data_row(["3"])
                + m.command_complete("SELECT 1") + m.ready_for_query(b"I"))
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.idle)

    def test_rfq_without_client(self):
        ss = ServerScanner()
        ss.feed(m.ready_for_query(b"T"))
        self.assertTrue(ss.rfq)
        self.assertEqual(ss.tx_status, codes.TX_IN_BLOCK)

    def test_parameter_status(self):
        c, ss = self.client, self.ss
        c.params = {"TimeZone": "UTC", "application_name": "app"}
        ss.feed(m.parameter_status("TimeZone", "Europe/Oslo")
                + m.parameter_status("server_version", "16.2")
                + m.parameter_status("application_name", "other"))
        self.assertEqual(ss.params, {"TimeZone": "Europe/Oslo", "server_version": "16.2",
                                     "application_name": "other"})
        self.assertEqual(c.params, {"TimeZone": "Europe/Oslo", "application_name": "other"})
        self.assertNotIn("server_version", c.params)

    def test_parameter_status_split(self):
        c, ss = self.client, self.ss
        c.params = {"DateStyle": "ISO, MDY"}
        msg = m.parameter_status("DateStyle", "ISO, DMY")
        for cut in range(1, len(msg)):
            c.params["DateStyle"] = "ISO, MDY"
            ss.feed(msg[:cut])
            ss.feed(msg[cut:])
            self.assertEqual(c.params["DateStyle"], "ISO, DMY", cut)
            self.assertEqual(ss.params["DateStyle"], "ISO, DMY")

    def test_parameter_status_longer_than_peek(self):
        # A ParameterStatus longer than SERVER_WANT's 65536-byte peek (e.g. a
        # huge reported search_path) must not break the relay.
        c, ss = self.client, self.ss
        c.feed(m.query("SET search_path = ..."))
        msg = m.parameter_status("search_path", "s" * 70000)
        ss.feed(m.command_complete("SET") + msg + m.ready_for_query(b"I"))
        self.assertEqual(c.pending, 0)
        self.assertTrue(ss.dirty)


    def test_tracked_parameters(self):
        self.assertIn("application_name", TRACKED_PARAMETERS)
        self.assertIn("TimeZone", TRACKED_PARAMETERS)

    def test_dirty_tags(self):
        for tag in ("SET", "PREPARE", "LISTEN", "DECLARE CURSOR"):
            ss = ServerScanner()
            ss.feed(m.command_complete(tag) + m.ready_for_query(b"I"))
            self.assertTrue(ss.dirty, tag)
            # also with the body split from its header
            ss = ServerScanner()
            msg = m.command_complete(tag)
            ss.feed(msg[:6])
            self.assertFalse(ss.dirty)
            ss.feed(msg[6:])
            self.assertTrue(ss.dirty, tag)

    def test_clean_tags(self):
        for tag in ("SELECT 1", "INSERT 0 1", "SHOW", "SELECT 100000", "UPDATE 5",
                    "DELETE 0", "DEALLOCATE", "BEGIN", "COMMIT", "COPY 3", "FETCH 1"):
            ss = ServerScanner()
            ss.feed(m.command_complete(tag) + m.ready_for_query(b"I"))
            self.assertFalse(ss.dirty, tag)
        # A dirty-looking word later in the chunk does not count.
        ss = ServerScanner()
        ss.feed(m.command_complete("SHOW") + m.notice_response("SET LISTEN PREPARE"))
        self.assertFalse(ss.dirty)

    def test_errors(self):
        ss = self.ss
        ss.feed(m.notice_response("just a notice"))
        self.assertEqual(ss.errors, 0)
        ss.feed(m.error_response("ERROR", "42601", "syntax error"))
        self.assertEqual(ss.errors, 1)
        err = m.error_response("ERROR", "42P01", "no such table")
        ss.feed(err[:2])
        ss.feed(err[2:] + m.ready_for_query(b"I"))
        self.assertEqual(ss.errors, 2)

    def test_large_data_row_ignored(self):
        c, ss = self.client, self.ss
        c.feed(m.query("SELECT big"))
        row = m.data_row(["Z" * 200000])  # looks like ReadyForQuery bytes inside
        stream = (m.row_description([("b", 25)]) + row + m.command_complete("SELECT 1")
                  + m.ready_for_query(b"I"))
        for i in range(0, len(stream), 4096):
            ss.feed(stream[i:i + 4096])
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.idle)


class CopyAccountingTests(SynchronousTestCase):
    def setUp(self):
        self.client = ClientScanner(1 << 20)
        self.ss = ServerScanner()
        self.ss.client = self.client

    def test_extended_copy_from_stdin(self):
        c, ss = self.client, self.ss
        c.feed(extended("COPY t FROM STDIN"))
        self.assertEqual(c.pending, 1)
        self.assertFalse(c.in_copy_ext)
        ss.feed(raw(b"1", b"") + raw(b"2", b"") + raw(b"n", b"") + copy_in_response())
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.in_copy_ext)
        self.assertFalse(c.idle)
        c.feed(copy_data(b"1\tone\n"))
        c.feed(SYNC)  # ignored by the server while COPY runs
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.in_copy_ext)
        c.feed(copy_data(b"2\ttwo\n") + COPY_DONE)
        self.assertFalse(c.in_copy_ext)
        self.assertEqual(c.pending, 0)
        c.feed(SYNC)
        self.assertEqual(c.pending, 1)
        self.assertFalse(c.idle)
        ss.feed(m.command_complete("COPY 2") + m.ready_for_query(b"I"))
        self.assertEqual(c.pending, 0)
        self.assertEqual(ss.tx_status, codes.TX_IDLE)
        self.assertTrue(c.idle)

    def test_extended_copy_fail(self):
        c, ss = self.client, self.ss
        c.feed(parse("COPY t FROM STDIN") + bind() + execute() + SYNC)
        ss.feed(copy_in_response())
        self.assertEqual(c.pending, 0)
        c.feed(copy_fail("client gave up") + SYNC)
        self.assertFalse(c.in_copy_ext)
        self.assertEqual(c.pending, 1)
        ss.feed(m.error_response("ERROR", "57014", "COPY from stdin failed")
                + m.ready_for_query(b"I"))
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.idle)

    def test_extended_copy_with_flush(self):
        # Execute + Flush (no Sync yet) before the COPY starts.
        c, ss = self.client, self.ss
        c.feed(parse("COPY t FROM STDIN") + bind() + execute() + FLUSH)
        self.assertEqual(c.pending, 0)
        ss.feed(copy_in_response())
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.in_copy_ext)
        c.feed(copy_data(b"x\n") + COPY_DONE + SYNC)
        self.assertEqual(c.pending, 1)
        ss.feed(m.command_complete("COPY 1") + m.ready_for_query(b"I"))
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.idle)

    def test_simple_copy_from_stdin(self):
        c, ss = self.client, self.ss
        c.feed(m.query("COPY t FROM STDIN"))
        self.assertEqual(c.pending, 1)
        ss.feed(copy_in_response())
        self.assertEqual(c.pending, 1)
        self.assertFalse(c.in_copy_ext)
        c.feed(copy_data(b"1\n") + copy_data(b"2\n") + COPY_DONE)
        self.assertEqual(c.pending, 1)
        ss.feed(m.command_complete("COPY 2") + m.ready_for_query(b"I"))
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.idle)

    def test_simple_copy_after_extended(self):
        # last_extended must be cleared by a later Query.
        c, ss = self.client, self.ss
        c.feed(extended())
        ss.feed(m.command_complete("SELECT 1") + m.ready_for_query(b"I"))
        self.assertEqual(c.pending, 0)
        c.feed(m.query("COPY t FROM STDIN"))
        ss.feed(copy_in_response())
        self.assertEqual(c.pending, 1)
        self.assertFalse(c.in_copy_ext)

    def test_copy_out_does_not_change_pending(self):
        c, ss = self.client, self.ss
        c.feed(extended("COPY t TO STDOUT"))
        ss.feed(copy_out_response() + raw(b"d", b"1\n") + raw(b"c", b""))
        self.assertEqual(c.pending, 1)
        self.assertFalse(c.in_copy_ext)
        ss.feed(m.command_complete("COPY 1") + m.ready_for_query(b"I"))
        self.assertEqual(c.pending, 0)
        self.assertTrue(c.idle)


# --- write-through ----------------------------------------------------------------

class FakeSocket:
    def __init__(self, accept=None, error=None):
        self.accept = accept  # max bytes taken per send(), None = all
        self.error = error
        self.sent = []

    def send(self, data):
        if self.error is not None:
            raise self.error
        data = bytes(data)
        n = len(data) if self.accept is None else min(self.accept, len(data))
        self.sent.append(data[:n])
        return n


class FakeTCPTransport:
    """Stand-in with the attributes write_through relies on. Its
    ``fileno()`` is a key that WriteThroughTests' stand-in for ``os.write``
    maps back to the fake socket."""

    def __init__(self, sock):
        self.fileno = lambda: id(sock)
        self.dataBuffer = b""
        self._tempDataBuffer = []
        self.connected = True
        self.disconnecting = False
        self.socket = sock
        self.written = []
        self.producer = None
        self.registered = []

    def write(self, data):
        self.written.append(bytes(data))

    def registerProducer(self, producer, streaming):
        self.producer = producer
        self.registered.append((producer, streaming))

    def unregisterProducer(self):
        self.producer = None


class FakePeer:
    """The transport feeding the one written to (an IPushProducer)."""

    def __init__(self):
        self.resumed = 0
        self.paused = 0

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1

    def stopProducing(self):
        pass


class WriteThroughTests(SynchronousTestCase):
    DATA = b"Q\x00\x00\x00\x0dSELECT 1\x00" * 10

    def setUp(self):
        # write_through sends with os.write(transport.fileno(), data): route
        # that to the fake socket, which can take part of the data or fail.
        sockets = {}
        real_init = FakeTCPTransport.__init__

        def init(transport, sock):
            real_init(transport, sock)
            sockets[id(sock)] = sock

        self.patch(FakeTCPTransport, "__init__", init)
        self.patch(relay, "_write", lambda fd, data: sockets[fd].send(data))

    def test_real_socket(self):
        """The unpatched path: os.write on a connected socket's descriptor."""
        self.patch(relay, "_write", os.write)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        t = FakeTCPTransport(a)
        t.fileno = a.fileno
        write_through(t, self.DATA, None)
        self.assertEqual(b.recv(65536), self.DATA)
        self.assertEqual(t.written, [])

    def test_direct_send_when_empty(self):
        for peer in (None, FakePeer()):
            sock = FakeSocket()
            t = FakeTCPTransport(sock)
            write_through(t, self.DATA, peer)
            self.assertEqual(sock.sent, [self.DATA])
            self.assertEqual(t.written, [])
            # Everything went out: no need for backpressure.
            self.assertEqual(t.registered, [])

    def test_partial_send_writes_tail(self):
        sock = FakeSocket(accept=17)
        t = FakeTCPTransport(sock)
        peer = FakePeer()
        write_through(t, self.DATA, peer)
        self.assertEqual(sock.sent, [self.DATA[:17]])
        self.assertEqual(t.written, [self.DATA[17:]])
        self.assertEqual(t.registered, [(peer, True)])
        # A second fallback does not register again.
        t.dataBuffer = self.DATA[17:]
        write_through(t, b"more", peer)
        self.assertEqual(t.written, [self.DATA[17:], b"more"])
        self.assertEqual(t.registered, [(peer, True)])
        self.assertEqual(sock.sent, [self.DATA[:17]])

    def test_partial_send_without_peer(self):
        sock = FakeSocket(accept=3)
        t = FakeTCPTransport(sock)
        write_through(t, self.DATA, None)
        self.assertEqual(t.written, [self.DATA[3:]])
        self.assertEqual(t.registered, [])

    def test_existing_producer_kept(self):
        t = FakeTCPTransport(FakeSocket(accept=3))
        other = FakePeer()
        t.producer = other
        write_through(t, self.DATA, FakePeer())
        self.assertEqual(t.written, [self.DATA[3:]])
        self.assertIs(t.producer, other)
        self.assertEqual(t.registered, [])

    def test_zero_send_writes_all(self):
        sock = FakeSocket(accept=0)
        t = FakeTCPTransport(sock)
        write_through(t, self.DATA, None)
        self.assertEqual(t.written, [self.DATA])

    def test_buffers_not_empty(self):
        for attr, value in (("dataBuffer", b"queued"), ("_tempDataBuffer", [b"queued"])):
            sock = FakeSocket()
            t = FakeTCPTransport(sock)
            setattr(t, attr, value)
            peer = FakePeer()
            write_through(t, self.DATA, peer)
            self.assertEqual(sock.sent, [], attr)
            self.assertEqual(t.written, [self.DATA], attr)
            self.assertEqual(t.registered, [(peer, True)], attr)

    def test_not_connected_or_disconnecting(self):
        for attr, value in (("connected", False), ("disconnecting", True)):
            sock = FakeSocket()
            t = FakeTCPTransport(sock)
            setattr(t, attr, value)
            write_through(t, self.DATA, None)
            self.assertEqual(sock.sent, [], attr)
            self.assertEqual(t.written, [self.DATA], attr)

    def test_not_connected_does_not_register(self):
        t = FakeTCPTransport(FakeSocket())
        t.connected = False
        write_through(t, self.DATA, FakePeer())
        self.assertEqual(t.written, [self.DATA])
        self.assertEqual(t.registered, [])

    def test_eagain_falls_back(self):
        for err in (BlockingIOError(errno.EAGAIN, "again"),
                    OSError(errno.EWOULDBLOCK, "would block"),
                    OSError(errno.ENOBUFS, "no buffers"),
                    InterruptedError(errno.EINTR, "interrupted")):
            t = FakeTCPTransport(FakeSocket(error=err))
            peer = FakePeer()
            write_through(t, self.DATA, peer)
            self.assertEqual(t.written, [self.DATA], err)
            self.assertEqual(t.registered, [(peer, True)], err)

    def test_other_oserror_falls_back(self):
        for err in (BrokenPipeError(errno.EPIPE, "broken pipe"),
                    ConnectionResetError(errno.ECONNRESET, "reset"),
                    OSError(errno.EBADF, "bad fd")):
            t = FakeTCPTransport(FakeSocket(error=err))
            write_through(t, self.DATA, None)
            self.assertEqual(t.written, [self.DATA], err)

    def test_memoryview_and_bytearray(self):
        for data in (bytearray(self.DATA), memoryview(self.DATA)):
            sock = FakeSocket(accept=5)
            t = FakeTCPTransport(sock)
            write_through(t, data, None)
            self.assertEqual(sock.sent, [self.DATA[:5]])
            self.assertEqual(t.written, [self.DATA[5:]])

    def test_plain_write(self):
        st = StringTransport()
        plain_write(st, b"abc", None)
        self.assertIsNone(st.producer)
        peer = FakePeer()
        plain_write(st, b"def", peer)
        self.assertEqual(st.value(), b"abcdef")
        self.assertIs(st.producer, peer)
        self.assertTrue(st.streaming)
        plain_write(st, b"ghi", FakePeer())  # already registered: kept
        self.assertIs(st.producer, peer)
        self.assertEqual(st.value(), b"abcdefghi")

    def test_detach_producer(self):
        st = StringTransport()
        peer = FakePeer()
        plain_write(st, b"x", peer)
        detach_producer(st, peer)
        self.assertIsNone(st.producer)
        self.assertEqual(peer.resumed, 1)
        # not registered (or someone else is): nothing happens
        other = FakePeer()
        st.registerProducer(other, True)
        detach_producer(st, peer)
        self.assertIs(st.producer, other)
        self.assertEqual(peer.resumed, 1)
        detach_producer(None, peer)
        detach_producer(st, None)
        self.assertIs(st.producer, other)


class WriterForTests(SynchronousTestCase):
    def test_string_transport_is_plain(self):
        self.assertIs(writer_for(StringTransport()), plain_write)

    def test_stand_in_is_plain(self):
        # Only real twisted TCP connections get the fast path.
        self.assertIs(writer_for(FakeTCPTransport(FakeSocket())), plain_write)

    def _connection(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        b.setblocking(False)
        conn = tcp.Connection(a, protocol.Protocol(), MemoryReactor())
        conn.connected = 1  # as tcp.Server/Client set it once connected
        return conn, b

    def test_tcp_connection_gets_write_through(self):
        conn, _ = self._connection()
        w = writer_for(conn)
        # write_through itself, as a copy with its own code object (its
        # own specialization caches) per transport class.
        self.assertEqual(w.__code__.co_code, write_through.__code__.co_code)
        self.assertIsNot(w.__code__, write_through.__code__)
        conn2, _ = self._connection()
        self.assertIs(writer_for(conn2), w)

    def test_monomorphic_copy_leaves_builtins_alone(self):
        from pgcat_tw.relay import monomorphic_copy

        self.assertIs(monomorphic_copy(len), len)

    def test_write_through_copy_per_transport_class(self):
        class Accepted(tcp.Connection):
            pass

        conn, _ = self._connection()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        other = Accepted(a, protocol.Protocol(), MemoryReactor())
        other.connected = 1
        w1, w2 = writer_for(conn), writer_for(other)
        self.assertIsNot(w1.__code__, w2.__code__)
        w2(other, b"ping", None)
        self.assertEqual(b.recv(10), b"ping")

    def test_tls_connection_is_plain(self):
        conn, _ = self._connection()
        conn.TLS = True
        self.assertIs(writer_for(conn), plain_write)

    def test_real_connection_sends_directly(self):
        conn, peer = self._connection()
        reactor = conn.reactor
        data = m.query("SELECT 1") * 50
        write_through(conn, data, FakePeer())
        self.assertEqual(peer.recv(65536), data)
        # Nothing was buffered and the reactor was not asked to watch the socket.
        self.assertEqual(conn.dataBuffer, b"")
        self.assertEqual(conn._tempDataBuffer, [])
        self.assertNotIn(conn, reactor.getWriters())
        self.assertIsNone(conn.producer)

    def test_real_connection_buffers_when_queued(self):
        conn, peer = self._connection()
        conn.write(b"first")  # queued in Twisted's buffer
        feeder = FakePeer()
        write_through(conn, b"second", feeder)
        self.assertIs(conn.producer, feeder)
        with self.assertRaises(BlockingIOError):
            peer.recv(100)
        self.assertEqual(b"".join(conn._tempDataBuffer), b"firstsecond")
        self.assertIn(conn, conn.reactor.getWriters())


class ParameterValuesTests(SynchronousTestCase):
    """The cached tuple of tracked values is rebuilt after every mutation."""

    def test_every_mutation_clears_the_cache(self):
        from pgcat_tw.relay import ParameterValues

        p = ParameterValues(TimeZone="UTC", server_version="15")
        first = p.tracked()
        self.assertEqual(first[TRACKED_PARAMETERS.index("TimeZone")], "UTC")
        self.assertIs(p.tracked(), first)          # cached
        mutations = [
            lambda: p.__setitem__("TimeZone", "Europe/Paris"),
            lambda: p.update(DateStyle="ISO, DMY"),
            lambda: p.__ior__({"application_name": "x"}),
            lambda: p.pop("application_name"),
            lambda: p.setdefault("client_encoding", "UTF8"),
            lambda: p.__delitem__("client_encoding"),
            lambda: p.popitem(),
            lambda: p.clear(),
        ]
        for mutate in mutations:
            before = p.tracked()
            mutate()
            self.assertIsNone(p._tracked)
            self.assertEqual(p.tracked(), tuple(p.get(k) for k in TRACKED_PARAMETERS))
            self.assertIsNot(p.tracked(), before)
