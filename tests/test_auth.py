"""Tests for pgcat_tw.auth.md5."""

import hashlib
import hmac

from twisted.trial.unittest import SynchronousTestCase

from pgcat_tw.auth import md5


def reference_response(user, password, salt):
    """The formula from the PostgreSQL protocol docs, written out independently."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return "md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest()


def stored_secret(user, password):
    """What pg_authid.rolpassword holds for an md5 password."""
    return "md5" + hashlib.md5((password + user).encode("utf-8")).hexdigest()


CASES = [
    ("bob", "secret", b"\x01\x02\x03\x04"),
    ("postgres", "", b"\x00\x00\x00\x00"),
    ("ünï", "pässwörd", b"\xff\xfe\x80\x7f"),
    ("a", "b" * 200, b"salt"),
]


class ClientResponseTests(SynchronousTestCase):
    def test_matches_formula(self):
        for user, password, salt in CASES:
            resp = md5.client_response(user, password, salt)
            self.assertIsInstance(resp, bytes)
            self.assertTrue(resp.endswith(b"\x00"))
            self.assertEqual(resp[:-1].decode("ascii"),
                             reference_response(user, password, salt))
            self.assertEqual(len(resp), 36)

    def test_known_vector(self):
        # md5("secretbob") = inner; md5(inner + b"\x01\x02\x03\x04")
        inner = hashlib.md5(b"secretbob").hexdigest()
        outer = hashlib.md5(inner.encode() + b"\x01\x02\x03\x04").hexdigest()
        self.assertEqual(md5.client_response("bob", "secret", b"\x01\x02\x03\x04"),
                         b"md5" + outer.encode() + b"\x00")

    def test_order_of_password_and_user(self):
        # password + user, not user + password
        wrong = "md5" + hashlib.md5(
            hashlib.md5(b"bobsecret").hexdigest().encode() + b"salt").hexdigest()
        self.assertNotEqual(md5.client_response("bob", "secret", b"salt")[:-1].decode(), wrong)

    def test_stored_secret_gives_same_response(self):
        for user, password, salt in CASES:
            secret = stored_secret(user, password)
            self.assertTrue(md5.is_md5_secret(secret))
            self.assertEqual(md5.client_response(user, secret, salt),
                             md5.client_response(user, password, salt))

    def test_salt_matters(self):
        self.assertNotEqual(md5.client_response("bob", "secret", b"aaaa"),
                            md5.client_response("bob", "secret", b"aaab"))

    def test_inner_hash(self):
        self.assertEqual(md5.inner_hash("bob", "secret"),
                         hashlib.md5(b"secretbob").hexdigest())
        secret = stored_secret("bob", "secret")
        self.assertEqual(md5.inner_hash("someone-else", secret), secret[3:])


class VerifyTests(SynchronousTestCase):
    def test_accepts_plaintext(self):
        for user, password, salt in CASES:
            resp = reference_response(user, password, salt).encode() + b"\x00"
            self.assertTrue(md5.verify(user, password, salt, resp))
            self.assertTrue(md5.verify(user, password, salt, bytearray(resp)))
            self.assertTrue(md5.verify(user, password, salt, memoryview(resp)))

    def test_accepts_stored_secret(self):
        for user, password, salt in CASES:
            resp = reference_response(user, password, salt).encode() + b"\x00"
            self.assertTrue(md5.verify(user, stored_secret(user, password), salt, resp))

    def test_rejects_wrong(self):
        user, password, salt = "bob", "secret", b"\x01\x02\x03\x04"
        good = reference_response(user, password, salt).encode() + b"\x00"
        secret = stored_secret(user, password)
        for configured in (password, secret):
            self.assertFalse(md5.verify(user, configured, salt,
                                        reference_response(user, "Secret", salt).encode()
                                        + b"\x00"))
            self.assertFalse(md5.verify(user, configured, b"\x01\x02\x03\x05", good))
            if configured is password:
                # (a stored secret already has the user name baked in)
                self.assertFalse(md5.verify("alice", configured, salt, good))
            self.assertFalse(md5.verify(user, configured, salt, good[:-1]))  # no NUL
            self.assertFalse(md5.verify(user, configured, salt, good + b"\x00"))
            self.assertFalse(md5.verify(user, configured, salt, b""))
            self.assertFalse(md5.verify(user, configured, salt, good.upper()))
            # the stored secret itself (or plaintext) is not a valid response
            self.assertFalse(md5.verify(user, configured, salt, secret.encode() + b"\x00"))
            self.assertFalse(md5.verify(user, configured, salt, password.encode() + b"\x00"))
        # a different stored secret
        self.assertFalse(md5.verify(user, stored_secret(user, "other"), salt, good))

    def test_constant_time_compare_used(self):
        calls = []
        real = hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(md5.hmac, "compare_digest", spy)
        self.assertTrue(md5.verify("bob", "secret", b"salt",
                                   md5.client_response("bob", "secret", b"salt")))
        self.assertEqual(len(calls), 1)


class IsMd5SecretTests(SynchronousTestCase):
    HEX = "0123456789abcdef0123456789abcdef"

    def test_valid(self):
        self.assertTrue(md5.is_md5_secret("md5" + self.HEX))
        self.assertTrue(md5.is_md5_secret(stored_secret("u", "p")))

    def test_invalid(self):
        for value in (None, "", "md5", "md5" + self.HEX[:-1], "md5" + self.HEX + "0",
                      "MD5" + self.HEX, "md4" + self.HEX, " md5" + self.HEX[:-1],
                      "md5" + self.HEX[:-1] + "g", "md5" + "z" * 32, self.HEX + "abc",
                      "SCRAM-SHA-256$4096:abc=$def=:ghi=", "password"):
            self.assertFalse(md5.is_md5_secret(value), repr(value))

    def test_only_lowercase_hex_digits(self):
        # PostgreSQL (get_password_type) treats a value as an md5 secret only
        # if the 32 characters after "md5" are all in "0123456789abcdef";
        # anything else is a plaintext password that happens to start with md5.
        for value in ("md5" + self.HEX.upper(),
                      "md5 " + self.HEX[:-1],
                      "md5" + self.HEX[:-1] + " ",
                      "md5-" + self.HEX[:-1],
                      "md5+" + self.HEX[:-1],
                      "md50x" + self.HEX[:-2],
                      "md5" + self.HEX[:10] + "_" + self.HEX[11:]):
            self.assertEqual(len(value), 35)
            self.assertFalse(md5.is_md5_secret(value), repr(value))


    def test_plaintext_lookalike_still_authenticates(self):
        # A plaintext password of 35 characters starting with "md5" that
        # PostgreSQL would not take for a hash must work as a password.
        salt = b"\x10\x20\x30\x40"
        for password in ("md5-my-long-passphrase-0123456789ab",  # not hex at all
                         "md5" + hashlib.md5(b"x").hexdigest().upper(),
                         "md5 " + self.HEX[:-1]):
            self.assertEqual(len(password), 35)
            resp = reference_response("carol", password, salt).encode() + b"\x00"
            self.assertTrue(md5.verify("carol", password, salt, resp), repr(password))

