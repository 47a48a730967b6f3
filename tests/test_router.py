"""The router's pure core (pgcat_tw.router: pgquery, infer, classify,
shardkey, hints, functions) without a server: the role of every statement
in tests/router_cases.py (PgCat's known misroutes among them), what an
Inference reports, the cache, the length limits, automatic sharding keys
and Bind parameters, comment hints. tests/test_router_pg.py runs the same
statements on a real hot standby.
"""

import struct

from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw.router import classify, functions, hints, infer, pgquery, shardkey
from pgcat_tw.router.classify import Classifier, normalize
from pgcat_tw.router.infer import PRIMARY, REPLICA
from pgcat_tw.sharding import pg_bigint_hash, sha1
from tests.router_cases import CASES


def inference(sql, **kw):
    return Classifier(**kw).classify(sql.encode() if isinstance(sql, str) else sql)


class RoleTableTests(SynchronousTestCase):

    def test_every_case(self):
        """Each statement of the table gets its role (one failure message
        lists every mismatch)."""
        self.assertGreaterEqual(len(CASES), 60)
        c = Classifier()
        wrong = []
        for sql, role, _flags in CASES:
            got = c.classify(sql.encode())
            if got.role != role:
                wrong.append((sql, role, got))
        self.assertEqual(wrong, [])

    def test_cases_again_from_the_cache(self):
        """Cached answers are the same as fresh ones (also through the
        normalized keys of texts with literals)."""
        c = Classifier()
        first = [c.classify(sql.encode()) for sql, _, _ in CASES]
        again = [c.classify(sql.encode()) for sql, _, _ in CASES]
        self.assertEqual([a.role for a in first], [b.role for b in again])
        self.assertEqual(c.parsed, len({sql for sql, _, _ in CASES if sql}) + 1)

    def test_reasons(self):
        self.assertEqual(inference("SELECT nextval('s')").reason, "function nextval()")
        self.assertEqual(inference("SELECT 1 FOR NO KEY UPDATE").reason, "FOR NO KEY UPDATE")
        self.assertEqual(inference("SELECT 1 INTO x").reason, "SELECT INTO")
        self.assertEqual(inference("INSERT INTO t VALUES (1)").reason, "InsertStmt")
        self.assertEqual(inference("BEGIN").reason, "BEGIN (read write)")
        self.assertIn("DeleteStmt", inference(
            "WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d").reason)
        self.assertTrue(inference("SELEC 1").reason.startswith("not parsed: syntax error"))
        self.assertEqual(inference("").reason, "empty query")
        self.assertIsNone(inference("SELECT 1").reason)

    def test_user_read_only_functions(self):
        """query_parser_read_only_functions: "f" allows f(...), "s.f" allows
        s.f(...); neither allows the other spelling."""
        allowed = ("F", "audit.Lookup")
        self.assertEqual(inference("SELECT f(1)", read_only_functions=allowed).role, REPLICA)
        self.assertEqual(inference("SELECT audit.lookup(1)",
                                   read_only_functions=allowed).role, REPLICA)
        self.assertEqual(inference("SELECT other.f(1)", read_only_functions=allowed).role,
                         PRIMARY)
        self.assertEqual(inference("SELECT lookup(1)", read_only_functions=allowed).role,
                         PRIMARY)
        self.assertEqual(inference("SELECT f(1)").role, PRIMARY)
        self.assertRaises(ValueError, functions.user_list, ["a.b.c"])

    def test_builtin_list(self):
        for name in ("now", "count", "lower", "coalesce_is_not_a_call", "nextval", "setval",
                     "currval", "lastval", "pg_advisory_lock", "set_config", "txid_current"):
            self.assertEqual(name in functions.BUILTIN_READ_ONLY,
                             name in ("now", "count", "lower"), name)
        self.assertTrue(functions.read_only(["pg_catalog", "now"], frozenset()))
        self.assertFalse(functions.read_only(["public", "now"], frozenset()))
        self.assertFalse(functions.read_only(["db", "pg_catalog", "now"], frozenset()))


class InferenceDetailTests(SynchronousTestCase):

    def test_transaction_flags(self):
        r = inference("BEGIN READ ONLY")
        self.assertEqual((r.role, r.begins, r.ends, r.read_only), (REPLICA, True, False, True))
        r = inference("START TRANSACTION READ WRITE")
        self.assertEqual((r.role, r.begins, r.read_only), (PRIMARY, True, False))
        r = inference("BEGIN")
        self.assertEqual((r.role, r.begins, r.read_only), (PRIMARY, True, None))
        r = inference("COMMIT")
        self.assertEqual((r.role, r.begins, r.ends), (REPLICA, False, True))
        r = inference("COMMIT AND CHAIN")
        self.assertEqual((r.begins, r.ends), (True, True))
        r = inference("PREPARE TRANSACTION 'x'")
        self.assertEqual((r.role, r.ends), (PRIMARY, True))
        r = inference("SET TRANSACTION READ ONLY")
        self.assertEqual((r.role, r.read_only, r.begins), (REPLICA, True, False))
        r = inference("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        self.assertEqual((r.role, r.read_only), (REPLICA, None))
        r = inference("SET LOCAL transaction_read_only = on")
        self.assertEqual((r.role, r.read_only), (REPLICA, True))

    def test_session_read_only(self):
        for sql, role, mode in [
                ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", REPLICA, True),
                ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", PRIMARY, False),
                ("SET default_transaction_read_only = on", REPLICA, True),
                ("SET default_transaction_read_only TO 'yes'", REPLICA, True),
                ("SET SESSION default_transaction_read_only = 1", REPLICA, True),
                ("SET default_transaction_read_only = off", PRIMARY, False),
                ("SET default_transaction_read_only = 0", PRIMARY, False),
                ("SET default_transaction_read_only TO DEFAULT", PRIMARY, False),
                ("RESET default_transaction_read_only", PRIMARY, False),
                ("SET LOCAL default_transaction_read_only = on", PRIMARY, None),
                ("RESET ALL", PRIMARY, False),
                ("DISCARD ALL", PRIMARY, False),
                ("SET search_path = x", PRIMARY, None)]:
            r = inference(sql)
            self.assertEqual((r.role, r.session_read_only), (role, mode), sql)

    def test_transaction_of_the_message(self):
        """A BEGIN is settled by what follows it in the same message."""
        r = inference("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; BEGIN; SELECT 1")
        self.assertEqual((r.role, r.read_only, r.session_read_only), (REPLICA, True, True))
        r = inference("BEGIN READ ONLY; COMMIT; BEGIN; SELECT 1")
        self.assertEqual((r.role, r.read_only), (PRIMARY, None))
        r = inference("BEGIN; SET TRANSACTION READ ONLY")
        self.assertEqual((r.role, r.read_only), (REPLICA, True))
        r = inference("BEGIN READ ONLY; SET TRANSACTION READ WRITE")
        self.assertEqual(r.role, PRIMARY)

    def test_tables(self):
        r = inference("SELECT * FROM a JOIN s.b ON a.id = b.id LEFT JOIN c USING (x), d "
                      "WHERE a.x IN (SELECT x FROM e)")
        self.assertEqual(r.tables, ("a", "s.b", "c", "d", "e"))
        r = inference("WITH w AS (SELECT * FROM t) SELECT * FROM w, w AS w2, s.w")
        self.assertEqual(r.tables, ("t", "s.w"))
        r = inference("UPDATE t SET a = 1 FROM u WHERE t.id = u.id; DELETE FROM t")
        self.assertEqual(r.tables, ("t", "u"))
        r = inference("INSERT INTO s.t SELECT * FROM u")
        self.assertEqual(r.tables, ("s.t", "u"))

    def test_kinds(self):
        r = inference("SELECT 1; SHOW x; INSERT INTO t VALUES (1)")
        self.assertEqual(r.kinds, ("SelectStmt", "VariableShowStmt", "InsertStmt"))

    def test_repr(self):
        text = repr(inference("SELECT nextval('s')"))
        self.assertIn("role='primary'", text)
        self.assertIn("nextval", text)

    def test_not_utf8(self):
        """Text in another ASCII-compatible encoding is parsed byte for byte."""
        r = inference("SELECT 'caf\xe9' FROM t".encode("latin-1"))
        self.assertEqual((r.role, r.tables), (REPLICA, ("t",)))
        r = inference("UPDATE t SET n = 'caf\xe9'".encode("latin-1"))
        self.assertEqual(r.role, PRIMARY)


class PgQueryTests(SynchronousTestCase):

    def test_parse(self):
        stmts = pgquery.parse(b"SELECT 1; SELECT 2")
        self.assertEqual([list(s["stmt"]) for s in stmts], [["SelectStmt"], ["SelectStmt"]])
        self.assertEqual(pgquery.parse(b""), [])

    def test_parse_error(self):
        e = self.assertRaises(pgquery.ParseError, pgquery.parse, b"SELECT 1 +")
        self.assertIn("syntax error", e.message)
        self.assertEqual(e.cursorpos, 11)
        self.assertRaises(pgquery.ParseError, pgquery.parse, b"SELECT 1\0; DELETE FROM t")

    def test_many_statements_and_no_leak_of_errors(self):
        """Thousands of parses, good and bad, in one process (results and
        errors are freed each time)."""
        for i in range(3000):
            pgquery.parse(b"SELECT %d FROM t WHERE id = $1" % i)
            self.assertRaises(pgquery.ParseError, pgquery.parse, b"SELEC %d" % i)

    def test_missing_library(self):
        """The error names the Debian package to install."""
        self.patch(pgquery, "_lib", None)
        self.patch(pgquery, "_load_error", None)
        self.patch(pgquery, "SONAMES", ("libpg_query_not_here.so.0",))
        e = self.assertRaises(pgquery.ParserUnavailable, pgquery.load)
        self.assertIn("libpg-query1504.0", str(e))
        self.assertIn("apt-get install", str(e))
        self.assertFalse(pgquery.available())
        self.assertRaises(pgquery.ParserUnavailable, Classifier)

    def test_available(self):
        self.assertTrue(pgquery.available())

    def test_negative_constants(self):
        """libpg_query's JSON drops non-positive integers: read from the text."""
        cases = {"-5": -5, "0": 0, "- 7": -7, "-(8)": -8, "- - 9": 9, "42": 42,
                 "-9223372036854775808": -9223372036854775808,
                 "9223372036854775807": 9223372036854775807, "-2147483648": -2147483648,
                 "1.5": None, "'x'": None}
        for literal, value in cases.items():
            text = f"SELECT {literal}".encode()
            target = pgquery.parse(text)[0]["stmt"]["SelectStmt"]["targetList"][0]
            node = target["ResTarget"]["val"]
            const = node.get("A_Const")
            got = pgquery.const_int(const, text) if const else "not a constant"
            self.assertEqual(got, value, literal)


class LimitTests(SynchronousTestCase):

    def test_max_length(self):
        c = Classifier(max_length=20)
        r = c.classify(b"SELECT 1 FROM t WHERE a = 'long enough'")
        self.assertEqual(r.role, PRIMARY)
        self.assertIn("query_parser_max_length", r.reason)
        self.assertEqual(c.parsed, 0)
        self.assertEqual(c.classify(b"SELECT 1").role, REPLICA)

    def test_max_length_capped_by_parse_limit(self):
        c = Classifier(max_length=10 ** 9)
        self.assertEqual(c.max_length, pgquery.PARSE_LIMIT)
        text = b"SELECT " + b"1+" * pgquery.PARSE_LIMIT + b"1"
        self.assertEqual(c.classify(text).role, PRIMARY)
        self.assertEqual(c.parsed, 0)

    def test_deep_trees(self):
        """Deep nesting within the limit is parsed and walked (the walk has
        no recursion) or refused (json's RecursionError, the grammar's own
        limits), never a crash; a write at the bottom is always seen."""
        for text in (b"SELECT " + b"1+" * 15000 + b"1",
                     b"SELECT " + b"(" * 5000 + b"1" + b")" * 5000,
                     b"SELECT 1" + b" UNION SELECT 1" * 2000,
                     b"SELECT " + b"f(" * 3000 + b"1" + b")" * 3000,
                     b"SELECT * FROM t WHERE " + b" AND ".join([b"a = 1"] * 2000)):
            self.assertLessEqual(len(text), pgquery.PARSE_LIMIT)
            r = inference(text, read_only_functions=["f"])
            if r.role == PRIMARY:
                self.assertTrue(r.reason.startswith("not parsed"), r.reason)
        for text in (b"SELECT 1" + b" UNION SELECT 1" * 2000 + b" UNION SELECT nextval('s')",
                     b"SELECT " + b"1+" * 1000 + b"nextval('s')"):
            self.assertEqual(inference(text).role, PRIMARY)
        r = inference(b"SELECT " + b"(" * 5000 + b"1" + b")" * 5000)
        self.assertEqual(r.role, REPLICA)

    def test_parse_limit_follows_the_stack(self):
        import resource
        self.patch(resource, "getrlimit", lambda what: (2 << 20, resource.RLIM_INFINITY))
        self.assertEqual(pgquery._parse_limit(), 8192)
        self.patch(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY,) * 2)
        self.assertEqual(pgquery._parse_limit(), 32768)
