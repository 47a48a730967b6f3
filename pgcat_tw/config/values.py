"""Value checkers for pgcat.toml keys.

Each checker takes the raw TOML value and returns the stored value, or
raises :class:`_Invalid` with the problem text; the parser turns that into a
:class:`~pgcat_tw.config.model.ConfigError` naming the key path.  ``_show``
renders a TOML value for those messages.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable


class _Invalid(Exception):
    pass


def _show(value: Any) -> str:
    """Render a TOML value for an error message: "ten", -3, true, [1, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    return str(value)


def _quote_all(values) -> str:
    return ", ".join(json.dumps(v) for v in values)


def _integer(lo: int, hi: int | None, desc: str) -> Callable[[Any], int]:
    def check(value):
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            raise _Invalid(f"must be {desc}, got {_show(value)}")
        return value

    return check


NON_NEGATIVE = _integer(0, None, "a non-negative integer")
POSITIVE = _integer(1, None, "a positive integer")
PORT = _integer(1, 65535, "a port number (1-65535)")


def AUTORELOAD(value):
    """``autoreload``: PgCat's polling interval in ms; PgCat releases before
    it took a boolean (``true``: every 15 s, ``false``: off), and their
    sample files still say ``autoreload = false``."""
    if value is True:
        return 15000
    if value is False:
        return None
    if type(value) is not int or value < 1:
        raise _Invalid("must be a positive integer (milliseconds) or a boolean,"
                       f" got {_show(value)}")
    return value


def BOOL(value):
    if not isinstance(value, bool):
        raise _Invalid(f"must be a boolean (true or false), got {_show(value)}")
    return value


def STRING(value):
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def NON_EMPTY_STRING(value):
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be a non-empty string, got {_show(value)}")
    return value


def _choice(*allowed: str, aliases: dict[str, str] | None = None):
    aliases = aliases or {}

    def check(value):
        if isinstance(value, str):
            if value in allowed:
                return value
            if value in aliases:
                return aliases[value]
        raise _Invalid(f"must be one of {_quote_all(allowed)}, got {_show(value)}")

    return check


def REGEX(value):
    STRING(value)
    try:
        re.compile(value)
    except re.error as e:
        raise _Invalid(f"is not a valid regular expression ({e}), got {_show(value)}")
    return value


def SHARDING_KEY(value):
    """``table.column``; double quotes are dropped like PgCat does."""
    STRING(value)
    key = value.replace('"', "")
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise _Invalid(
            f'must be "table.column" with exactly one ".", got {_show(value)}'
        )
    return key


_DEFAULT_SHARD_RE = re.compile(r"shard_[0-9]+\Z")


def DEFAULT_SHARD(value):
    # The shard number's range is checked once the shards are known.
    if isinstance(value, str) and (
        value in ("random", "random_healthy") or _DEFAULT_SHARD_RE.match(value)
    ):
        return value
    raise _Invalid(
        f'must be "shard_<n>", "random" or "random_healthy", got {_show(value)}'
    )


def STRING_LIST(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"must be an array of strings, got {_show(value)}")
    return tuple(value)


def _string_rows(width: int | None, desc: str):
    def check(value):
        ok = isinstance(value, list) and all(
            isinstance(row, list)
            and (width is None or len(row) == width)
            and all(isinstance(cell, str) for cell in row)
            for row in value
        )
        if not ok:
            raise _Invalid(f"must be {desc}, got {_show(value)}")
        return tuple(tuple(row) for row in value)

    return check


POOL_MODE = _choice(
    "transaction", "session", aliases={"Transaction": "transaction", "Session": "session"}
)
AUTH_TYPE = _choice(
    "md5",
    "scram-sha-256",
    "trust",
    aliases={"MD5": "md5", "Trust": "trust", "SCRAM-SHA-256": "scram-sha-256"},
)
ROLE = _choice("primary", "replica")
