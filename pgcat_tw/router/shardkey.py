"""Automatic sharding key (L0, reference §4.4): key values in a parse tree,
Bind parameters, and the shard they lead to.

``automatic_sharding_key = "table.column"`` (``"*.column"``: any table)
becomes a ``ShardingKey``. ``extract`` (called by ``infer.infer`` for each
statement) collects the key's values from:

- conditions ``column = <integer literal>`` / ``column = $n`` (either side,
  through casts to integer types; a quoted integer counts), and
  ``column IN (<values>)``, in WHERE and in INNER JOIN ... ON, of every
  SELECT, UPDATE and DELETE in the statement (subqueries and CTEs
  included). AND takes the values of the conditions that have some; OR has
  values only when every branch has (``id = 1 OR name = 'x'`` pins no
  shard); NOT, other operators, and the ON of outer joins pin nothing.
  (PgCat walks AND and OR alike and stops at any other operator.)
- ``INSERT INTO table (..., column, ...) VALUES (...), (...)``: one value
  per row; a row whose key is neither a literal nor a parameter, among
  rows that have one, is an error (it would land on another row's shard).
  An INSERT without a column list, or from a SELECT, gives no value.
- An UPDATE (or ON CONFLICT DO UPDATE) assigning the key column is an error
  ("sharding key cannot be updated": the row would have to move).

A column matches when its name is the key's column and: the key's table is
``*``; or it is qualified by the table's name or by an alias of it; or it
is unqualified and the query's FROM names exactly that one table.

``$n`` values are reported as parameter numbers; ``shard_for`` resolves
them from the Bind message (``bind_parameters``; text, or binary int2,
int4 and int8) and applies the sharding function. Values that lead to more
than one shard raise ``ShardingError`` (the caller refuses the statement).
"""

import re
import struct

from pgcat_tw.errors import PgError
from pgcat_tw.router.pgquery import const_int

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*\Z")
_INTEGER_TYPES = ("int2", "int4", "int8", "numeric")
_SCOPES = ("SelectStmt", "UpdateStmt", "DeleteStmt", "InsertStmt")


class ShardingError(PgError):
    """A statement that cannot be sent to one shard (0A000)."""

    sqlstate = "0A000"


class ShardingKey:
    """``automatic_sharding_key``: ``table`` ("*" for any) and ``column``,
    lower case, double quotes dropped (as the config does)."""

    __slots__ = ("table", "column")

    def __init__(self, spec):
        parts = spec.replace('"', "").split(".")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f'sharding key must be "table.column", got {spec!r}')
        self.table, self.column = parts[0].lower(), parts[1].lower()

    def __repr__(self):
        return f"ShardingKey({self.table}.{self.column})"


class Found:
    """Values collected over the statements of one message."""

    __slots__ = ("values", "params", "error")

    def __init__(self):
        self.values = []
        self.params = []
        self.error = None

    def add(self, item):
        kind, value = item
        bucket = self.values if kind == "v" else self.params
        if value not in bucket:
            bucket.append(value)

    def fail(self, message):
        if self.error is None:
            self.error = message


def _only(node):
    """The (type, fields) of a wrapped node ``{"Type": {...}}``."""
    if len(node) != 1:
        return None, None
    return next(iter(node.items()))


def _value(node, text):
    """("v", int) for an integer constant, ("p", n) for $n, else None."""
    kind, f = _only(node)
    if kind == "A_Const":
        value = const_int(f, text)
        if value is None and "sval" in f:
            s = f["sval"].get("sval", "")
            value = int(s) if _INTEGER.match(s) else None
        if value is not None and INT64_MIN <= value <= INT64_MAX:
            return ("v", value)
    elif kind == "ParamRef":
        number = f.get("number")
        if number:
            return ("p", number)
    elif kind == "TypeCast":
        names = [n["String"]["sval"] for n in f["typeName"].get("names", ())]
        if names and names[-1] in _INTEGER_TYPES:
            return _value(f["arg"], text)
    return None


def _alias(fields):
    alias = fields.get("alias")
    return alias["aliasname"].lower() if alias else None


def _from(items, scope, quals):
    """FROM items -> scope entries (relation or None, alias or None) and
    the ON conditions of inner joins."""
    for item in items or ():
        kind, f = _only(item)
        if kind == "RangeVar":
            scope.append((f.get("relname", "").lower(), _alias(f)))
        elif kind == "JoinExpr":
            _from((f["larg"], f["rarg"]), scope, quals)
            if f.get("jointype") == "JOIN_INNER" and "quals" in f:
                quals.append(f["quals"])
        elif kind is not None:
            scope.append((None, _alias(f)))     # subquery or function: not the table


def _is_key(colref, scope, key):
    names = []
    for part in colref.get("fields", ()):
        s = part.get("String")
        if s is None:
            return False                        # t.*
        names.append(s["sval"].lower())
    if not names or names[-1] != key.column:
        return False
    if key.table == "*":
        return True
    if len(names) == 1:
        return len(scope) == 1 and scope[0][0] == key.table
    qualifier = names[-2]
    if len(names) > 2:
        return qualifier == key.table
    for relation, alias in scope:
        if alias == qualifier:
            return relation == key.table
    for relation, alias in scope:
        if alias is None and relation == qualifier:
            return relation == key.table
    return qualifier == key.table               # an outer query's table


def _constraint(expr, scope, key, text):
    """The key values a row satisfying ``expr`` may have (a list), or None
    when ``expr`` does not pin the key."""
    kind, f = _only(expr)
    if kind == "BoolExpr":
        parts = [_constraint(a, scope, key, text) for a in f.get("args", ())]
        op = f.get("boolop")
        if op == "AND_EXPR":
            found = [v for part in parts if part is not None for v in part]
            return found if any(p is not None for p in parts) else None
        if op == "OR_EXPR" and parts and all(p is not None for p in parts):
            return [v for part in parts for v in part]
        return None
    if kind != "A_Expr" or [n.get("String", {}).get("sval") for n in f.get("name", ())] != ["="]:
        return None
    left, right = f.get("lexpr"), f.get("rexpr")
    if left is None or right is None:
        return None
    if f.get("kind") == "AEXPR_OP":
        for col, other in ((left, right), (right, left)):
            if "ColumnRef" in col and _is_key(col["ColumnRef"], scope, key):
                value = _value(other, text)
                return None if value is None else [value]
        return None
    if f.get("kind") == "AEXPR_IN" and "ColumnRef" in left and "List" in right:
        if _is_key(left["ColumnRef"], scope, key):
            values = [_value(item, text) for item in right["List"].get("items", ())]
            return None if None in values else values
    return None


def _assigns_key(targets, relation, key):
    if key.table != "*" and relation.get("relname", "").lower() != key.table:
        return False
    return any(t.get("ResTarget", {}).get("name", "").lower() == key.column
               for t in targets or ())


def _insert(f, key, text, found):
    relation = f.get("relation", {})
    conflict = f.get("onConflictClause", {})
    if _assigns_key(conflict.get("targetList"), relation, key):
        found.fail("sharding key cannot be updated")
    if key.table != "*" and relation.get("relname", "").lower() != key.table:
        return
    cols = [c["ResTarget"].get("name", "").lower() for c in f.get("cols", ())]
    rows = f.get("selectStmt", {}).get("SelectStmt", {}).get("valuesLists")
    if key.column not in cols or not rows:
        return
    i = cols.index(key.column)
    values = []
    for row in rows:
        items = row["List"].get("items", ())
        values.append(_value(items[i], text) if i < len(items) else None)
    known = [v for v in values if v is not None]
    if known and len(known) < len(values):
        found.fail("a row's sharding key is neither a constant nor a parameter")
    for value in known:
        found.add(value)


def _scope(kind, f, key, text, found):
    """One query level: its tables, its conditions and (INSERT) its rows."""
    if kind == "InsertStmt":
        _insert(f, key, text, found)
        return
    scope, conds = [], []
    if kind == "SelectStmt":
        _from(f.get("fromClause"), scope, conds)
    else:
        relation = f.get("relation", {})
        scope.append((relation.get("relname", "").lower(), _alias(relation)))
        _from(f.get("fromClause" if kind == "UpdateStmt" else "usingClause"), scope, conds)
        if kind == "UpdateStmt" and _assigns_key(f.get("targetList"), relation, key):
            found.fail("sharding key cannot be updated")
    if "whereClause" in f:
        conds.append(f["whereClause"])
    if conds:
        values = _constraint({"BoolExpr": {"boolop": "AND_EXPR", "args": conds}},
                             scope, key, text)
        for value in values or ():
            found.add(value)


def extract(kind, fields, text, key, found):
    """Add the key values of one top-level statement to ``found``."""
    stack = [(kind, fields)]
    for kind, f in stack:             # outer levels first (the list grows)
        if kind in _SCOPES:
            _scope(kind, f, key, text, found)
        todo = [f]
        while todo:                   # nested query levels, anywhere below
            n = todo.pop()
            if type(n) is list:
                todo.extend(v for v in n if type(v) in (dict, list))
                continue
            for k, value in n.items():
                if type(value) is dict:
                    if k in _SCOPES:
                        stack.append((k, value))
                    elif k in ("larg", "rarg"):     # set operations: a bare SelectStmt
                        stack.append(("SelectStmt", value))
                    else:
                        todo.append(value)
                elif type(value) is list:
                    todo.append(value)


# -- Bind parameters ------------------------------------------------------

def bind_parameters(body):
    """A Bind message's body (bytes, after type and length) ->
    (formats, values): the parameter format codes as sent (none: all text;
    one: for all) and each parameter's bytes (None for NULL)."""
    end = body.index(b"\0")                     # portal
    end = body.index(b"\0", end + 1)            # statement
    pos = end + 1
    (nfmt,) = struct.unpack_from("!h", body, pos)
    formats = struct.unpack_from(f"!{nfmt}h", body, pos + 2)
    pos += 2 + 2 * nfmt
    (nparams,) = struct.unpack_from("!h", body, pos)
    pos += 2
    values = []
    for _ in range(nparams):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(bytes(body[pos:pos + length]))
            pos += length
    return formats, values


def decode_int_param(value, binary):
    """A parameter's bytes as a bigint key: text digits, or binary int2,
    int4 or int8 (big-endian). None for NULL or anything else."""
    if value is None:
        return None
    if binary:
        if len(value) in (2, 4, 8):
            return int.from_bytes(value, "big", signed=True)
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not _INTEGER.match(text):
        return None
    number = int(text)
    return number if INT64_MIN <= number <= INT64_MAX else None


def param_int(formats, values, number):
    """Parameter ``number`` (1-based) of ``bind_parameters``' result as a
    key, or None (absent, NULL, not an integer)."""
    if not 1 <= number <= len(values):
        return None
    if not formats:
        binary = False
    elif len(formats) == 1:
        binary = formats[0] == 1
    else:
        binary = number <= len(formats) and formats[number - 1] == 1
    return decode_int_param(values[number - 1], binary)


def shard_for(inference, shards, function, bind=None):
    """The one shard the statement's keys lead to, or None when it has no
    key (the caller uses its default shard). ``bind``: the Bind body for the
    statement's parameters (None: its $n keys are not used). Raises
    ShardingError for a statement that cannot go to one shard."""
    if inference.shard_error is not None:
        raise ShardingError(inference.shard_error)
    values = list(inference.keys)
    if inference.key_params and bind is not None:
        formats, params = bind_parameters(bind)
        for number in inference.key_params:
            value = param_int(formats, params, number)
            if value is not None:
                values.append(value)
    chosen = {function(value, shards) for value in values}
    if len(chosen) > 1:
        raise ShardingError(
            "the statement's sharding keys lead to shards "
            + ", ".join(str(s) for s in sorted(chosen))
            + ": a statement must stay on one shard")
    return chosen.pop() if chosen else None
