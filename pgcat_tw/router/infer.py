"""Read/write inference (L0): a parsed query string -> an ``Inference``.

``infer(stmts, text, functions, key=None)`` takes ``pgquery.parse``'s
statements and decides where the message may run: ``REPLICA`` (any server
may answer it: it writes nothing and locks nothing) or ``PRIMARY``. The
rule is an allow-list; whatever it does not prove harmless goes to the
primary:

- reads: SELECT, VALUES and TABLE (with read-only CTEs), SHOW, EXPLAIN,
  DECLARE CURSOR and ``COPY ... TO STDOUT`` of a read;
- not reads, anywhere in the tree: a data-modifying statement (a CTE's
  INSERT/UPDATE/DELETE/MERGE at any depth), a locking clause (FOR UPDATE,
  FOR NO KEY UPDATE, FOR SHARE, FOR KEY SHARE), ``SELECT ... INTO``, and a
  call of a function that is neither in ``functions.BUILTIN_READ_ONLY`` nor
  in the pool's list (``functions``, from ``functions.user_list``);
- transactions: BEGIN / START TRANSACTION goes to the primary unless the
  message declares the transaction READ ONLY (in its options, or by ``SET
  TRANSACTION READ ONLY`` or ``SET SESSION CHARACTERISTICS AS TRANSACTION
  READ ONLY`` / ``SET default_transaction_read_only = on`` before it);
  COMMIT, ROLLBACK, SAVEPOINT, RELEASE and ROLLBACK TO decide nothing
  (they run where the transaction runs); two-phase commit statements are
  writes. The declarations are reported (``read_only``,
  ``session_read_only``) so that the caller can keep a transaction, or a
  session, on a replica;
- every other statement (INSERT, UPDATE, DELETE, MERGE, DDL, SET, RESET,
  DISCARD, LOCK, LISTEN, NOTIFY, CALL, DO, PREPARE, EXECUTE, FETCH, VACUUM,
  COPY FROM or to a file...) is a write;
- a message of several statements is a write when any of them is; an
  empty one goes to the primary too.

Not visible in the text, and so not handled: a view or an operator whose
function writes, a cast or type input function that writes.

With a sharding key (``shardkey.ShardingKey``) the key values of every
statement are collected too (``shardkey.extract``).
"""

from pgcat_tw.router import functions as _functions
from pgcat_tw.router import shardkey

PRIMARY = "primary"
REPLICA = "replica"


class Inference:
    """What one query string does (immutable: shared through the cache).

    role            PRIMARY or REPLICA
    reason          why PRIMARY (a short text for logs), None for REPLICA
    begins, ends    the message starts / ends a transaction (COMMIT AND
                    CHAIN does both)
    read_only       the access mode the message declares for its
                    transaction: True (READ ONLY), False (READ WRITE) or
                    None (not declared)
    session_read_only  the same for the session's default
                    (SET SESSION CHARACTERISTICS, default_transaction_read_only;
                    RESET ALL and DISCARD ALL give False)
    tables          tuple of the relations named ("schema.table" or
                    "table"; CTE names left out), in order, without repeats
    keys            sharding key values found (ints)
    key_params      parameter numbers ($n, 1-based) that hold key values
    shard_error     why the statement cannot be sharded (the caller
                    refuses it), or None
    kinds           the statements' node types ("SelectStmt", ...)
    generic         the result does not depend on the value of any literal
                    (the cache may share it between texts that differ only
                    in literals)
    """

    __slots__ = ("role", "reason", "begins", "ends", "read_only", "session_read_only",
                 "tables", "keys", "key_params", "shard_error", "kinds", "generic")

    def __init__(self, role, reason=None, begins=False, ends=False, read_only=None,
                 session_read_only=None, tables=(), keys=(), key_params=(),
                 shard_error=None, kinds=(), generic=True):
        self.role = role
        self.reason = reason
        self.begins = begins
        self.ends = ends
        self.read_only = read_only
        self.session_read_only = session_read_only
        self.tables = tables
        self.keys = keys
        self.key_params = key_params
        self.shard_error = shard_error
        self.kinds = kinds
        self.generic = generic

    def __repr__(self):
        fields = " ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__
                          if getattr(self, name) not in (None, False, ()))
        return f"<Inference {fields}>"


def primary(reason):
    """An Inference for a text that was not parsed (or did not parse)."""
    return Inference(PRIMARY, reason)


_LOCKS = {"LCS_FORKEYSHARE": "FOR KEY SHARE", "LCS_FORSHARE": "FOR SHARE",
          "LCS_FORNOKEYUPDATE": "FOR NO KEY UPDATE", "LCS_FORUPDATE": "FOR UPDATE"}


class _Message:
    """What the statements of one message add up to, while walking them."""

    def __init__(self):
        self.reason = None
        self.begins = self.ends = False
        self.read_only = None
        self.session_read_only = None
        self.open_begin = False     # a BEGIN whose transaction is not settled yet
        self.generic = True
        self.tables = []
        self.ctes = set()

    def write(self, reason):
        if self.reason is None:
            self.reason = reason

    def settle(self):
        """A transaction begun in this message ends here (or the message
        does): it was a write unless it was declared read-only."""
        if self.open_begin and self.read_only is not True:
            self.write("BEGIN (read write)")
        self.open_begin = False


# Nested statements are always wrapped nodes ({"InsertStmt": {...}}) in
# libpg_query's tree (pg_query.proto: CTE queries, subqueries, EXPLAIN's and
# COPY's queries are Node fields); only a set operation's arms (larg, rarg)
# are bare SelectStmts, which need no check of their own.
#
# What the walk does with a key whose value is a node or a list: descend
# (PLAIN), skip a subtree that cannot hold a call, a relation or a
# statement (SKIP), or look first. Keys not listed are classified on first
# sight (a capitalized ...Stmt other than SelectStmt is a nested statement).
PLAIN, SKIP, FUNC, CTE, INTO, LOCK, STMT = range(7)
_CATEGORY = {
    "ColumnRef": SKIP, "A_Const": SKIP, "ParamRef": SKIP, "String": SKIP, "A_Star": SKIP,
    "typeName": SKIP, "TypeName": SKIP, "funcname": SKIP,
    "FuncCall": FUNC, "CommonTableExpr": CTE, "intoClause": INTO, "lockingClause": LOCK,
    "SelectStmt": PLAIN,
}


def _category(key):
    category = STMT if key[:1].isupper() and key.endswith("Stmt") else PLAIN
    _CATEGORY[key] = category
    return category


def _look(category, key, value, msg, allowed):
    if category == FUNC:
        names = [part["String"]["sval"] for part in value["funcname"]]
        if not _functions.read_only(names, allowed):
            msg.write(f"function {'.'.join(names)}()")
    elif category == CTE:
        msg.ctes.add(value.get("ctename"))
    elif category == INTO:
        msg.write("SELECT INTO")
    elif category == LOCK:
        strength = value[0].get("LockingClause", {}).get("strength") if value else None
        msg.write(_LOCKS.get(strength, "locking clause"))
    else:
        msg.write(f"data-modifying {key} in a query")


def _scan(node, msg, allowed):
    """Walk a subtree: writes hidden in queries, function calls, tables."""
    stack = [node]
    pop, push, extend = stack.pop, stack.append, stack.extend
    categories = _CATEGORY
    while stack:
        n = pop()
        if type(n) is not dict:
            if type(n) is list:
                extend(n)
            continue
        name = n.get("relname")
        if name is not None:        # a RangeVar's fields, wrapped or not
            schema = n.get("schemaname")
            msg.tables.append((n.get("location", 0), f"{schema}.{name}" if schema else name))
        for key, value in n.items():
            t = type(value)
            if t is dict or t is list:
                category = categories.get(key)
                if category is None:
                    category = _category(key)
                if category:
                    if category == SKIP:
                        continue
                    _look(category, key, value, msg, allowed)
                if t is dict:
                    push(value)
                else:
                    extend(value)


def _option(options, name):
    """The value of DefElem ``name`` among ``options`` (A_Const ival, which
    libpg_query leaves out when 0), or None when absent."""
    for item in options or ():
        elem = item.get("DefElem")
        if elem is not None and elem.get("defname") == name:
            arg = elem.get("arg", {}).get("A_Const", {})
            return arg.get("ival", {}).get("ival", 0)
    return None


_TRUE = ("on", "true", "yes", "1", "t", "tr", "tru", "y", "ye")
_FALSE = ("off", "false", "no", "0", "f", "fa", "fal", "fals", "n", "of")


def _setting_bool(args):
    """A SET's value as a boolean (PostgreSQL's spellings), None if unclear."""
    if not args or len(args) != 1:
        return None
    const = args[0].get("A_Const")
    if const is None:
        return None
    if "sval" in const:
        word = const["sval"].get("sval", "").strip().lower()
    elif "ival" in const:
        word = str(const["ival"].get("ival", 0))
    else:
        return None
    if word in _TRUE:
        return True
    return False if word in _FALSE else None


def _transaction(fields, msg):
    kind = fields.get("kind")
    if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
        msg.settle()
        msg.begins = True
        mode = _option(fields.get("options"), "transaction_read_only")
        if mode is None:
            msg.read_only = msg.session_read_only  # the session's default, if declared here
        else:
            msg.read_only = bool(mode)
        msg.open_begin = True
    elif kind in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK"):
        msg.settle()
        msg.ends = True
        if fields.get("chain"):
            msg.begins = True       # same characteristics, same server
    elif kind in ("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED",
                  "TRANS_STMT_ROLLBACK_PREPARED"):
        msg.write("two-phase commit")
        msg.ends = msg.ends or kind == "TRANS_STMT_PREPARE"
    # SAVEPOINT, RELEASE, ROLLBACK TO: nothing to decide


def _variable_set(fields, msg):
    """SET / RESET: writes (session state) except declarations of read-only
    mode, which are reported."""
    msg.generic = False
    kind = fields.get("kind")
    name = fields.get("name", "")
    lname = name.lower()
    if kind == "VAR_RESET_ALL":
        msg.session_read_only = False
    elif name == "TRANSACTION" or lname == "transaction_read_only":
        if name == "TRANSACTION":
            mode = _option(fields.get("args"), "transaction_read_only")
            mode = None if mode is None else bool(mode)
        else:
            mode = _setting_bool(fields.get("args")) if kind == "VAR_SET_VALUE" else None
        if mode is not None:
            msg.read_only = mode
        if mode is not False:
            return          # READ ONLY, or another characteristic: no write
        msg.write("SET TRANSACTION READ WRITE")
        return
    elif name == "SESSION CHARACTERISTICS" or lname == "default_transaction_read_only":
        if name == "SESSION CHARACTERISTICS":
            mode = _option(fields.get("args"), "transaction_read_only")
            mode = None if mode is None else bool(mode)
        elif kind == "VAR_SET_VALUE" and not fields.get("is_local"):
            mode = _setting_bool(fields.get("args"))
        else:
            mode = False if kind in ("VAR_SET_DEFAULT", "VAR_RESET") else None
        if mode is not None:
            msg.session_read_only = mode
        if mode:
            return          # a read-only declaration: replica-eligible
    msg.write("SET")


def _statement(kind, fields, msg, allowed):
    """One top-level statement: its own rule, then the walk of its tree."""
    if kind == "SelectStmt":
        _scan(fields, msg, allowed)
    elif kind == "VariableShowStmt":
        pass
    elif kind in ("ExplainStmt", "DeclareCursorStmt"):
        _scan(fields, msg, allowed)     # the query inside: a write is seen there
    elif kind == "CopyStmt":
        if fields.get("is_from") or "filename" in fields or fields.get("is_program"):
            msg.write("COPY FROM or to a file")
        _scan(fields, msg, allowed)
    elif kind == "TransactionStmt":
        _transaction(fields, msg)
    elif kind == "VariableSetStmt":
        _variable_set(fields, msg)
    else:
        if kind == "DiscardStmt" and fields.get("target") == "DISCARD_ALL":
            msg.session_read_only = False
        msg.write(kind)
        _scan(fields, msg, allowed)     # for the tables it names


def infer(stmts, text, allowed=frozenset(), key=None):
    """``stmts``: ``pgquery.parse(text)``; ``allowed``: extra read-only
    functions (``functions.user_list``); ``key``: a ``shardkey.ShardingKey``
    or None. -> Inference."""
    if not stmts:
        return primary("empty query")
    msg = _Message()
    kinds = []
    found = shardkey.Found() if key is not None else None
    for raw in stmts:
        ((kind, fields),) = raw["stmt"].items()
        kinds.append(kind)
        _statement(kind, fields, msg, allowed)
        if found is not None:
            shardkey.extract(kind, fields, text, key, found)
    msg.settle()
    msg.tables.sort()
    tables = tuple(dict.fromkeys(t for _, t in msg.tables if t not in msg.ctes))
    keys = params = ()
    error = None
    if found is not None:
        keys, params, error = tuple(found.values), tuple(found.params), found.error
    return Inference(
        REPLICA if msg.reason is None else PRIMARY, msg.reason, msg.begins, msg.ends,
        msg.read_only, msg.session_read_only, tables, keys, params, error,
        tuple(kinds), msg.generic and not (keys or params or error))
