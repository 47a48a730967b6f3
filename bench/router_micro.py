"""Micro-benchmark of the router's pure core: parse + infer per statement.

For each statement: ``parse`` (libpg_query's JSON call and ``json.loads``),
``infer`` (the walk over the tree), ``cold`` (``Classifier.classify`` with an
empty cache: the two plus the cache's bookkeeping), ``warm`` (the same text
again: one dict lookup) and ``literal`` (a text seen before only with other
literal values: the normalized key). Also the libpg_query calls alone
(JSON and protobuf), to show why the JSON output was chosen.

Run it on both interpreters (the repository on the path, no install)::

    PYTHONPATH=. .venv/bin/python bench/router_micro.py
    PYTHONPATH=. .venv-pypy/bin/python bench/router_micro.py

Options: ``--seconds`` per measurement (default 0.3), ``--rounds`` (3; the
best round is printed), ``--sharding-key`` (e.g. ``pgbench_accounts.aid``:
extraction on, normalized keys off).
"""

import argparse
import platform
import sys
import time

from pgcat_tw.router import infer, pgquery
from pgcat_tw.router.classify import Classifier

STATEMENTS = [
    ("pgbench -S", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
    ("pgbench update", b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"),
    ("pgbench insert", b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                       b"VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)"),
    ("join + order", b"SELECT u.id, u.name, o.total FROM users u JOIN orders o "
                     b"ON o.user_id = u.id WHERE u.id = $1 AND o.status = 'open' "
                     b"ORDER BY o.created_at DESC LIMIT 20"),
    ("ORM select", b'SELECT "accounts"."id", "accounts"."email", "accounts"."created_at", '
                   b'"accounts"."plan_id" FROM "accounts" WHERE "accounts"."email" = $1 '
                   b'AND "accounts"."deleted_at" IS NULL LIMIT $2'),
    ("CTE write", b"WITH moved AS (DELETE FROM queue WHERE id = $1 RETURNING *) "
                  b"INSERT INTO done SELECT * FROM moved"),
    ("BEGIN", b"BEGIN"),
    ("select 1", b"SELECT 1"),
]
LITERAL = b"SELECT abalance FROM pgbench_accounts WHERE aid = %d"


def per_call(fn, seconds, rounds):
    """Best-of-rounds microseconds per call of ``fn()``."""
    n = 1
    while True:                         # calibrate: about a tenth of a round
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > seconds / 10:
            break
        n *= 2
    n = max(1, int(n * 10 * seconds / max(time.perf_counter() - t0, 1e-9) / 10))
    best = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        us = (time.perf_counter() - t0) / n * 1e6
        best = us if best is None else min(best, us)
    return best


def raw_calls(text, seconds, rounds):
    """The library calls alone: JSON (with and without json.loads' share,
    which ``parse`` includes) and protobuf, freed at once."""
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("""
        typedef struct { char* message; char* funcname; char* filename;
                         int lineno; int cursorpos; char* context; } PgQueryError;
        typedef struct { size_t len; char* data; } PgQueryProtobuf;
        typedef struct { char* parse_tree; char* stderr_buffer; PgQueryError* error; }
            PgQueryParseResult;
        typedef struct { PgQueryProtobuf parse_tree; char* stderr_buffer; PgQueryError* error; }
            PgQueryProtobufParseResult;
        PgQueryParseResult pg_query_parse(const char* input);
        PgQueryProtobufParseResult pg_query_parse_protobuf(const char* input);
        void pg_query_free_parse_result(PgQueryParseResult result);
        void pg_query_free_protobuf_parse_result(PgQueryProtobufParseResult result);
    """)
    lib = ffi.dlopen(pgquery.SONAMES[0])

    def json_call():
        lib.pg_query_free_parse_result(lib.pg_query_parse(text))

    def protobuf_call():
        r = lib.pg_query_parse_protobuf(text)
        ffi.buffer(r.parse_tree.data, r.parse_tree.len)[:]
        lib.pg_query_free_protobuf_parse_result(r)

    return per_call(json_call, seconds, rounds), per_call(protobuf_call, seconds, rounds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sharding-key", default=None)
    opts = ap.parse_args(argv)
    s, r = opts.seconds, opts.rounds
    impl = platform.python_implementation()
    print(f"{impl} {platform.python_version()} ({sys.executable}); "
          f"sharding key: {opts.sharding_key}")
    print(f"{'statement':16s} {'C json':>7s} {'C pb':>7s} {'parse':>7s} {'infer':>7s} "
          f"{'cold':>7s} {'warm':>7s}   (us per statement)")
    c = Classifier(sharding_key=opts.sharding_key)
    for name, text in STATEMENTS:
        c_json, c_pb = raw_calls(text, s, r)
        stmts = pgquery.parse(text)
        t_parse = per_call(lambda: pgquery.parse(text), s, r)
        t_infer = per_call(lambda: infer.infer(stmts, text, c.allowed, c.key), s, r)

        def cold():
            c.clear()
            c.classify(text)
        t_cold = per_call(cold, s, r)
        c.classify(text)
        t_warm = per_call(lambda: c.classify(text), s, r)
        print(f"{name:16s} {c_json:7.2f} {c_pb:7.2f} {t_parse:7.2f} {t_infer:7.2f} "
              f"{t_cold:7.2f} {t_warm:7.3f}")
    c.clear()
    c.classify(LITERAL % 0)
    before = c.parsed
    texts = [LITERAL % i for i in range(1, 100001)]
    it = iter(texts * 1000)
    t_lit = per_call(lambda: c.classify(next(it)), s, r)
    print(f"literal: '{LITERAL.decode() % 1}' with aid = 1, 2, ...: {t_lit:.2f} us "
          f"(texts parsed meanwhile: {c.parsed - before})")


if __name__ == "__main__":
    main()
