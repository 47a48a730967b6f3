"""PgCat's plugins for one pool, made ready (L0; reference §4.9).

``Plugins.build(settings)`` turns the plugin table in force for a pool
(``Config.plugins_for``: the pool's ``[pools.<p>.plugins]`` replaces the
global ``[plugins]`` entirely) into one object, or None when no plugin is
enabled: pools without plugins get no object and pay nothing.

- ``query_logger``: ``log_queries`` is True (the work phase logs each
  Query and Parse text; Bind parameters are never logged);
- ``intercept``: ``intercepted(text)`` -> the ``Intercept`` whose query
  the text is (compared case-folded, whitespace collapsed, trailing
  semicolons dropped, as PgCat compares its parser's rendering), or None;
- ``table_access``: ``denied(inference)`` -> the first listed table the
  statement touches (its last name part, as PgCat compares), or None;
- ``prewarmer``: ``prewarm``, the queries each new server connection runs
  before its first client.
"""

import struct

from pgcat_tw.protocol import messages as m

# Column types an intercept schema may name (PgCat's: text, anyarray, oid,
# bool, int4; a few more common ones; anything else is sent as text).
TYPE_OIDS = {
    "text": 25, "anyarray": 2277, "oid": 26, "bool": 16, "boolean": 16, "int4": 23,
    "integer": 23, "int": 23, "int2": 21, "smallint": 21, "int8": 20, "bigint": 20,
    "name": 19, "varchar": 1043, "char": 18, "float4": 700, "float8": 701,
    "numeric": 1700, "json": 114, "jsonb": 3802, "timestamptz": 1184,
    "timestamp": 1114, "date": 1082, "regclass": 2205, "regproc": 24,
}


def canonical(text):
    """A query text as intercept compares it: bytes, case-folded, runs of
    white space made one space, trailing semicolons dropped."""
    text = b" ".join(text.split()).lower()
    while text.endswith(b";"):
        text = text[:-1].rstrip()
    return text


def _int(size):
    return lambda v: int(v).to_bytes(size, "big", signed=True)


def _bool(v):
    return b"\x01" if v.lower() in ("t", "true", "1", "on", "yes", "y") else b"\x00"


# The binary forms the pooler can write (others: such a column is answered
# by the server instead).
_BINARY = {
    25: str.encode, 1043: str.encode, 19: str.encode, 18: str.encode,
    23: _int(4), 21: _int(2), 20: _int(8), 26: lambda v: int(v).to_bytes(4, "big"),
    16: _bool, 700: lambda v: struct.pack("!f", float(v)),
    701: lambda v: struct.pack("!d", float(v)),
}


class Intercept:
    """One configured query's answer: columns (name, type oid) and rows of
    strings (an empty string is NULL), with ``${USER}`` and ``${DATABASE}``
    replaced by the client's, in text or (for the common types) binary
    format."""

    __slots__ = ("columns", "rows", "_substituted")

    def __init__(self, schema, result):
        self.columns = tuple((name, TYPE_OIDS.get(kind.lower(), 25)) for name, kind in schema)
        self.rows = tuple(tuple(row) for row in result)
        self._substituted = any("${" in v for row in self.rows for v in row)

    def formats(self, codes):
        """A Bind's result format codes -> one per column, or None if a
        binary column is of a type the pooler cannot write."""
        n = len(self.columns)
        if not codes:
            return (0,) * n
        out = tuple(codes) * n if len(codes) == 1 else tuple(codes)
        if len(out) != n:
            return None
        for (_, oid), code in zip(self.columns, out):
            if code and oid not in _BINARY:
                return None
        return out

    def description(self, formats=None):
        """RowDescription (``formats``: per column, None for text)."""
        parts = [struct.pack("!h", len(self.columns))]
        for i, (name, oid) in enumerate(self.columns):
            code = formats[i] if formats else 0
            parts.append(m.cstr(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, code))
        body = b"".join(parts)
        return b"T" + struct.pack("!i", len(body) + 4) + body

    def parameters(self):
        """ParameterDescription: the canned query takes none."""
        return b"t\x00\x00\x00\x06\x00\x00"

    def rows_and_tag(self, user, database, formats=None):
        """The DataRows and the CommandComplete an Execute or Query gets."""
        out = []
        for row in self.rows:
            if self._substituted:
                row = [v.replace("${USER}", user).replace("${DATABASE}", database)
                       for v in row]
            values = [v if v != "" else None for v in row]
            if formats and any(formats):
                values = [v if v is None or not code else _BINARY[oid](v)
                          for v, code, (_, oid) in zip(values, formats, self.columns)]
            out.append(m.data_row(values))
        out.append(m.command_complete(f"SELECT {len(self.rows)}"))
        return b"".join(out)


class Plugins:
    __slots__ = ("log_queries", "intercepts", "tables", "prewarm")

    def __init__(self, log_queries=False, intercepts=None, tables=(), prewarm=()):
        self.log_queries = log_queries
        self.intercepts = intercepts or {}      # canonical text -> Intercept
        self.tables = frozenset(t.lower() for t in tables)
        self.prewarm = tuple(prewarm)

    @classmethod
    def build(cls, settings):
        """``settings``: the plugin table in force (a mapping of plugin name
        to its settings, or None). -> Plugins, or None if none is enabled."""
        if not settings:
            return None

        def on(name):
            p = settings.get(name)
            return p is not None and p["enabled"]

        intercepts = {}
        if on("intercept"):
            for q in settings["intercept"]["queries"].values():
                intercepts[canonical(q["query"].encode())] = Intercept(q["schema"], q["result"])
        tables = settings["table_access"]["tables"] if on("table_access") else ()
        prewarm = settings["prewarmer"]["queries"] if on("prewarmer") else ()
        log_queries = on("query_logger")
        if not (log_queries or intercepts or tables or prewarm):
            return None
        return cls(log_queries, intercepts, tables, prewarm)

    @property
    def inspects(self):
        """True if client messages go through the plugins (the prewarmer
        alone acts on server connections only)."""
        return bool(self.log_queries or self.intercepts or self.tables)

    def intercepted(self, text):
        if not self.intercepts:
            return None
        return self.intercepts.get(canonical(text))

    def denied(self, inference):
        """The listed table ``inference`` touches, or None. A text the
        parser could not read, or did not parse because of its length,
        counts as touching ``UNCHECKED``: access control fails closed."""
        if not self.tables:
            return None
        for name in inference.tables:
            last = name.rsplit(".", 1)[-1].lower()
            if last in self.tables:
                return last
        if (inference.reason or "").startswith(_UNREAD):
            return UNCHECKED
        return None


UNCHECKED = "(unchecked)"
# The reasons classify.Classifier gives for a text it did not read.
_UNREAD = ("not parsed", "not understood", "longer than")
