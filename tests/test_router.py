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

    def test_unexpected_tree(self):
        """A tree the walk does not expect goes to the primary, not up."""
        self.patch(pgquery, "parse", lambda text: [{"stmt": {"SelectStmt": {
            "fromClause": [{"RangeVar": None}], "targetList": [{"FuncCall": {}}]}}}])
        r = Classifier().classify(b"SELECT 1")
        self.assertEqual(r.role, PRIMARY)
        self.assertTrue(r.reason.startswith("not understood: "), r.reason)

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


class CacheTests(SynchronousTestCase):

    def test_repeated_text_is_one_lookup(self):
        c = Classifier()
        text = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        first = c.classify(text)
        self.assertIs(c.classify(text), first)
        self.assertIs(c.current[text], first)
        self.assertEqual((c.parsed, c.hits), (1, 1))

    def test_bounded(self):
        """Two generations of cache_size // 2: the size never passes
        cache_size; texts in use stay (an old hit moves forward)."""
        c = Classifier(cache_size=8)
        hot = b"SELECT 1 FROM hot"
        c.classify(hot)
        for i in range(100):
            c.classify(b"SELECT %d FROM t%d" % (i, i))
            c.classify(hot)
            self.assertLessEqual(len(c.current) + len(c.old), 8)
        parsed = c.parsed
        c.classify(hot)
        self.assertEqual(c.parsed, parsed)
        self.assertEqual(parsed, 101)

    def test_bounded_in_bytes(self):
        c = Classifier(cache_bytes=4000)
        for i in range(100):
            c.classify(b"SELECT 1 FROM t%d WHERE name = '%s'" % (i, b"x" * 300))
            total = sum(map(len, c.current)) + sum(map(len, c.old))
            self.assertLessEqual(total, 4000)
        self.assertLessEqual(c.current_bytes, 2000)

    def test_unparsed_and_long_texts(self):
        """Parse errors are cached like any result; over-long texts are not
        stored at all."""
        c = Classifier(max_length=30)
        bad = b"SELEC 1"
        self.assertIs(c.classify(bad), c.classify(bad))
        self.assertEqual(c.parsed, 1)
        c.classify(b"SELECT 1 FROM t WHERE a = 'long text here'")
        self.assertNotIn(b"SELECT 1 FROM t WHERE a = 'long text here'", c.current)

    def test_literals_share_an_entry(self):
        """pgbench -M simple: one parse for every aid."""
        c = Classifier()
        for aid in range(1, 200):
            r = c.classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % aid)
            self.assertEqual((r.role, r.tables), (REPLICA, ("pgbench_accounts",)))
        self.assertEqual(c.parsed, 1)
        c.classify(b"UPDATE t SET s = 'x' WHERE id = 5")
        r = c.classify(b"UPDATE t SET s = 'it''s' WHERE id = 6")
        self.assertEqual((r.role, c.parsed), (PRIMARY, 2))

    def test_literals_that_matter_are_not_shared(self):
        c = Classifier()
        on = c.classify(b"SET default_transaction_read_only = 1")
        off = c.classify(b"SET default_transaction_read_only = 0")
        self.assertEqual((on.session_read_only, off.session_read_only), (True, False))
        self.assertEqual((on.role, off.role), (REPLICA, PRIMARY))
        c = Classifier(sharding_key="t.id")
        self.assertEqual(c.classify(b"SELECT * FROM t WHERE id = 5").keys, (5,))
        self.assertEqual(c.classify(b"SELECT * FROM t WHERE id = 6").keys, (6,))

    def test_normalize(self):
        self.assertEqual(normalize(b"SELECT a1, \"x 9 'y'\" FROM t2 WHERE b = 'q''r' AND c = 42"),
                         b"SELECT a1, \"x 9 'y'\" FROM t2 WHERE b = '' AND c = 0")
        self.assertEqual(normalize(b"SELECT 1.5, 1e5, x1y, 7"), b"SELECT 0.0, 1e5, x1y, 0")
        self.assertEqual(normalize("SELECT é1".encode()), "SELECT é1".encode())
        for unsafe in (b"SELECT E'\\''", b"SELECT $$x$$", b"SELECT 1 -- 'x",
                       b"SELECT /* ' */ 1", b"SELECT U&'x' UESCAPE '!'", b"SELECT $1"):
            self.assertIsNone(normalize(unsafe), unsafe)

    def test_normalized_results_hold_for_other_literals(self):
        """For every case with literals: the same statement with other
        literal values gets the same role and tables through the shared
        entry as from a fresh classifier."""
        import re
        shared = Classifier()
        for sql, _role, _flags in CASES:
            shared.classify(sql.encode())
        for sql, _role, _flags in CASES:
            other = re.sub(r"(?<![\w$])\d+(?!\w)", "7", sql).replace("'x'", "'other'")
            got, fresh = shared.classify(other.encode()), inference(other)
            self.assertEqual((got.role, got.tables), (fresh.role, fresh.tables), other)

    def test_clear(self):
        c = Classifier()
        c.classify(b"SELECT 1")
        c.clear()
        self.assertEqual((c.current, c.old), ({}, {}))


def key_of(sql, key="t.id", **kw):
    r = inference(sql, sharding_key=key, **kw)
    return r.keys, r.key_params, r.shard_error


class ShardingKeyTests(SynchronousTestCase):

    def test_conditions(self):
        for sql, expected in [
                ("SELECT * FROM t WHERE id = 5", (5,)),
                ("SELECT * FROM t WHERE 5 = id", (5,)),
                ("SELECT * FROM t WHERE id = -5", (-5,)),
                ("SELECT * FROM t WHERE id = 0", (0,)),
                ("SELECT * FROM t WHERE id = -9223372036854775808", (-9223372036854775808,)),
                ("SELECT 'ééé' FROM t WHERE id = -5", (-5,)),  # locations count bytes
                ("SELECT * FROM t WHERE id = '12'", (12,)),
                ("SELECT * FROM t WHERE id = 12::bigint", (12,)),
                ("SELECT * FROM t WHERE id = CAST('13' AS int8)", (13,)),
                ("SELECT * FROM t WHERE id = 1 AND a = 2", (1,)),
                ("SELECT * FROM t WHERE id = 1 OR id = 2", (1, 2)),
                ("SELECT * FROM t WHERE id IN (3, 4, -4)", (3, 4, -4)),
                ("SELECT * FROM t WHERE (id = 1 OR id = 2) AND a > 3", (1, 2)),
                ("SELECT * FROM t WHERE id = 1 OR a = 2", ()),
                ("SELECT * FROM t WHERE NOT id = 1", ()),
                ("SELECT * FROM t WHERE id <> 1", ()),
                ("SELECT * FROM t WHERE id NOT IN (1, 2)", ()),
                ("SELECT * FROM t WHERE id > 1", ()),
                ("SELECT * FROM t WHERE id = a", ()),
                ("SELECT * FROM t WHERE id = 1.5", ()),
                ("SELECT * FROM t WHERE id = 'x'", ()),
                ("SELECT * FROM t WHERE id = 99999999999999999999", ()),
                ("SELECT * FROM t WHERE id IN (1, a)", ()),
                ("SELECT * FROM t", ())]:
            self.assertEqual(key_of(sql)[0], expected, sql)

    def test_column_matching(self):
        for sql, key, expected in [
                ("SELECT * FROM t x WHERE x.id = 1", "t.id", (1,)),
                ("SELECT * FROM t WHERE t.id = 1", "t.id", (1,)),
                ("SELECT * FROM s.t WHERE s.t.id = 1", "t.id", (1,)),
                ("SELECT * FROM T WHERE ID = 1", "t.id", (1,)),
                ('SELECT * FROM t WHERE "id" = 1', '"t"."id"', (1,)),
                ("SELECT * FROM u WHERE id = 1", "t.id", ()),
                ("SELECT * FROM t, u WHERE id = 1", "t.id", ()),
                ("SELECT * FROM t, u WHERE u.id = 1", "t.id", ()),
                ("SELECT * FROM u t2 WHERE t2.id = 1", "t.id", ()),
                ("SELECT * FROM u WHERE id = 1", "*.id", (1,)),
                ("SELECT * FROM u x, v WHERE x.id = 1", "*.id", (1,)),
                ("SELECT * FROM t WHERE aid = 1", "*.id", ())]:
            self.assertEqual(key_of(sql, key)[0], expected, (sql, key))

    def test_joins_and_subqueries(self):
        for sql, expected in [
                ("SELECT * FROM t JOIN u ON t.id = 7 AND u.x = t.a", (7,)),
                ("SELECT * FROM u JOIN t ON t.id = u.aid WHERE t.id = 8", (8,)),
                ("SELECT * FROM u LEFT JOIN t ON t.id = 7", ()),
                ("SELECT * FROM u WHERE x IN (SELECT a FROM t WHERE id = 9)", (9,)),
                ("WITH c AS (SELECT * FROM t WHERE id = 10) SELECT * FROM c", (10,)),
                ("SELECT * FROM (SELECT * FROM t WHERE id = 11) s", (11,)),
                ("SELECT * FROM t WHERE id = 1 UNION SELECT * FROM t WHERE id = 2", (1, 2)),
                ("SELECT * FROM t WHERE id = 1; SELECT * FROM t WHERE id = 2", (1, 2)),
                ("EXPLAIN SELECT * FROM t WHERE id = 12", (12,))]:
            self.assertEqual(key_of(sql)[0], expected, sql)

    def test_writes(self):
        self.assertEqual(key_of("UPDATE t SET a = 1 WHERE id = 3"), ((3,), (), None))
        self.assertEqual(key_of("UPDATE t x SET a = 1 FROM u WHERE x.id = 3"), ((3,), (), None))
        self.assertEqual(key_of("DELETE FROM t WHERE id = $1"), ((), (1,), None))
        self.assertEqual(key_of("DELETE FROM t USING u WHERE t.id = u.aid"), ((), (), None))
        self.assertEqual(key_of("INSERT INTO t (a, id) VALUES (1, 2), (3, $2), (4, -6)"),
                         ((2, -6), (2,), None))
        self.assertEqual(key_of("INSERT INTO t (a, id) VALUES (1, 2) RETURNING id"),
                         ((2,), (), None))
        self.assertEqual(key_of("INSERT INTO t VALUES (1, 2)"), ((), (), None))
        self.assertEqual(key_of("INSERT INTO u (id) VALUES (1)"), ((), (), None))
        self.assertEqual(key_of("INSERT INTO u (id) VALUES (1)", "*.id"), ((1,), (), None))
        self.assertEqual(key_of("INSERT INTO t (id) SELECT id FROM t WHERE id = 4"),
                         ((4,), (), None))

    def test_refused(self):
        self.assertEqual(key_of("UPDATE t SET id = 2 WHERE id = 1")[2],
                         "sharding key cannot be updated")
        self.assertEqual(key_of("UPDATE u SET id = 2", "*.id")[2],
                         "sharding key cannot be updated")
        self.assertIsNone(key_of("UPDATE u SET id = 2")[2])
        self.assertEqual(key_of("INSERT INTO t (id) VALUES (1) ON CONFLICT (id) "
                                "DO UPDATE SET id = 2")[2], "sharding key cannot be updated")
        self.assertIn("neither a constant nor a parameter",
                      key_of("INSERT INTO t (id) VALUES (1), (DEFAULT)")[2])
        self.assertIsNone(key_of("INSERT INTO t (id) VALUES (DEFAULT)")[2])

    def test_sharding_key_spec(self):
        k = shardkey.ShardingKey('"Users".ID')
        self.assertEqual((k.table, k.column), ("users", "id"))
        for bad in ("id", "a.b.c", ".id", "t."):
            self.assertRaises(ValueError, shardkey.ShardingKey, bad)


def bind_body(values, formats=(), portal=b"", statement=b""):
    body = portal + b"\0" + statement + b"\0"
    body += struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return body + struct.pack("!h", 0)


class BindTests(SynchronousTestCase):

    def test_bind_parameters(self):
        body = bind_body([b"12", None, struct.pack("!q", -3)], formats=(0, 0, 1),
                         portal=b"p", statement=b"s1")
        formats, values = shardkey.bind_parameters(body)
        self.assertEqual(formats, (0, 0, 1))
        self.assertEqual(values, [b"12", None, struct.pack("!q", -3)])
        self.assertEqual([shardkey.param_int(formats, values, n) for n in (0, 1, 2, 3, 4)],
                         [None, 12, None, -3, None])

    def test_format_codes(self):
        """No format code: all text; one: for every parameter."""
        values = [struct.pack("!h", -2), struct.pack("!i", 70000)]
        self.assertEqual([shardkey.param_int((1,), values, n) for n in (1, 2)], [-2, 70000])
        self.assertEqual(shardkey.param_int((), [b" 42 "], 1), 42)
        self.assertIsNone(shardkey.param_int((), [b"4x"], 1))

    def test_decode(self):
        d = shardkey.decode_int_param
        self.assertEqual(d(struct.pack("!q", 2 ** 63 - 1), True), 2 ** 63 - 1)
        self.assertEqual(d(struct.pack("!q", -2 ** 63), True), -2 ** 63)
        self.assertEqual(d(b"-9223372036854775808", False), -2 ** 63)
        self.assertIsNone(d(b"9223372036854775808", False))
        self.assertIsNone(d(b"\x00\x01\x02", True))
        self.assertIsNone(d(None, False))
        self.assertIsNone(d(b"\xff", False))

    def test_shard_for(self):
        c = Classifier(sharding_key="t.id")
        r = c.classify(b"SELECT * FROM t WHERE id = $1")
        bind = bind_body([b"14"])
        self.assertEqual(shardkey.shard_for(r, 5, pg_bigint_hash, bind), 0)
        self.assertIsNone(shardkey.shard_for(r, 5, pg_bigint_hash))
        r = c.classify(b"SELECT * FROM t WHERE id IN (1, 4, 5, 14)")  # all shard 0 of 5
        self.assertEqual(shardkey.shard_for(r, 5, pg_bigint_hash), 0)
        r = c.classify(b"SELECT * FROM t WHERE id IN (1, 2)")
        e = self.assertRaises(shardkey.ShardingError, shardkey.shard_for, r, 5, pg_bigint_hash)
        self.assertIn("shards 0, 1", e.message)
        self.assertEqual(e.sqlstate, "0A000")
        r = c.classify(b"INSERT INTO t (id) VALUES ($1), ($2)")
        self.assertEqual(shardkey.shard_for(r, 12, sha1, bind_body([b"0", b"12"])), 4)
        self.assertRaises(shardkey.ShardingError, shardkey.shard_for, r, 12, sha1,
                          bind_body([b"0", b"1"]))
        r = c.classify(b"UPDATE t SET id = 1")
        self.assertRaises(shardkey.ShardingError, shardkey.shard_for, r, 3, sha1)
        self.assertIsNone(shardkey.shard_for(c.classify(b"SELECT 1"), 3, sha1))


class HintTests(SynchronousTestCase):

    settings = hints.HintSettings(r"/\* shard_id: (\d+) \*/", r"/\* sharding_key: (-?\d+) \*/")

    def test_shard_id_first(self):
        text = b"/* sharding_key: 2 */ /* shard_id: 2 */ SELECT 1"
        self.assertEqual(hints.hinted_shard(text, self.settings, 3, pg_bigint_hash), 2)

    def test_sharding_key(self):
        for key, shard in ((14, 0), (2, 1), (6, 2), (8, 3), (9, 4)):
            text = b"SELECT 1 /* sharding_key: %d */" % key
            self.assertEqual(hints.hinted_shard(text, self.settings, 5, pg_bigint_hash), shard)
        text = b"/* sharding_key: 7 */ SELECT 1"
        self.assertEqual(hints.hinted_shard(text, self.settings, 12, sha1), 10)

    def test_none(self):
        self.assertIsNone(hints.hinted_shard(b"SELECT 1", self.settings, 3, sha1))
        off = hints.HintSettings()
        self.assertFalse(off.active)
        self.assertTrue(self.settings.active)
        self.assertIsNone(hints.hinted_shard(b"/* shard_id: 1 */", off, 3, sha1))

    def test_search_limit(self):
        s = hints.HintSettings(r"/\* shard_id: (\d+) \*/", None, regex_search_limit=30)
        self.assertEqual(hints.hinted_shard(b"/* shard_id: 1 */ SELECT 1", s, 3, sha1), 1)
        late = b"SELECT 1 FROM a_long_table_name /* shard_id: 1 */"
        self.assertIsNone(hints.hinted_shard(late, s, 3, sha1))

    def test_errors(self):
        e = self.assertRaises(hints.HintError, hints.hinted_shard,
                              b"/* shard_id: 3 */ SELECT 1", self.settings, 3, sha1)
        self.assertIn("shard 3 is not configured", e.message)
        self.assertEqual(e.sqlstate, "22023")
        s = hints.HintSettings(r"shard=(\w+)", None)
        self.assertRaises(hints.HintError, hints.hinted_shard, b"shard=x", s, 3, sha1)
        s = hints.HintSettings(None, r"key=(\d+)")
        self.assertRaises(hints.HintError, hints.hinted_shard,
                          b"key=99999999999999999999", s, 3, sha1)
        self.assertRaises(ValueError, hints.HintSettings, r"shard_id: \d+", None)
        self.assertRaises(ValueError, hints.HintSettings, r"(", None)


class LayerTests(SynchronousTestCase):

    def test_no_twisted(self):
        """The router's modules and sharding are L0: nothing from Twisted."""
        import ast
        import inspect
        from pgcat_tw import sharding
        for module in (pgquery, infer, classify, shardkey, hints, functions, sharding):
            tree = ast.parse(inspect.getsource(module))
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    self.assertFalse(name.startswith("twisted"), (module.__name__, name))
