"""Sharding functions: a bigint key -> a shard number (L0, reference §4.3).

``pg_bigint_hash(key, shards)`` is the partition PostgreSQL's ``PARTITION BY
HASH (col)`` picks for one bigint column with ``MODULUS shards``: the key
folded to 32 bits as ``hashint8extended`` does, Jenkins' lookup3 hash of
that word seeded with ``HASH_PARTITION_SEED`` (``hash_bytes_uint32_extended``),
``hash_combine64`` with 0, then the unsigned remainder.
``sha1(key, shards)`` is PgCat's other choice: SHA-1 of the key's decimal
text, its last 32 bits, modulo ``shards``.

``FUNCTIONS`` maps the ``sharding_function`` setting's values to them.
"""

import hashlib

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
HASH_PARTITION_SEED = 0x7A5B22367996DCFD
_COMBINE = 0x49A0F4DD15E5A8E3
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def _rot(x, k):
    return ((x << k) | (x >> (32 - k))) & _M32


def _mix(a, b, c):
    a = (a - c) & _M32; a ^= _rot(c, 4); c = (c + b) & _M32
    b = (b - a) & _M32; b ^= _rot(a, 6); a = (a + c) & _M32
    c = (c - b) & _M32; c ^= _rot(b, 8); b = (b + a) & _M32
    a = (a - c) & _M32; a ^= _rot(c, 16); c = (c + b) & _M32
    b = (b - a) & _M32; b ^= _rot(a, 19); a = (a + c) & _M32
    c = (c - b) & _M32; c ^= _rot(b, 4); b = (b + a) & _M32
    return a, b, c


def _final(a, b, c):
    c ^= b; c = (c - _rot(b, 14)) & _M32
    a ^= c; a = (a - _rot(c, 11)) & _M32
    b ^= a; b = (b - _rot(a, 25)) & _M32
    c ^= b; c = (c - _rot(b, 16)) & _M32
    a ^= c; a = (a - _rot(c, 4)) & _M32
    b ^= a; b = (b - _rot(a, 14)) & _M32
    c ^= b; c = (c - _rot(b, 24)) & _M32
    return b, c


def _seeded_state():
    # hash_bytes_uint32_extended's initial state for a 4-byte key, with the
    # seed mixed in: the same for every key, so computed once.
    a = b = c = (0x9E3779B9 + 4 + 3923095) & _M32
    a = (a + (HASH_PARTITION_SEED >> 32)) & _M32
    b = (b + (HASH_PARTITION_SEED & _M32)) & _M32
    return _mix(a, b, c)


_A0, _B0, _C0 = _seeded_state()


def hash_int8_partition(key):
    """The 64-bit row hash PostgreSQL computes for one bigint partition key."""
    if not INT64_MIN <= key <= INT64_MAX:
        raise ValueError(f"sharding key {key} is out of the bigint range")
    word = key & _M64
    lo, hi = word & _M32, word >> 32
    lo ^= hi if key >= 0 else (~hi & _M32)
    b, c = _final((_A0 + lo) & _M32, _B0, _C0)
    return (((b << 32) | c) + _COMBINE) & _M64


def pg_bigint_hash(key, shards):
    """The shard (0..shards-1) of bigint ``key``: PostgreSQL's hash partition."""
    return hash_int8_partition(key) % shards


def sha1(key, shards):
    """PgCat's ``sha1``: last 8 hex digits of SHA-1(decimal key) mod shards."""
    digest = hashlib.sha1(str(key).encode()).digest()
    return int.from_bytes(digest[-4:], "big") % shards


FUNCTIONS = {"pg_bigint_hash": pg_bigint_hash, "sha1": sha1}
