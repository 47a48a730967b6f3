"""Comment hints (L0, reference §4.2): ``shard_id_regex`` and
``sharding_key_regex`` searched in the first ``regex_search_limit`` bytes
of a Query's or Parse's SQL, e.g. ``/* shard_id: 2 */`` or
``/* sharding_key: 1234 */``.

``HintSettings(shard_id_regex, sharding_key_regex, regex_search_limit)``
compiles the pool's patterns once (as bytes patterns: ``\\d`` is ASCII);
``hinted_shard(text, settings, shard_count, sharding_function)`` -> the
shard, or None when neither pattern matches. The shard id pattern is tried
first; capture group 1 is the shard number, or the key given to the
sharding function. A shard id out of range, or a capture that is not an
integer, raises ``HintError`` (the caller answers with an ErrorResponse).
"""

import re

from pgcat_tw.errors import PgError

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
_INTEGER = re.compile(rb"\s*[+-]?[0-9]+\s*\Z")


class HintError(PgError):
    """A hint that names no usable shard (22023, invalid parameter value)."""

    sqlstate = "22023"


class HintSettings:
    """A pool's comment-hint settings, compiled; ``active`` is False when
    neither pattern is set (the caller then skips the search)."""

    __slots__ = ("shard_id", "sharding_key", "limit", "active")

    def __init__(self, shard_id_regex=None, sharding_key_regex=None, regex_search_limit=1000):
        self.shard_id = _compile(shard_id_regex, "shard_id_regex")
        self.sharding_key = _compile(sharding_key_regex, "sharding_key_regex")
        self.limit = regex_search_limit
        self.active = self.shard_id is not None or self.sharding_key is not None


def _compile(pattern, name):
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
    except re.error as e:
        raise ValueError(f"{name}: not a valid regular expression: {e}") from None
    if rx.groups < 1:
        raise ValueError(f"{name}: needs a capture group (group 1 is the value)")
    return rx


def _integer(mo, what):
    value = mo.group(1)
    if value is None or not _INTEGER.match(value):
        raise HintError(f"{what} in the query's comment is not an integer: {value!r}")
    return int(value)


def hinted_shard(text, settings, shard_count, sharding_function):
    """``text``: the SQL (bytes); ``sharding_function(key, shards)`` (from
    ``pgcat_tw.sharding.FUNCTIONS``). -> shard number or None."""
    if settings.shard_id is not None:
        mo = settings.shard_id.search(text, 0, settings.limit)
        if mo is not None:
            shard = _integer(mo, "shard id")
            if not 0 <= shard < shard_count:
                raise HintError(
                    f"shard {shard} is not configured (there are {shard_count} shards)")
            return shard
    if settings.sharding_key is not None:
        mo = settings.sharding_key.search(text, 0, settings.limit)
        if mo is not None:
            key = _integer(mo, "sharding key")
            if not INT64_MIN <= key <= INT64_MAX:
                raise HintError(f"sharding key {key} is out of the bigint range")
            return sharding_function(key, shard_count)
    return None
