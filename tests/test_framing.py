"""Tests for pgcat_tw.protocol.framing (Scanner, MessageBuffer) and the codecs
in pgcat_tw.protocol.messages."""

import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw.errors import ProtocolViolation
from pgcat_tw.protocol import codes
from pgcat_tw.protocol import messages as m
from pgcat_tw.protocol.framing import (
    INVALID,
    MAX_STARTUP_PACKET,
    SKIP,
    FramingError,
    MessageBuffer,
    Scanner,
    want_table,
)


def raw(type_byte, body):
    """A hand-built typed message."""
    return type_byte + struct.pack("!i", len(body) + 4) + body


class RecordingScanner(Scanner):
    """Records every on_message call as (type char, bytes of the peeked span)."""

    def __init__(self, want, max_len=0x7FFFFFFF):
        Scanner.__init__(self, want, max_len)
        self.calls = []

    def on_message(self, msg_type, buf, start, end):
        self.calls.append((chr(msg_type), bytes(buf[start:end])))


# Peek sizes: some smaller than typical bodies, some larger; the big DataRow
# is longer than its peek (so a peek straddling chunks is followed by a skip).
PEEKS = {
    "T": 3,        # RowDescription: first 3 body bytes
    "D": 70000,    # DataRow: whole small rows, a 70000-byte prefix of the big one
    "C": 8,        # CommandComplete
    "S": 65536,    # ParameterStatus: whole body
    "N": 1,        # NoticeResponse
    "Z": 1,        # ReadyForQuery
    "I": 5,        # EmptyQueryResponse (empty body -> empty prefix)
    "c": 4,        # CopyDone (empty body -> empty prefix)
    # '1' ParseComplete, '2' BindComplete, 'n' NoData, 'd' CopyData: SKIP
}
WANT = want_table(PEEKS)

BIG_VALUE = bytes(random.Random(7).getrandbits(8) for _ in range(72 * 1024))


def backend_stream():
    """A realistic backend byte stream and the list of messages in it."""
    msgs = [
        raw(b"1", b""),                                    # ParseComplete (skip)
        raw(b"2", b""),                                    # BindComplete (skip)
        m.row_description([("id", 23), ("payload", 25)]),
        m.data_row(["1", "small"]),
        m.data_row(["2", None]),
        m.data_row(["3", BIG_VALUE]),                      # > 70 KB
        m.command_complete("SELECT 3"),
        m.parameter_status("application_name", "psql"),
        m.notice_response("there is no transaction in progress", "25P01"),
        raw(b"d", b"x" * 9000),                            # large skipped message
        raw(b"c", b""),
        m.ready_for_query(b"T"),
        raw(b"I", b""),
        raw(b"n", b""),
        m.parameter_status("TimeZone", "UTC"),
        m.ready_for_query(b"I"),
    ]
    return msgs


def expected_calls(msgs, peeks=PEEKS):
    out = []
    for msg in msgs:
        t = chr(msg[0])
        n = peeks.get(t, SKIP)
        if n > 0:
            body = msg[5:]
            out.append((t, body[:n]))
    return out


def boundaries(msgs):
    pos = 0
    b = {0}
    for msg in msgs:
        pos += len(msg)
        b.add(pos)
    return b


class ScannerStreamTests(SynchronousTestCase):
    def setUp(self):
        self.msgs = backend_stream()
        self.stream = b"".join(self.msgs)
        self.expected = expected_calls(self.msgs)

    def scan(self, chunks):
        sc = RecordingScanner(WANT)
        for c in chunks:
            sc.feed(c)
        return sc

    def test_stream_is_realistic(self):
        self.assertGreater(len(BIG_VALUE), 70 * 1024)
        types = [chr(x[0]) for x in self.msgs]
        for t in "TDCSNZ":
            self.assertIn(t, types)
        self.assertIn(m.command_complete("SELECT 3"), self.msgs)
        self.assertIn(b"Z\x00\x00\x00\x05T", self.stream)
        self.assertTrue(self.stream.endswith(b"Z\x00\x00\x00\x05I"))

    def test_expected_list(self):
        # Spot-check the expectation itself against the peek rules.
        exp = self.expected
        self.assertEqual(exp[0], ("T", b"\x00\x02i"))
        self.assertEqual(exp[1], ("D", self.msgs[3][5:]))
        big = [body for t, body in exp if t == "D" and len(body) > 1000]
        self.assertEqual(len(big), 1)
        self.assertEqual(len(big[0]), 70000)
        self.assertEqual(big[0], self.msgs[5][5:5 + 70000])
        self.assertIn(("C", b"SELECT 3"), exp)
        self.assertIn(("S", b"application_name\x00psql\x00"), exp)
        self.assertIn(("N", b"S"), exp)
        self.assertIn(("c", b""), exp)
        self.assertIn(("I", b""), exp)
        self.assertEqual(exp[-1], ("Z", b"I"))
        self.assertIn(("Z", b"T"), exp)
        self.assertNotIn("1", [t for t, _ in exp])
        self.assertNotIn("d", [t for t, _ in exp])

    def test_whole(self):
        sc = self.scan([self.stream])
        self.assertEqual(sc.calls, self.expected)
        self.assertTrue(sc.at_boundary)

    def test_every_split_point(self):
        stream = self.stream
        bounds = boundaries(self.msgs)
        for i in range(len(stream) + 1):
            sc = RecordingScanner(WANT)
            sc.feed(stream[:i])
            mid = sc.at_boundary
            sc.feed(stream[i:])
            if sc.calls != self.expected:
                self.fail(f"split at {i}: calls differ")
            if not sc.at_boundary:
                self.fail(f"split at {i}: not at boundary after complete input")
            if mid != (i in bounds):
                self.fail(f"split at {i}: at_boundary was {mid} after the first chunk")

    def test_one_byte_at_a_time(self):
        stream = self.stream
        bounds = boundaries(self.msgs)
        sc = RecordingScanner(WANT)
        for i in range(len(stream)):
            sc.feed(stream[i:i + 1])
            if sc.at_boundary != ((i + 1) in bounds):
                self.fail(f"after byte {i}: at_boundary is {sc.at_boundary}")
        self.assertEqual(sc.calls, self.expected)
        self.assertTrue(sc.at_boundary)

    def test_random_chunkings(self):
        rng = random.Random(20240501)
        stream = self.stream
        for trial in range(300):
            maxchunk = rng.choice([3, 7, 64, 1000, 20000, 100000])
            chunks = []
            pos = 0
            while pos < len(stream):
                n = rng.randint(0, maxchunk)  # empty chunks too
                chunks.append(stream[pos:pos + n])
                pos += n
            sc = self.scan(chunks)
            self.assertEqual(sc.calls, self.expected, f"trial {trial}")
            self.assertTrue(sc.at_boundary)

    def test_skip_everything(self):
        # With nothing wanted, no calls and boundaries are still tracked.
        sc = RecordingScanner(want_table({}))
        sc.feed(self.stream[:100])
        self.assertFalse(sc.at_boundary)
        sc.feed(self.stream[100:])
        self.assertEqual(sc.calls, [])
        self.assertTrue(sc.at_boundary)

    def test_mid_message_not_at_boundary(self):
        sc = RecordingScanner(WANT)
        sc.feed(self.msgs[0] + self.msgs[1])
        self.assertTrue(sc.at_boundary)
        rd = self.msgs[2]
        for cut in (1, 4, 5, 6, len(rd) - 1):
            sc2 = RecordingScanner(WANT)
            sc2.feed(rd[:cut])
            self.assertFalse(sc2.at_boundary, cut)

    def test_reset(self):
        sc = RecordingScanner(WANT)
        sc.feed(self.msgs[5][:3000])
        self.assertFalse(sc.at_boundary)
        sc.reset()
        self.assertTrue(sc.at_boundary)
        sc.feed(m.ready_for_query(b"E"))
        self.assertEqual(sc.calls, [("Z", b"E")])


class ScannerLengthTests(SynchronousTestCase):
    def assertFramingError(self, sc, chunks):
        """Feeding ``chunks`` raises FramingError on the last chunk."""
        err = None
        for c in chunks[:-1]:
            sc.feed(c)
        try:
            sc.feed(chunks[-1])
        except FramingError as e:
            err = e
        self.assertIsNotNone(err, "FramingError not raised by the last chunk")
        self.assertIsInstance(err, ProtocolViolation)
        self.assertEqual(err.sqlstate, "08P01")
        self.assertTrue(err.fatal)
        return err

    def bad_headers(self, max_len):
        return [
            b"D" + struct.pack("!i", 3),
            b"D" + struct.pack("!i", 0),
            b"D" + struct.pack("!i", -1),
            b"D" + struct.pack("!i", -(2 ** 31)),
            b"D" + struct.pack("!i", max_len + 1),
            b"Z" + struct.pack("!i", max_len + 1000),
        ]

    def test_bad_length_whole(self):
        for hdr in self.bad_headers(1000):
            for want in (WANT, want_table({})):
                sc = RecordingScanner(want, max_len=1000)
                self.assertFramingError(sc, [hdr + b"\x00" * 10])

    def test_bad_length_after_good_messages(self):
        good = m.ready_for_query(b"I") + m.command_complete("SELECT 1")
        for hdr in self.bad_headers(1000):
            sc = RecordingScanner(WANT, max_len=1000)
            self.assertFramingError(sc, [good + hdr])
            self.assertEqual(sc.calls, [("Z", b"I"), ("C", b"SELECT 1")])

    def test_bad_length_split_header(self):
        prefix = m.ready_for_query(b"I")
        for hdr in self.bad_headers(1000):
            for cut in range(1, 5):
                sc = RecordingScanner(WANT, max_len=1000)
                self.assertFramingError(sc, [prefix + hdr[:cut], hdr[cut:]])
                # and split three ways
                sc = RecordingScanner(want_table({}), max_len=1000)
                self.assertFramingError(sc, [hdr[:1], hdr[1:cut], hdr[cut:]])

    def test_bad_length_after_skip(self):
        # The bad header follows a message whose body spanned chunks.
        big = raw(b"d", b"y" * 500)
        hdr = b"D" + struct.pack("!i", 2)
        sc = RecordingScanner(WANT, max_len=1000)
        self.assertFramingError(sc, [big[:100], big[100:] + hdr])
        # ...or follows a peek that spanned chunks.
        row = m.data_row(["z" * 300])
        sc = RecordingScanner(WANT, max_len=1000)
        self.assertFramingError(sc, [row[:50], row[50:] + hdr])
        self.assertEqual(sc.calls, [("D", row[5:])])

    def test_exactly_max_len_accepted(self):
        max_len = 1000
        msg = raw(b"D", b"q" * (max_len - 4))
        self.assertEqual(struct.unpack_from("!i", msg, 1)[0], max_len)
        sc = RecordingScanner(WANT, max_len=max_len)
        sc.feed(msg + m.ready_for_query(b"I"))
        self.assertEqual(sc.calls, [("D", b"q" * 996), ("Z", b"I")])
        self.assertTrue(sc.at_boundary)
        # split header, too
        sc = RecordingScanner(WANT, max_len=max_len)
        sc.feed(msg[:3])
        sc.feed(msg[3:])
        self.assertEqual(sc.calls, [("D", b"q" * 996)])
        # one more byte is too much
        sc = RecordingScanner(WANT, max_len=max_len)
        err = self.assertFramingError(sc, [raw(b"D", b"q" * (max_len - 3))])
        self.assertIn(str(max_len), str(err))

    def test_minimum_length_accepted(self):
        sc = RecordingScanner(WANT)
        sc.feed(b"I\x00\x00\x00\x04")
        self.assertEqual(sc.calls, [("I", b"")])
        self.assertTrue(sc.at_boundary)

    def test_invalid_type(self):
        want = want_table({"Z": 1, "p": INVALID}, default=SKIP)
        msg = raw(b"p", b"secret\x00")
        sc = RecordingScanner(want)
        err = self.assertFramingError(sc, [m.ready_for_query(b"I") + msg])
        self.assertIn("'p'", str(err))
        self.assertEqual(sc.calls, [("Z", b"I")])
        for cut in range(1, 5):
            # Split header: raised as soon as the type byte is seen, before
            # the chunk holding it could be forwarded.
            sc = RecordingScanner(want)
            with self.assertRaises(FramingError):
                sc.feed(m.ready_for_query(b"I") + msg[:cut])
            self.assertEqual(sc.calls, [("Z", b"I")])
        # a whole header is enough, the body need not have arrived
        sc = RecordingScanner(want)
        self.assertFramingError(sc, [msg[:5]])

    def test_invalid_default(self):
        want = want_table({"Q": 1}, default=INVALID)
        sc = RecordingScanner(want)
        sc.feed(m.query("SELECT 1"))
        self.assertEqual(sc.calls, [("Q", b"S")])
        self.assertFramingError(sc, [b"\x00\x00\x00\x00\x08abcd"])

    def test_want_table(self):
        t = want_table({"Z": 1, ord("S"): 5, "p": INVALID}, default=SKIP)
        self.assertEqual(len(t), 256)
        self.assertEqual(t[ord("Z")], 1)
        self.assertEqual(t[ord("S")], 5)
        self.assertEqual(t[ord("p")], INVALID)
        self.assertEqual(t[ord("D")], SKIP)
        t2 = want_table({}, default=INVALID)
        self.assertEqual(set(t2), {INVALID})


class MessageBufferTests(SynchronousTestCase):
    def test_next_startup(self):
        pkt = m.startup_message({"user": "bob", "database": "app"})
        buf = MessageBuffer()
        buf.feed(pkt[:3])
        self.assertIsNone(buf.next_startup())
        buf.feed(pkt[3:10])
        self.assertIsNone(buf.next_startup())
        buf.feed(pkt[10:] + m.query("SELECT 1"))
        body = buf.next_startup()
        self.assertEqual(body, pkt[4:])
        self.assertEqual(struct.unpack_from("!i", body)[0], codes.PROTOCOL_3_0)
        self.assertEqual(len(buf), len(m.query("SELECT 1")))
        self.assertEqual(buf.next_message(), (ord("Q"), b"SELECT 1\x00"))
        self.assertEqual(len(buf), 0)

    def test_next_startup_ssl_and_cancel(self):
        buf = MessageBuffer()
        buf.feed(m.ssl_request() + m.cancel_request(42, 99))
        self.assertEqual(buf.next_startup(), struct.pack("!i", codes.SSL_REQUEST))
        self.assertEqual(buf.next_startup(),
                         struct.pack("!iii", codes.CANCEL_REQUEST, 42, 99))
        self.assertIsNone(buf.next_startup())

    def test_next_startup_bad_lengths(self):
        for length in (-1, 0, 4, 7, MAX_STARTUP_PACKET + 1, 2 ** 31 - 1):
            buf = MessageBuffer()
            buf.feed(struct.pack("!i", length) + b"\x00" * 8)
            with self.assertRaises(FramingError) as cm:
                buf.next_startup()
            self.assertEqual(cm.exception.sqlstate, "08P01")

    def test_next_startup_limits_accepted(self):
        buf = MessageBuffer()
        buf.feed(struct.pack("!i", 8) + b"abcd")
        self.assertEqual(buf.next_startup(), b"abcd")
        buf.feed(struct.pack("!i", MAX_STARTUP_PACKET) + b"z" * (MAX_STARTUP_PACKET - 5))
        self.assertIsNone(buf.next_startup())
        buf.feed(b"z")
        self.assertEqual(buf.next_startup(), b"z" * (MAX_STARTUP_PACKET - 4))

    def test_next_message(self):
        stream = m.auth_ok() + m.parameter_status("a", "b") + m.ready_for_query(b"I")
        buf = MessageBuffer()
        self.assertIsNone(buf.next_message())
        out = []
        for i in range(len(stream)):
            buf.feed(stream[i:i + 1])
            msg = buf.next_message()
            if msg is not None:
                out.append(msg)
        self.assertEqual(out, [
            (ord("R"), struct.pack("!i", 0)),
            (ord("S"), b"a\x00b\x00"),
            (ord("Z"), b"I"),
        ])
        self.assertEqual(len(buf), 0)

    def test_next_message_bad_length(self):
        for length in (3, 0, -5, 101):
            buf = MessageBuffer(max_len=100)
            buf.feed(b"D" + struct.pack("!i", length))
            with self.assertRaises(FramingError):
                buf.next_message()
        buf = MessageBuffer(max_len=100)
        buf.feed(raw(b"D", b"x" * 96))
        self.assertEqual(buf.next_message(), (ord("D"), b"x" * 96))

    def test_take_rest(self):
        buf = MessageBuffer()
        buf.feed(m.auth_ok() + b"partial")
        self.assertEqual(buf.next_message(), (ord("R"), b"\x00\x00\x00\x00"))
        self.assertEqual(buf.take_rest(), b"partial")
        self.assertEqual(len(buf), 0)
        self.assertEqual(buf.take_rest(), b"")
        self.assertIsNone(buf.next_message())


class MessagesTests(SynchronousTestCase):
    def test_startup_round_trip(self):
        params = {"user": "bob", "database": "app", "application_name": "sälj",
                  "options": "-c search_path=x"}
        pkt = m.startup_message(params)
        self.assertEqual(struct.unpack_from("!i", pkt)[0], len(pkt))
        self.assertEqual(struct.unpack_from("!i", pkt, 4)[0], codes.PROTOCOL_3_0)
        parsed = m.parse_startup_params(pkt[8:])
        self.assertEqual(parsed, params)
        self.assertEqual(list(parsed), list(params))
        self.assertEqual(m.parse_startup_params(m.startup_message({})[8:]), {})

    def test_startup_params_malformed(self):
        for body in (b"user\x00bob", b"user\x00", b"user\x00bob\x00x\x00\x00",
                     b"\x00bob\x00\x00"):
            with self.assertRaises(ValueError):
                m.parse_startup_params(body)

    def test_error_response_fields(self):
        msg = m.error_response("FATAL", "28P01", "password authentication failed")
        self.assertEqual(msg[:1], b"E")
        self.assertEqual(struct.unpack_from("!i", msg, 1)[0], len(msg) - 1)
        self.assertTrue(msg.endswith(b"\x00\x00"))
        fields = m.parse_error_fields(msg[5:])
        self.assertEqual(fields, {"S": "FATAL", "V": "FATAL", "C": "28P01",
                                  "M": "password authentication failed"})

    def test_error_response_detail_hint(self):
        msg = m.error_response("ERROR", "53300", "pool exhausted", detail="d é",
                               hint="raise pool_size")
        fields = m.parse_error_fields(msg[5:])
        self.assertEqual(fields["D"], "d é")
        self.assertEqual(fields["H"], "raise pool_size")
        self.assertEqual(fields["C"], "53300")
        self.assertEqual(set(fields), {"S", "V", "C", "M", "D", "H"})

    def test_notice_response(self):
        msg = m.notice_response("hello", detail="more")
        self.assertEqual(msg[:1], b"N")
        self.assertEqual(m.parse_error_fields(msg[5:]),
                         {"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": "hello",
                          "D": "more"})

    def test_pg_error_to_message(self):
        err = ProtocolViolation("bad")
        fields = m.parse_error_fields(err.to_message()[5:])
        self.assertEqual(fields["C"], "08P01")
        self.assertEqual(fields["S"], "FATAL")

    def test_parameter_status_round_trip(self):
        for name, value in [("TimeZone", "Europe/Oslo"), ("application_name", ""),
                            ("x", "å" * 100)]:
            msg = m.parameter_status(name, value)
            self.assertEqual(msg[:1], b"S")
            self.assertEqual(m.parse_parameter_status(msg[5:]), (name, value))
            self.assertEqual(m.parse_parameter_status(bytearray(msg[5:])), (name, value))

    def test_sasl_initial_response_round_trip(self):
        data = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
        msg = m.sasl_initial_response("SCRAM-SHA-256", data)
        self.assertEqual(msg[:1], b"p")
        self.assertEqual(m.parse_sasl_initial_response(msg[5:]), ("SCRAM-SHA-256", data))
        msg = m.sasl_initial_response("SCRAM-SHA-256", b"")
        self.assertEqual(m.parse_sasl_initial_response(msg[5:]), ("SCRAM-SHA-256", b""))
        body = b"SCRAM-SHA-256\x00" + struct.pack("!i", -1)
        self.assertEqual(m.parse_sasl_initial_response(body), ("SCRAM-SHA-256", None))

    def test_sasl_mechanisms(self):
        msg = m.auth_sasl(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"])
        self.assertEqual(struct.unpack_from("!i", msg, 5)[0], codes.AUTH_SASL)
        self.assertEqual(m.parse_sasl_mechanisms(msg[9:]),
                         ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"])

    def test_cstr(self):
        self.assertEqual(m.cstr("abc"), b"abc\x00")
        self.assertEqual(m.cstr(b"abc"), b"abc\x00")
        self.assertEqual(m.cstr("é"), b"\xc3\xa9\x00")
        self.assertEqual(m.cstr(""), b"\x00")
        for bad in ("a\x00b", b"a\x00b", "\x00"):
            with self.assertRaises(ValueError):
                m.cstr(bad)
        with self.assertRaises(ValueError):
            m.query("SELECT 1\x00; DROP TABLE x")
        with self.assertRaises(ValueError):
            m.startup_message({"user": "a\x00b"})

    def test_fixed_messages(self):
        self.assertEqual(m.READY_IDLE, b"Z\x00\x00\x00\x05I")
        self.assertEqual(m.READY_IN_TX, b"Z\x00\x00\x00\x05T")
        self.assertEqual(m.ready_for_query(b"E"), b"Z\x00\x00\x00\x05E")
        self.assertEqual(m.TERMINATE, b"X\x00\x00\x00\x04")
        self.assertEqual(m.SYNC, b"S\x00\x00\x00\x04")
        self.assertEqual(m.ssl_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        self.assertEqual(m.backend_key_data(1, 2),
                         b"K\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x02")
        self.assertEqual(m.auth_md5(b"abcd"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd")
        self.assertEqual(m.command_complete("SELECT 3"), b"C\x00\x00\x00\x0dSELECT 3\x00")

    def test_data_row_and_row_description(self):
        row = m.data_row(["a", None, b"\x00\x01"])
        buf = MessageBuffer()
        buf.feed(row)
        t, body = buf.next_message()
        self.assertEqual(t, ord("D"))
        self.assertEqual(body, struct.pack("!h", 3) + struct.pack("!i", 1) + b"a"
                         + struct.pack("!i", -1) + struct.pack("!i", 2) + b"\x00\x01")
        rd = m.row_description([("id", 23)])
        self.assertEqual(rd[5:7], struct.pack("!h", 1))
        self.assertEqual(rd[7:10], b"id\x00")
        self.assertEqual(struct.unpack_from("!ihihih", rd, 10), (0, 0, 23, -1, -1, 0))
        self.assertEqual(len(rd), 10 + 18)
