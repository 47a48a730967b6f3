"""PgCat's custom SQL commands (reference §4.1), recognised in a simple Query
sent between transactions and answered by the pooler itself.

``match(buf, start, end)`` -> (command, argument) or None. It is called for
every Query that starts a transaction, so the common case (not a custom
command) costs one anchored regex probe that allocates nothing.
"""

import re

# A cheap anchored pre-check: only SET/SHOW statements can be custom commands.
_PREFIX = re.compile(rb"\s*(?:set|show)\s", re.IGNORECASE)

_COMMANDS = [
    ("set_server_role", re.compile(
        rb"\s*set\s+server\s+role\s+to\s+'(primary|replica|any|auto|default)'\s*;?\s*\Z",
        re.IGNORECASE)),
    ("show_server_role", re.compile(rb"\s*show\s+server\s+role\s*;?\s*\Z", re.IGNORECASE)),
    ("set_primary_reads", re.compile(
        rb"\s*set\s+primary\s+reads\s+to\s+'?(on|off|default)'?\s*;?\s*\Z", re.IGNORECASE)),
    ("show_primary_reads", re.compile(rb"\s*show\s+primary\s+reads\s*;?\s*\Z",
                                      re.IGNORECASE)),
]


def match(buf, start, end):
    """``buf[start:end]`` is a Query body (SQL text + NUL)."""
    if not _PREFIX.match(buf, start, end):
        return None
    text = bytes(buf[start:end - 1]) if end > start and buf[end - 1] == 0 else bytes(
        buf[start:end])
    found = None
    for name, rx in _COMMANDS:
        mo = rx.match(text)
        if mo:
            if found is not None:
                return None  # PgCat: exactly one must match
            found = (name, mo.group(1).decode().lower() if mo.groups() else None)
    return found
