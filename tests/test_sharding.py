"""Sharding functions (pgcat_tw.sharding): PgCat's test vectors, and
``pg_bigint_hash`` against the real server: for thousands of keys, negative
ones and the bigint extremes among them, the shard chosen is the partition
PostgreSQL picks (``satisfies_hash_partition`` on a table partitioned by
hash of one bigint) and the 64-bit hash is the server's own.
"""

import random

from twisted.internet import threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pgcat_tw.sharding import (
    FUNCTIONS, HASH_PARTITION_SEED, INT64_MAX, INT64_MIN, hash_int8_partition,
    pg_bigint_hash, sha1)

# reference §4.3: 5 shards
PG_BIGINT_HASH_VECTOR = {
    0: (1, 4, 5, 14, 19, 39, 40, 46, 47, 53),
    1: (2, 3, 11, 17, 21, 23, 30, 49, 51, 54),
    2: (6, 7, 15, 16, 18, 20, 25, 28, 34, 35),
    3: (8, 12, 13, 22, 29, 31, 33, 36, 41, 43),
    4: (9, 10, 24, 26, 27, 32, 37, 38, 42, 45),
}
# reference §4.3: 12 shards, keys 0..19
SHA1_VECTOR = (4, 7, 8, 3, 6, 0, 0, 10, 3, 11, 1, 7, 4, 4, 11, 2, 5, 0, 8, 3)


def sample_keys(n=3000, seed=15):
    """Edges (0, +-1, the int32 and int64 limits, powers of two) and random
    keys of every magnitude, half of them negative."""
    rng = random.Random(seed)
    keys = {0, 1, -1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1,
            2 ** 31 - 1, -2 ** 31, 2 ** 31, 2 ** 32 - 1, 2 ** 32, -2 ** 32}
    for bits in range(0, 63):
        keys.update((1 << bits, -(1 << bits), (1 << bits) - 1))
    while len(keys) < n:
        bits = rng.randrange(1, 64)
        keys.add(rng.randrange(-(1 << (bits - 1)), 1 << (bits - 1)))
    return sorted(keys)


class VectorTests(SynchronousTestCase):

    def test_pg_bigint_hash_vector(self):
        for shard, keys in PG_BIGINT_HASH_VECTOR.items():
            for key in keys:
                self.assertEqual(pg_bigint_hash(key, 5), shard, key)

    def test_sha1_vector(self):
        self.assertEqual(tuple(sha1(k, 12) for k in range(20)), SHA1_VECTOR)

    def test_sha1_negative_key(self):
        """Negative keys hash their text with the minus sign."""
        import hashlib
        digest = hashlib.sha1(b"-42").hexdigest()
        self.assertEqual(sha1(-42, 7), int(digest[-8:], 16) % 7)

    def test_functions_table(self):
        self.assertEqual(set(FUNCTIONS), {"pg_bigint_hash", "sha1"})
        self.assertIs(FUNCTIONS["pg_bigint_hash"], pg_bigint_hash)

    def test_one_shard(self):
        for key in (0, -1, INT64_MAX, INT64_MIN):
            self.assertEqual(pg_bigint_hash(key, 1), 0)
            self.assertEqual(sha1(key, 1), 0)

    def test_out_of_range(self):
        self.assertRaises(ValueError, pg_bigint_hash, INT64_MAX + 1, 3)
        self.assertRaises(ValueError, pg_bigint_hash, INT64_MIN - 1, 3)

    def test_range_of_results(self):
        for key in sample_keys(500):
            self.assertIn(pg_bigint_hash(key, 7), range(7))
            self.assertIn(sha1(key, 7), range(7))


MODULI = (2, 3, 5, 7, 16)


class PostgresAgreementTests(TestCase):
    """The run's real PostgreSQL decides."""

    timeout = 300

    def _server(self, sql):
        from tests.pgharness import topology
        return threads.deferToThread(topology().primary.psql, sql, db="pgcat_test")

    def _keys_array(self, keys):
        return "ARRAY[" + ",".join(str(k) for k in keys) + "]::bigint[]"

    def test_partition_chosen_by_postgres(self):
        """For each modulus, the one remainder whose partition accepts the
        key (satisfies_hash_partition) is pg_bigint_hash's shard."""
        keys = sample_keys()
        moduli = ",".join(str(m) for m in MODULI)
        create = ("CREATE TABLE IF NOT EXISTS router_hash_probe (id bigint)"
                  " PARTITION BY HASH (id)")
        sql = (
            f"SELECT string_agg(k || ':' || m || ':' || r, ' ' ORDER BY k, m)"
            f" FROM unnest({self._keys_array(keys)}) k,"
            f" unnest(ARRAY[{moduli}]) m, generate_series(0, 15) r"
            " WHERE r < m AND satisfies_hash_partition("
            "'router_hash_probe'::regclass, m, r, k)")

        def check(out):
            seen = {}
            for item in out.split():
                k, m, r = map(int, item.split(":"))
                self.assertNotIn((k, m), seen)
                seen[k, m] = r
            self.assertEqual(len(seen), len(keys) * len(MODULI))
            wrong = [(k, m, r, pg_bigint_hash(k, m)) for (k, m), r in seen.items()
                     if pg_bigint_hash(k, m) != r]
            self.assertEqual(wrong, [])

        d = self._server(create)
        d.addCallback(lambda _: self._server(sql))
        return d.addCallback(check)

    def test_hash_is_the_servers(self):
        """hash_int8_partition is hash_combine64(0, hashint8extended(key,
        HASH_PARTITION_SEED)): compared with the server's hashint8extended."""
        keys = sample_keys(2000, seed=16)
        seed = HASH_PARTITION_SEED - (1 << 64) if HASH_PARTITION_SEED >= 1 << 63 \
            else HASH_PARTITION_SEED
        sql = (f"SELECT string_agg(k || ':' || hashint8extended(k, {seed}), ' ' ORDER BY k)"
               f" FROM unnest({self._keys_array(keys)}) k")

        def check(out):
            wrong = []
            for item in out.split():
                k, h = map(int, item.split(":"))
                mine = (hash_int8_partition(k) - 0x49A0F4DD15E5A8E3) % (1 << 64)
                if mine != h % (1 << 64):
                    wrong.append(k)
            self.assertEqual(len(out.split()), len(keys))
            self.assertEqual(wrong, [])

        return self._server(sql).addCallback(check)
