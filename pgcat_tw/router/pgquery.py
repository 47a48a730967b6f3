"""PostgreSQL's own parser: libpg_query through cffi (ABI mode), L0.

``parse(text)`` -> the statements of a query string as libpg_query's JSON
parse tree decoded with ``json``: a list of ``{"stmt": {NodeType: {...}},
"stmt_location": int, "stmt_len": int}`` (fields equal to zero, false or
empty are left out, as libpg_query writes them). It raises ``ParseError``
for SQL the grammar rejects and ``ParserUnavailable`` when the library is
not installed.

Debian 12 ships libpg_query 15-4.0.0 (the PostgreSQL 15 grammar) as package
``libpg-query1504.0``; cffi is built into PyPy and comes with cryptography
on CPython, so the same code runs on both interpreters. The JSON output
was chosen over ``pg_query_parse_protobuf`` by measurement (bench/README.rst,
"Router"): the protobuf call alone took longer than the JSON call plus
``json.loads``, and decoding protobuf in Python would come on top.

Two defects of this library version are handled here or by the callers:

- Deep trees: its tree writers recurse on the C stack, about 120 bytes per
  level, without a depth check. A left-deep expression (``1+1+1...``)
  nests one level per two bytes of text, and 60,000 levels crashed the
  process with an 8 MB stack (17,000 with 2 MB). ``parse`` therefore
  refuses texts longer than ``PARSE_LIMIT`` bytes (scaled down when the
  stack limit is below 8 MB); callers route those to the primary. The
  Python side is safe: ``json.loads`` raises RecursionError on deep trees,
  turned into a ParseError here.
- Negative integer constants: the JSON writer drops the value of an
  ``A_Const`` whose integer is not positive (``-5`` and ``0`` both come out
  as ``{"ival": {}}``). ``const_int`` below reads such a constant back from
  the query text at its location.
"""

import json
import re
import resource

PACKAGE = "libpg-query1504.0"
SONAMES = ("libpg_query.so.1504.0", "libpg_query.so")

_CDEF = """
typedef struct {
    char* message; char* funcname; char* filename;
    int lineno; int cursorpos; char* context;
} PgQueryError;
typedef struct { char* parse_tree; char* stderr_buffer; PgQueryError* error; } PgQueryParseResult;
PgQueryParseResult pg_query_parse(const char* input);
void pg_query_free_parse_result(PgQueryParseResult result);
"""


def _parse_limit():
    """The longest text parsed: 32 KiB with an 8 MB (or unlimited) stack,
    proportionally less with a smaller one (see the module docstring)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_STACK)
    except (OSError, ValueError):  # pragma: no cover - Linux always answers
        soft = resource.RLIM_INFINITY
    if soft == resource.RLIM_INFINITY or soft >= 8 << 20:
        return 32 << 10
    return max(1024, soft // 256)


PARSE_LIMIT = _parse_limit()


class ParserUnavailable(RuntimeError):
    """libpg_query (or cffi) is missing: the message says what to install."""


class ParseError(ValueError):
    """The grammar rejected the text (or it is too long or too deep)."""

    def __init__(self, message, cursorpos=0):
        super().__init__(message)
        self.message = message
        self.cursorpos = cursorpos


_ffi = None
_lib = None
_load_error = None


def load():
    """Load the library once; raise ParserUnavailable (every time) if it
    cannot be loaded. Call it at startup to fail early."""
    global _ffi, _lib, _load_error
    if _lib is not None:
        return _lib
    if _load_error is not None:
        raise ParserUnavailable(_load_error)
    try:
        import cffi
    except ImportError as e:
        _load_error = f"the query parser needs cffi ({e}): pip install cffi"
        raise ParserUnavailable(_load_error) from None
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    errors = []
    for name in SONAMES:
        try:
            lib = ffi.dlopen(name)
        except OSError as e:
            errors.append(str(e))
            continue
        _ffi, _lib = ffi, lib
        return lib
    _load_error = (
        f"the query parser needs libpg_query: install Debian's {PACKAGE} package "
        f"(apt-get install {PACKAGE}); tried {', '.join(SONAMES)}: {errors[0]}")
    raise ParserUnavailable(_load_error)


def available():
    """True when the library loads (the reason is in ``load``'s error)."""
    try:
        load()
    except ParserUnavailable:
        return False
    return True


def parse(text):
    """``text`` (bytes, no NUL) -> list of raw statements (see module doc)."""
    if len(text) > PARSE_LIMIT:
        raise ParseError(f"longer than {PARSE_LIMIT} bytes")
    lib = _lib if _lib is not None else load()
    if b"\0" in text:
        raise ParseError("NUL byte in query text")
    result = lib.pg_query_parse(text)
    try:
        if result.error:
            error = result.error
            raise ParseError(_ffi.string(error.message).decode("utf-8", "replace"),
                             error.cursorpos)
        raw = _ffi.string(result.parse_tree)
    finally:
        lib.pg_query_free_parse_result(result)
    try:
        # Text in other ASCII-compatible encodings than UTF-8 comes back
        # byte for byte: keep those bytes (surrogateescape) rather than fail.
        tree = json.loads(raw.decode("utf-8", "surrogateescape"))
    except RecursionError:
        raise ParseError("parse tree too deep") from None
    return tree.get("stmts", [])


_INT_AT = re.compile(rb"(?:-\s*|\(\s*|\+\s*)*([0-9]+)")


def const_int(node, text):
    """The integer value of an ``A_Const`` node's fields (``{"ival": ...}``
    or an integral ``{"fval": ...}``), or None for other constants.

    ``text`` is the query text the node was parsed from: a constant that
    libpg_query wrote without its value (zero or negative) is read back from
    the text at its location.
    """
    ival = node.get("ival")
    if ival is not None:
        value = ival.get("ival")
        if value is not None:
            return value
        return _int_at(text, node.get("location", 0))
    fval = node.get("fval")
    if fval is not None:
        s = fval.get("fval", "")
        body = s[1:] if s[:1] in ("-", "+") else s
        if body.isdigit():  # digits only: an integer too large for int4
            return int(s)
    return None


def _int_at(text, location):
    """The value of a non-positive integer constant starting at ``location``:
    minus signs, unary pluses and parentheses before its digits."""
    mo = _INT_AT.match(text, location)
    if mo is None:
        return None
    signs = text[location:mo.start(1)].count(b"-")
    value = int(mo.group(1))
    return -value if signs % 2 else value
