"""Parse and validate PgCat's ``pgcat.toml``.

Pure Python (no Twisted): the file is read with ``tomli`` into frozen,
hashable dataclasses.  Every key PgCat knows is accepted with PgCat's *code*
default (``src/config.rs``), plus a few pgcat_tw extensions.  Unknown keys are
not errors (PgCat silently ignores them); they are reported as warnings, as
are the keys this release accepts but does not act on.  The
first problem found raises :class:`ConfigError`, formatted as
``"{file}: {keypath}: {problem}"``.

The package, from the bottom up:

``model``
    The frozen configuration classes (``ConfigError``, ``FrozenMap``,
    ``ServerAddress``, ``Shard``, ``User``, ``Pool``, ``General``,
    ``Config``, ``UserSettings``, ``ConfigDiff``), whose field defaults are
    the config defaults, and what follows from a config: ``resolve`` and
    ``diff``.
``values``
    The value checkers (``POSITIVE``, ``PORT``, ``BOOL``, ``STRING``,
    ``REGEX``, ``SHARDING_KEY``, ``DEFAULT_SHARD``, ...): raw TOML value in,
    stored value or problem text out.
``specs``
    The key tables (``GENERAL_SPEC``, ``POOL_SPEC``, ``USER_SPEC``,
    ``SHARD_SPEC``, ``PLUGIN_SPECS``, ...): which keys each TOML table has and
    their checkers, checked against the dataclass fields at import.
``inactive``
    The keys this release accepts but does not act on, and when their value
    asks for nothing pgcat_tw does not do anyway (no warning then).
``parser``
    ``_Parser`` walks the TOML tables against the specs, collects warnings
    (unknown keys, keys not acted on) and checks what spans keys;
    ``from_dict``, ``parse`` and ``load`` are its entry points.

Public API (all re-exported here)::

    parse(text, path="<string>") -> (Config, warnings)
    load(path) -> (Config, warnings)
    from_dict(data, path="<string>") -> (Config, warnings)   # already-decoded TOML
    resolve(config, pool, user) -> UserSettings
    diff(old, new) -> ConfigDiff
"""

from pgcat_tw.config.model import (
    Config,
    ConfigDiff,
    ConfigError,
    FrozenMap,
    General,
    Pool,
    ServerAddress,
    Shard,
    User,
    UserSettings,
    diff,
    resolve,
)
from pgcat_tw.config.parser import from_dict, load, parse

__all__ = [
    "ConfigError",
    "FrozenMap",
    "ServerAddress",
    "Shard",
    "User",
    "Pool",
    "General",
    "Config",
    "UserSettings",
    "ConfigDiff",
    "parse",
    "load",
    "from_dict",
    "resolve",
    "diff",
]

# The other module-level names of the former single-module pgcat_tw.config
# stay reachable as pgcat_tw.config.NAME (tests read the specs this way).
from pgcat_tw.config.parser import STRING_PATH  # noqa: E402,F401
from pgcat_tw.config.specs import (  # noqa: E402,F401
    GENERAL_SPEC,
    INTERCEPT_QUERY_SPEC,
    PLUGIN_SPECS,
    POOL_SPEC,
    SHARD_SPEC,
    TOP_LEVEL_KEYS,
    USER_SPEC,
)
from pgcat_tw.config.values import (  # noqa: E402,F401
    AUTH_TYPE,
    BOOL,
    DEFAULT_SHARD,
    NON_EMPTY_STRING,
    NON_NEGATIVE,
    POOL_MODE,
    PORT,
    POSITIVE,
    REGEX,
    ROLE,
    SHARDING_KEY,
    STRING,
    STRING_LIST,
)
