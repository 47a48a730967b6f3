"""The keys this release accepts and validates but does not act on.

PgCat's files use them, so they load; the parser warns for each one the file
sets to a value that asks for something pgcat_tw does not do::

    {file}: {keypath}: accepted but not acted on in this release ({what})

A value is *inert* when it asks for nothing beyond what pgcat_tw does anyway
(the feature switched off, or PgCat's behaviour already matched): then there
is no warning, so ``query_parser_enabled = false`` is silent and ``= true``
warns. A key the file leaves out is never warned about.

Each table maps a key of one TOML table to ``(inert, what)``:
``inert(value, obj)`` gets the checked value and the section's dataclass
(``General``, ``Pool`` or ``User``). When a feature lands, its keys leave
these tables (README.rst, "Settings in effect now", lists what is acted on).

Pure Python, like the rest of the package.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["GENERAL", "POOL", "USER", "MESSAGE", "section_warnings"]

MESSAGE = "accepted but not acted on in this release ({what})"

_Table = dict[str, tuple[Callable[[Any, Any], bool], str]]


def _never(value, obj) -> bool:
    return False


def _false(value, obj) -> bool:
    return value is False


def _activity_off(value, obj) -> bool:
    return not obj.db_activity_based_routing


_ACTIVITY = "reads are not routed by recent writes"

GENERAL: _Table = {
    "worker_threads": (_never, "pgcat_tw runs one event loop per process"),
    "validate_config": (_false, "a server that cannot be reached does not stop the start"),
    "dns_cache_enabled": (_false, "host names are resolved at every connect"),
    "dns_max_ttl": (lambda v, g: not g.dns_cache_enabled,
                    "host names are resolved at every connect"),
}

# The router (query parser, read/write splitting, sharding, comment hints)
# acts on its keys: none of them is here.
POOL: _Table = {
    "log_client_parameter_status_changes": (_false, "ParameterStatus changes are not logged"),
    "db_activity_based_routing": (_false, _ACTIVITY),
    "db_activity_init_delay": (_activity_off, _ACTIVITY),
    "db_activity_ttl": (_activity_off, _ACTIVITY),
    "table_mutation_cache_ms_ttl": (_activity_off, _ACTIVITY),
}

# Every key of [pools.<name>.users.<key>] is acted on.
USER: _Table = {}


def section_warnings(table: _Table, values: dict, obj) -> list[tuple[str, str]]:
    """(key, problem) for each key of ``values`` (the keys the file sets,
    checked) that ``table`` lists and whose value is not inert."""
    out = []
    for key, value in values.items():
        entry = table.get(key)
        if entry is not None and not entry[0](getattr(obj, key), obj):
            out.append((key, MESSAGE.format(what=entry[1])))
    return out
