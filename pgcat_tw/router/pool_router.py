"""One pool's routing settings, made ready (L0): what the work phase asks
at the start of each transaction (``frontend.routing``).

``PoolRouter.needed(pool_cfg)`` says whether a pool routes at all: with the
parser off, one shard and no comment hints, clients get no router (None)
and the work phase pays one ``is None`` test.
"""

from pgcat_tw import sharding
from pgcat_tw.router.classify import Classifier
from pgcat_tw.router.hints import HintSettings, hinted_shard
from pgcat_tw.router.shardkey import shard_for


class PoolRouter:
    __slots__ = ("shards", "function", "hints", "classifier", "splitting", "auto_key",
                 "default_shard", "replicated")

    def __init__(self, pool_cfg):
        self.shards = len(pool_cfg.shards)
        self.function = sharding.FUNCTIONS[pool_cfg.sharding_function]
        hints = HintSettings(pool_cfg.shard_id_regex, pool_cfg.sharding_key_regex,
                             pool_cfg.regex_search_limit)
        self.hints = hints if hints.active else None
        self.classifier = None
        if pool_cfg.query_parser_enabled:
            self.classifier = Classifier(
                max_length=pool_cfg.query_parser_max_length,
                read_only_functions=pool_cfg.query_parser_read_only_functions,
                sharding_key=pool_cfg.automatic_sharding_key)
        self.splitting = self.classifier is not None and \
            pool_cfg.query_parser_read_write_splitting
        self.auto_key = self.classifier is not None and \
            pool_cfg.automatic_sharding_key is not None
        # "shard_<n>" -> n; "random", "random_healthy" kept as words.
        # Shards with a replica in the configuration: a read the parser
        # found goes to the primary of a shard that has none.
        self.replicated = frozenset(
            shard.index for shard in pool_cfg.shards
            if any(s.role == "replica" for s in shard.servers))
        d = pool_cfg.default_shard
        self.default_shard = int(d[len("shard_"):]) if d.startswith("shard_") else d

    @staticmethod
    def needed(pool_cfg):
        return bool(pool_cfg.query_parser_enabled or len(pool_cfg.shards) > 1
                    or pool_cfg.shard_id_regex or pool_cfg.sharding_key_regex)

    def classify(self, text):
        return self.classifier.classify(text)

    def hinted(self, text):
        """The shard a comment hint names, or None (HintError if unusable)."""
        if self.hints is None:
            return None
        return hinted_shard(text, self.hints, self.shards, self.function)

    def keyed(self, inference, bind=None):
        """The shard the statement's sharding keys lead to, or None
        (ShardingError when they lead to several)."""
        return shard_for(inference, self.shards, self.function, bind)

    def shard_of_key(self, key):
        return self.function(key, self.shards)
