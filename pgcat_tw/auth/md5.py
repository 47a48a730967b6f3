"""MD5 password authentication, both roles (sans-IO)."""

import hashlib
import hmac


def _md5_hex(data):
    return hashlib.md5(data).hexdigest()


def is_md5_secret(password):
    """A stored md5 secret: 'md5' followed by 32 hex digits."""
    if not password or len(password) != 35 or not password.startswith("md5"):
        return False
    # PostgreSQL's rule: exactly 32 lowercase hex digits.
    return all(c in "0123456789abcdef" for c in password[3:])


def inner_hash(user, password):
    """md5(password + user) as hex, or the stored secret's hex part."""
    if is_md5_secret(password):
        return password[3:]
    return _md5_hex(password.encode("utf-8") + user.encode("utf-8"))


def client_response(user, password, salt):
    """What a client sends in PasswordMessage for AuthenticationMD5Password."""
    inner = inner_hash(user, password)
    return ("md5" + _md5_hex(inner.encode("ascii") + salt)).encode("ascii") + b"\x00"


def verify(user, password, salt, response):
    """Check a client's PasswordMessage body against the configured password
    (plaintext or md5 secret), in constant time."""
    expected = client_response(user, password, salt)
    return hmac.compare_digest(expected, bytes(response))
