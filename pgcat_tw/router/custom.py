"""PgCat's custom SQL commands (reference §4.1), recognised in a Query (or
an unnamed Parse) sent between transactions and answered by the pooler
itself: ``SET SHARDING KEY TO``, ``SET SHARD TO``, ``SHOW SHARD``, ``SET/SHOW
SERVER ROLE``, ``SET/SHOW PRIMARY READS``. ``leading`` finds them at the
start of a multi-statement string.

``match(buf, start, end)`` -> (command, argument) or None. It is called for
every Query that starts a transaction, so the common case (not a custom
command) costs one anchored regex probe that allocates nothing.
"""

import re

# A cheap anchored pre-check: only SET/SHOW statements can be custom commands.
_PREFIX = re.compile(rb"\s*(?:set|show)\s", re.IGNORECASE)

_COMMANDS = [
    ("set_sharding_key", re.compile(
        rb"\s*set\s+sharding\s+key\s+to\s+'?(-?[0-9]+)'?\s*;?\s*\Z", re.IGNORECASE)),
    ("set_shard", re.compile(
        rb"\s*set\s+shard\s+to\s+'?([0-9]+|any)'?\s*;?\s*\Z", re.IGNORECASE)),
    ("show_shard", re.compile(rb"\s*show\s+shard\s*;?\s*\Z", re.IGNORECASE)),
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
    return match_text(text)


def leading(text):
    """The custom commands a multi-statement string starts with, and the
    rest: ([(command, argument)], rest bytes). Splitting at the first
    semicolon is safe for them (their values hold none); the rest is left
    as it is."""
    found = []
    while True:
        cut = text.find(b";")
        if cut < 0:
            cmd = match_text(text) if text.strip() else None
            if cmd is not None:
                found.append(cmd)
                text = b""
            return found, text
        cmd = match_text(text[:cut + 1])
        if cmd is None:
            return found, text
        found.append(cmd)
        text = text[cut + 1:]


def match_text(text):
    """``text``: one statement's SQL (bytes) -> (command, argument) or None."""
    if not _PREFIX.match(text):
        return None
    found = None
    for name, rx in _COMMANDS:
        mo = rx.match(text)
        if mo:
            if found is not None:
                return None  # PgCat: exactly one must match
            found = (name, mo.group(1).decode().lower() if mo.groups() else None)
    return found
