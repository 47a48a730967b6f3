"""SQL-level prepared statement commands the pooler must see in transaction
mode: PREPARE and EXECUTE (refused there) and DEALLOCATE (answered for the
client's own view of its statements).

``match(buf, start, end)`` on a Query body -> (kind, argument) or None, with
kind "prepare" | "execute" | "deallocate" | "discard_all"; for "deallocate"
the argument is the statement name (bytes) or None for ALL. Anchored and allocation-free when
the query is anything else.
"""

import re

_PREFIX = re.compile(rb"\s*(?:prepare(?!\s+transaction\b)|execute|deallocate|discard)\b",
                     re.IGNORECASE)
_DISCARD_ALL = re.compile(rb"\s*discard\s+all\s*;?\s*\Z", re.IGNORECASE)
_DEALLOCATE = re.compile(
    rb'\s*deallocate\s+(?:prepare\s+)?(?:(all)|"((?:[^"]|"")+)"|([a-z_][a-z0-9_$]*))\s*;?\s*\Z',
    re.IGNORECASE)


def match(buf, start, end):
    mo = _PREFIX.match(buf, start, end)
    if mo is None:
        return None
    word = bytes(buf[mo.start():mo.end()]).strip().lower()
    if word in (b"prepare", b"execute"):
        return (word.decode(), None)
    text = bytes(buf[start:end - 1] if end > start and buf[end - 1] == 0 else buf[start:end])
    if word == b"discard":
        return ("discard_all", None) if _DISCARD_ALL.match(text) else None
    d = _DEALLOCATE.match(text)
    if d is None:
        return None  # something else (e.g. several statements): the server decides
    if d.group(1):
        return ("deallocate", None)
    if d.group(2):
        return ("deallocate", d.group(2).replace(b'""', b'"'))
    return ("deallocate", d.group(3).lower())


# --- SQL PREPARE / EXECUTE mapped onto the shared statements -------------------
# (transaction mode with prepared_statements_cache_size: prepared.Rewriter)

_NAME = rb'(?:"((?:[^"]|"")+)"|([a-z_][a-z0-9_$]*))'
_PREPARE = re.compile(rb"\s*prepare\s+" + _NAME + rb"\s*(?:\(([^)]*)\))?\s*as\s+(.*?)[\s;]*\Z",
                      re.IGNORECASE | re.DOTALL)
_EXECUTE = re.compile(rb"\s*execute\s+" + _NAME + rb"\s*(\((.*)\))?[\s;]*\Z",
                      re.IGNORECASE | re.DOTALL)
EXECUTE_PREFIX = re.compile(rb"\s*execute\s", re.IGNORECASE)   # anchored, allocation-free
_QUOTED = re.compile(rb"'(?:[^']|'')*'")

# The parameter types a mapped PREPARE may declare (others keep PREPARE
# refused): their OIDs go into the protocol-level Parse.
TYPE_OIDS = {
    "int": 23, "integer": 23, "int4": 23, "bigint": 20, "int8": 20, "smallint": 21,
    "int2": 21, "text": 25, "varchar": 1043, "character varying": 1043, "bool": 16,
    "boolean": 16, "numeric": 1700, "decimal": 1700, "real": 700, "float4": 700,
    "double precision": 701, "float8": 701, "date": 1082, "timestamp": 1114,
    "timestamp without time zone": 1114, "timestamptz": 1184,
    "timestamp with time zone": 1184, "uuid": 2950, "json": 114, "jsonb": 3802,
    "bytea": 17, "oid": 26, "name": 19, "char": 1042, "bpchar": 1042,
    "interval": 1186, "time": 1083,
}


def _name(mo):
    if mo.group(1):
        return mo.group(1).replace(b'""', b'"')
    return mo.group(2).lower()


def _one_statement(text):
    """No semicolon outside string literals (one statement only)."""
    return b";" not in _QUOTED.sub(b"''", text)


def prepare_parts(text):
    """``PREPARE name [(type, ...)] AS statement`` -> (name, [type OIDs],
    statement), a str naming what cannot be mapped, or None if it is not
    one whole PREPARE."""
    mo = _PREPARE.match(text)
    if mo is None or not _one_statement(mo.group(4)) or not mo.group(4).strip():
        return None
    oids = []
    if mo.group(3) is not None and mo.group(3).strip():
        for raw in mo.group(3).split(b","):
            word = b" ".join(raw.split()).lower().decode("utf-8", "replace")
            oid = TYPE_OIDS.get(word)
            if oid is None:
                return f"parameter type {word!r}"
            oids.append(oid)
    return _name(mo), oids, mo.group(4)


def execute_parts(text):
    """``EXECUTE name [(args)]`` -> (name, the argument list with its
    parentheses or b""), or None."""
    mo = _EXECUTE.match(text)
    if mo is None or (mo.group(3) and not _one_statement(mo.group(3))):
        return None
    return _name(mo), mo.group(3) or b""
