"""The plugins' pure part (router/plugins.py): building a pool's set,
intercept matching and answers, table_access over libpg_query's parse
tree. No server, no client library: it runs on PyPy too (test_pypy)."""

from twisted.trial import unittest

from pgcat_tw.router.classify import Classifier
from pgcat_tw.router.plugins import UNCHECKED, Plugins, canonical


def settings(**plugins):
    """A plugin table as the config parser makes it (plain dicts will do)."""
    out = {"intercept": {"enabled": False, "queries": {}},
           "table_access": {"enabled": False, "tables": ()},
           "query_logger": {"enabled": False},
           "prewarmer": {"enabled": False, "queries": ()}}
    out.update(plugins)
    return out


class PluginUnitTests(unittest.SynchronousTestCase):
    def test_none_enabled_is_no_object(self):
        self.assertIsNone(Plugins.build(None))
        self.assertIsNone(Plugins.build(settings()))
        self.assertIsNone(Plugins.build(settings(
            table_access={"enabled": False, "tables": ("t",)})))

    def test_intercept_matches_case_and_spacing(self):
        p = Plugins.build(settings(intercept={"enabled": True, "queries": {
            "0": {"query": "SELECT  1 AS x;", "schema": (("x", "int4"),),
                  "result": (("${USER}",), ("",))}}}))
        self.assertEqual(canonical(b"  select 1\n as   X ;; "), b"select 1 as x")
        found = p.intercepted(b"select 1 as x")
        self.assertIsNotNone(found)
        self.assertIsNone(p.intercepted(b"select 2 as x"))
        self.assertEqual(found.columns, (("x", 23),))
        out = found.rows_and_tag("alice", "db")
        self.assertIn(b"\x00\x00\x00\x05alice", out)
        self.assertIn(b"\xff\xff\xff\xff", out)          # "" is NULL
        self.assertTrue(out.endswith(b"C\x00\x00\x00\x0dSELECT 2\x00"))

    def test_table_access_uses_the_parse_tree(self):
        p = Plugins.build(settings(table_access={"enabled": True, "tables": ("Secret",)}))
        c = Classifier(max_length=200)
        refused = [
            "select * from secret",
            "select * from public.secret s join other o on o.id = s.id",
            "with x as (select * from secret) select * from x",
            "select (select max(id) from app.secret) as m",
            "insert into log select * from secret",
            "update t set v = 1 where id in (select id from secret)",
            "select 1; delete from secret",
            "select * from " + "x" * 300,      # too long for the parser: unchecked
            "selec * from secret",              # not parsed: unchecked
        ]
        allowed = [
            "select 'secret' as word",
            "select secret from t",             # a column, not a table
            "with secret as (select 1) select * from secret",   # a CTE of that name
            "select * from secrets",
        ]
        self.assertEqual([p.denied(c.classify(q.encode())) for q in refused],
                         ["secret"] * 7 + [UNCHECKED] * 2)
        self.assertEqual([p.denied(c.classify(q.encode())) for q in allowed], [None] * 4)
