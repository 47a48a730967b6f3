"""The router's entry point for a query text (L0): ``Classifier.classify``.

One ``Classifier`` per pool, made from the pool's settings; ``classify(text)``
(the SQL of a simple Query or of a Parse, bytes without the NUL) returns an
``infer.Inference``. Texts longer than ``max_length`` (or than
``pgquery.PARSE_LIMIT``), texts libpg_query rejects and empty ones go to the
primary.

Results are cached by text in two generations of plain dicts: a hit in the
current one costs one dict lookup; when it holds ``cache_size // 2`` texts
(or ``cache_bytes // 2`` bytes of them) it becomes the old generation and a
new one starts; a hit in the old one moves the entry to the current one. So the texts in use stay, one-off texts go,
and nothing is done per hit to keep an order.

A text with literals also has a second key, the text with its literals
blanked (``normalize``): ``SELECT abalance FROM pgbench_accounts WHERE aid =
42`` and ``... aid = 43`` share an entry, so a simple-protocol client that
inlines values (``pgbench -M simple``) parses each statement shape once.
Only results that do not depend on a literal's value share such a key
(``Inference.generic``: no SET, no sharding key), and a text is normalized
only when a plain scan cannot mistake where its literals are (no
backslash, dollar sign, comment or UESCAPE). Normalized keys start with a
NUL byte, which no query text has, so they never meet a raw text.
"""

import re

from pgcat_tw.router import functions, infer, pgquery, shardkey

DEFAULT_CACHE_SIZE = 4096
DEFAULT_CACHE_BYTES = 8 << 20

_UESCAPE = re.compile(rb"uescape", re.IGNORECASE)
# Each alternative starts with a fixed character set (", ' or a digit), so
# the regex engine skips to candidates quickly; the lookbehind after the
# first digit keeps digits inside names (t1, x2y) out.
_LITERAL = re.compile(
    rb'"[^"]*(?:""[^"]*)*"'                             # a quoted identifier: kept
    rb"|'[^']*(?:''[^']*)*'"                            # a string: ''
    rb"|[0-9](?<![A-Za-z0-9_\x80-\xff][0-9])[0-9]*(?![A-Za-z0-9_\x80-\xff])")  # a number: 0


_NUMBER = re.compile(rb"[0-9](?<![A-Za-z0-9_\x80-\xff][0-9])[0-9]*(?![A-Za-z0-9_\x80-\xff])")


def _blank(mo):
    token = mo.group()
    first = token[0]
    if first == 0x22:       # "
        return token
    return b"''" if first == 0x27 else b"0"


def normalize(text):
    """``text`` with its string and integer literals blanked, or None when
    the text cannot be scanned safely without the grammar. Equal results
    mean the same statements with other literal values."""
    if (b"\\" in text or b"$" in text or b"--" in text or b"/*" in text
            or (b"&" in text and _UESCAPE.search(text))):
        return None
    if b"'" not in text and b'"' not in text:
        return _NUMBER.sub(b"0", text)    # numbers only: no callback per match
    return _LITERAL.sub(_blank, text)


class Classifier:
    """A pool's query classifier and its cache.

    max_length            ``query_parser_max_length`` (None: no limit but
                          ``pgquery.PARSE_LIMIT``)
    read_only_functions   ``query_parser_read_only_functions`` (names, see
                          ``functions.user_list``)
    sharding_key          ``automatic_sharding_key`` ("table.column") or None
    cache_size            texts kept (at most; two generations of half each)
    cache_bytes           bytes of text kept (at most, likewise)
    """

    def __init__(self, *, max_length=None, read_only_functions=(), sharding_key=None,
                 cache_size=DEFAULT_CACHE_SIZE, cache_bytes=DEFAULT_CACHE_BYTES):
        pgquery.load()          # ParserUnavailable names the package to install
        limit = pgquery.PARSE_LIMIT
        self.max_length = limit if max_length is None else min(max_length, limit)
        self.allowed = functions.user_list(read_only_functions)
        self.key = shardkey.ShardingKey(sharding_key) if sharding_key else None
        self.normalizing = self.key is None
        self.generation = max(1, cache_size // 2)
        self.generation_bytes = max(1, cache_bytes // 2)
        self.current = {}
        self.current_bytes = 0
        self.old = {}
        self.too_long = infer.primary(
            f"longer than query_parser_max_length ({self.max_length} bytes)")
        self.hits = 0           # answered from the cache
        self.parsed = 0         # texts parsed

    def classify(self, text):
        """``text``: bytes -> Inference (never raises for bad SQL)."""
        found = self.current.get(text)
        if found is not None:
            self.hits += 1
            return found
        return self._slow(text)

    def _slow(self, text):
        found = self.old.get(text)
        if found is not None:
            self.hits += 1
            self._store(text, found)
            return found
        if len(text) > self.max_length:
            return self.too_long
        norm = normalize(text) if self.normalizing else None
        if norm is not None and norm != text:
            key = b"\0" + norm
            found = self.current.get(key)
            if found is not None:
                self.hits += 1
                return found
            found = self.old.get(key)
            if found is not None:
                self.hits += 1
                self._store(key, found)     # back into the current generation
                return found
        else:
            key = text
        found = self._infer(text)
        self._store(text, found)        # this very text again: one lookup
        if key is not text and found.generic:
            self._store(key, found)     # the same shape with other literals
        return found

    def _infer(self, text):
        self.parsed += 1
        try:
            stmts = pgquery.parse(text)
        except pgquery.ParseError as e:
            return infer.primary(f"not parsed: {e.message}")
        try:
            return infer.infer(stmts, text, self.allowed, self.key)
        except (LookupError, TypeError, ValueError, AttributeError, RecursionError) as e:
            # A tree shape the walk does not expect (another libpg_query
            # version?): the primary, with the reason, rather than an error.
            return infer.primary(f"not understood: {type(e).__name__}: {e}")

    def _store(self, key, found):
        current = self.current
        size = self.current_bytes + len(key)
        if len(current) >= self.generation or size > self.generation_bytes:
            self.old = current
            self.current = current = {}
            size = len(key)
        self.current_bytes = size
        current[key] = found

    def clear(self):
        self.current = {}
        self.current_bytes = 0
        self.old = {}
