"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both roles.

Sans-IO: the exchanges take and return message payloads (bytes); scramp's
primitives do the maths (PBKDF2, HMAC, H, XOR, base64).

PostgreSQL's dialect of SCRAM:

- the user name in the client-first message is ignored (libpq sends
  ``n=``): the StartupMessage's user is authoritative. scramp's server
  refuses an empty user name, so the server role is written here;
- passwords go through SASLprep, and are used as they are when SASLprep
  fails (``pg_saslprep``);
- channel binding is ``tls-server-end-point`` only (mechanism
  ``SCRAM-SHA-256-PLUS``): the hash of the server's certificate, with the
  certificate's signature hash (SHA-256 for MD5/SHA-1);
- a stored secret (``pg_authid.rolpassword``) reads
  ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``.

Passthrough: a SCRAM secret does not contain what a client needs to log
in; the ClientKey does, and the server side of an exchange recovers it from
the client's proof (ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage),
checked by H(ClientKey) == StoredKey). ``remember_client_key`` keeps it in
memory, addressed by the StoredKey it hashes to, so that the pooler can log
in to PostgreSQL with a stored secret (PgBouncer's "SCRAM passthrough").
"""

import base64
import hashlib
import hmac
import os
import re
from collections import OrderedDict

from scramp import ScramException
from scramp.utils import h, hi, xor

try:
    from scramp.utils import saslprep
except ImportError:  # scramp < 1.5 (the newest on Python 3.9, e.g. PyPy 3.9)
    from scramp.core import saslprep
from scramp.utils import hmac as _hmac

from pgcat_tw.auth.md5 import is_md5_secret

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING = "tls-server-end-point"
DEFAULT_ITERATIONS = 4096           # PostgreSQL's scram_iterations default
SALT_LENGTH = 16                    # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
MAX_ITERATIONS = 10_000_000         # refuse absurd counts from a server
_NONCE_BYTES = 18                   # PostgreSQL's SCRAM_RAW_NONCE_LEN
_KEY_LENGTH = 32
_HF = hashlib.sha256

_SECRET_RE = re.compile(
    r"SCRAM-SHA-256\$(?P<iterations>[1-9][0-9]{0,8}):(?P<salt>[A-Za-z0-9+/=]+)"
    r"\$(?P<stored>[A-Za-z0-9+/=]+):(?P<server>[A-Za-z0-9+/=]+)\Z"
)
_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+\Z")   # printable ASCII except ','


class ScramProtocolError(Exception):
    """The peer sent a malformed or out-of-place SCRAM message."""


class ScramAuthFailed(Exception):
    """Wrong proof, mismatched channel binding, or an unusable secret."""


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(text, what):
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ScramProtocolError(f"malformed SCRAM message: invalid base64 in {what}") from None


# --- secrets ----------------------------------------------------------------------


class Secret:
    """A SCRAM-SHA-256 secret (what PostgreSQL stores for a user)."""

    __slots__ = ("iterations", "salt", "stored_key", "server_key")

    def __init__(self, iterations, salt, stored_key, server_key):
        self.iterations = iterations
        self.salt = salt
        self.stored_key = stored_key
        self.server_key = server_key

    def __str__(self):
        return (f"SCRAM-SHA-256${self.iterations}:{_b64(self.salt)}"
                f"${_b64(self.stored_key)}:{_b64(self.server_key)}")

    def __repr__(self):
        # Never show keys in logs or tracebacks.
        return f"<scram.Secret iterations={self.iterations}>"

    def __eq__(self, other):
        return isinstance(other, Secret) and str(self) == str(other)

    def __hash__(self):
        return hash(self.stored_key)


def is_scram_secret(value):
    """True for anything that claims to be a stored SCRAM-SHA-256 secret."""
    return isinstance(value, str) and value.startswith("SCRAM-SHA-256$")


def parse_secret(value):
    """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` -> Secret;
    ValueError (without the value in the message) if malformed."""
    m = _SECRET_RE.match(value or "")
    if m is None:
        raise ValueError("not a valid SCRAM-SHA-256 secret (expected "
                         "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)")
    try:
        salt = base64.b64decode(m["salt"], validate=True)
        stored = base64.b64decode(m["stored"], validate=True)
        server = base64.b64decode(m["server"], validate=True)
    except ValueError:
        raise ValueError("not a valid SCRAM-SHA-256 secret (bad base64)") from None
    if len(stored) != _KEY_LENGTH or len(server) != _KEY_LENGTH or not salt:
        raise ValueError("not a valid SCRAM-SHA-256 secret (wrong key length)")
    return Secret(int(m["iterations"]), salt, stored, server)


def prepare_password(password):
    """SASLprep, or the raw UTF-8 bytes where SASLprep fails (as PostgreSQL)."""
    try:
        prepared = saslprep(password)
    except ScramException:
        prepared = password
    return prepared.encode("utf-8")


def derive_keys(password, salt, iterations):
    """-> (ClientKey, StoredKey, ServerKey) for a plaintext password."""
    salted = hi(_HF, prepare_password(password), salt, iterations)
    client_key = _hmac(_HF, salted, b"Client Key")
    return client_key, h(_HF, client_key), _hmac(_HF, salted, b"Server Key")


def make_secret(password, salt=None, iterations=DEFAULT_ITERATIONS):
    """A new Secret for ``password`` (random salt unless given)."""
    if salt is None:
        salt = os.urandom(SALT_LENGTH)
    _, stored, server = derive_keys(password, salt, iterations)
    return Secret(iterations, salt, stored, server)


_derived = {}


def secret_for(password):
    """The Secret to check clients against: parsed from a stored SCRAM secret,
    or derived once per process from a plaintext password (a random salt
    that then stays the same, as a real server's would).
    ValueError for an md5 secret or a malformed SCRAM secret."""
    if is_scram_secret(password):
        return parse_secret(password)
    if is_md5_secret(password):
        raise ValueError("an md5 secret cannot be used for SCRAM authentication")
    secret = _derived.get(password)
    if secret is None:
        if len(_derived) > 10000:
            _derived.clear()
        secret = _derived[password] = make_secret(password)
    return secret


_MOCK_KEY = os.urandom(32)


def mock_secret(username):
    """A secret for a user that does not exist: stable per user name within
    this process (a real user's salt does not change between attempts either)
    and matching no password."""
    salt = hmac.new(_MOCK_KEY, b"salt\x00" + username.encode("utf-8"), _HF).digest()[:SALT_LENGTH]
    return Secret(DEFAULT_ITERATIONS, salt, os.urandom(_KEY_LENGTH), os.urandom(_KEY_LENGTH))


def tls_server_end_point(cert_der, signature_hash=None):
    """Channel-binding data for ``tls-server-end-point`` (RFC 5929): the
    certificate hashed with its signature's hash, SHA-256 for MD5 and SHA-1
    (and when the algorithm has no hash, e.g. Ed25519)."""
    name = (signature_hash or "sha256").lower().replace("-", "")
    if name in ("md5", "sha1"):
        name = "sha256"
    try:
        return hashlib.new(name, cert_der).digest()
    except ValueError:
        return hashlib.sha256(cert_der).digest()


# --- passthrough keys -----------------------------------------------------------


_CLIENT_KEYS = OrderedDict()     # StoredKey -> ClientKey
_CLIENT_KEYS_MAX = 4096


def remember_client_key(client_key):
    """Keep a ClientKey learned from a client's successful exchange, addressed
    by the StoredKey it hashes to (so it is only ever used with the secret it
    belongs to). Memory only."""
    stored = h(_HF, client_key)
    _CLIENT_KEYS[stored] = client_key
    _CLIENT_KEYS.move_to_end(stored)
    while len(_CLIENT_KEYS) > _CLIENT_KEYS_MAX:
        _CLIENT_KEYS.popitem(last=False)


def client_key_for(secret):
    """The ClientKey for ``secret`` (a Secret) if a client has logged in with it."""
    return _CLIENT_KEYS.get(secret.stored_key)


def forget_client_keys():
    _CLIENT_KEYS.clear()


# --- message parsing ---------------------------------------------------------------


def _attributes(text, what):
    """'a=1,b=2' -> [(a, '1'), (b, '2')] (values may contain '=')."""
    out = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramProtocolError(f"malformed SCRAM message: bad attribute in {what}")
        out.append((part[0], part[2:]))
    return out


def _decode(data, what):
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ScramProtocolError(f"malformed SCRAM message: {what} is not UTF-8") from None
    if "\x00" in text:
        raise ScramProtocolError(f"malformed SCRAM message: NUL in {what}")
    return text


def _new_nonce():
    return _b64(os.urandom(_NONCE_BYTES))


# --- server side (the pooler authenticating a client) -----------------------------


class ScramServerExchange:
    """The pooler's side of a client's SCRAM login.

    ``secret``: the Secret the client must prove knowledge of.
    ``channel_binding``: tls-server-end-point data of the connection's
    certificate when the client is on TLS (enables SCRAM-SHA-256-PLUS), else
    None. ``mock``: the user does not exist or cannot use SCRAM; the exchange
    runs to the end and then fails, like for a wrong password.

    ``mechanisms`` -> names to offer; ``client_first(mechanism, data)`` ->
    server-first bytes; ``client_final(data)`` -> server-final bytes, or
    raises ScramAuthFailed. Malformed input raises ScramProtocolError.
    After success ``client_key`` holds the client's ClientKey.
    """

    def __init__(self, secret, channel_binding=None, mock=False, nonce=None):
        self._secret = secret
        self._cb_data = channel_binding
        self._mock = mock
        self._server_nonce = nonce or _new_nonce()
        self._state = "first"
        self.mechanism = None
        self.client_key = None
        self.channel_bound = False

    @property
    def mechanisms(self):
        if self._cb_data is not None:
            return [MECHANISM_PLUS, MECHANISM]
        return [MECHANISM]

    def client_first(self, mechanism, data):
        if self._state != "first":
            raise ScramProtocolError("unexpected SCRAM client-first message")
        self._state = "final"
        if mechanism not in self.mechanisms:
            raise ScramProtocolError(
                f"client selected an invalid SASL authentication mechanism {mechanism!r}")
        if data is None:
            raise ScramProtocolError("malformed SCRAM message: empty client-first message")
        self.mechanism = mechanism
        text = _decode(data, "client-first message")
        # gs2-header: cbind-flag "," [authzid] ","
        try:
            flag, authzid, bare = text.split(",", 2)
        except ValueError:
            raise ScramProtocolError("malformed SCRAM message: no GS2 header") from None
        if flag == "n" or flag == "y":
            if mechanism == MECHANISM_PLUS:
                raise ScramProtocolError(
                    "channel binding is required by SCRAM-SHA-256-PLUS but the client did "
                    "not use it")
            if flag == "y" and self._cb_data is not None:
                # The client can do channel binding and thinks we cannot:
                # someone removed the -PLUS mechanism on the way (downgrade).
                raise ScramProtocolError(
                    "SCRAM channel binding negotiation error: the client supports channel "
                    "binding but thinks the server does not, although it does")
        elif flag.startswith("p="):
            if mechanism != MECHANISM_PLUS:
                raise ScramProtocolError(
                    "channel binding is used but SCRAM-SHA-256-PLUS was not selected")
            if flag[2:] != CHANNEL_BINDING:
                raise ScramProtocolError(
                    f"unsupported SCRAM channel-binding type {flag[2:]!r}")
            self.channel_bound = True
        else:
            raise ScramProtocolError("malformed SCRAM message: bad GS2 channel-binding flag")
        if authzid:
            raise ScramProtocolError(
                "client uses authorization identity, but it is not supported")
        self._gs2_header = f"{flag},{authzid},".encode("ascii")
        attrs = _attributes(bare, "client-first message")
        if attrs and attrs[0][0] == "m":
            raise ScramProtocolError("client requires an unsupported SCRAM extension")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise ScramProtocolError("malformed SCRAM message: expected n= and r=")
        client_nonce = attrs[1][1]
        if not _PRINTABLE.match(client_nonce):
            raise ScramProtocolError("malformed SCRAM message: invalid client nonce")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        s = self._secret
        self._server_first = f"r={self._nonce},s={_b64(s.salt)},i={s.iterations}"
        return self._server_first.encode("ascii")

    def client_final(self, data):
        if self._state != "final":
            raise ScramProtocolError("unexpected SCRAM client-final message")
        self._state = "done"
        text = _decode(data, "client-final message")
        head, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise ScramProtocolError("malformed SCRAM message: no proof")
        attrs = _attributes(head, "client-final message")
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise ScramProtocolError("malformed SCRAM message: expected c=, r= and p=")
        cbind = _unb64(attrs[0][1], "channel binding")
        expected = self._gs2_header
        if self.channel_bound:
            expected += self._cb_data
        if not hmac.compare_digest(cbind, expected):
            raise ScramAuthFailed("SCRAM channel binding check failed")
        if attrs[1][1] != self._nonce:
            raise ScramProtocolError("malformed SCRAM message: nonce does not match")
        proof = _unb64(proof_b64, "proof")
        if len(proof) != _KEY_LENGTH:
            raise ScramProtocolError("malformed SCRAM message: proof of the wrong length")
        s = self._secret
        auth_message = ",".join((self._client_first_bare, self._server_first, head))
        auth_message = auth_message.encode("utf-8")
        client_key = xor(proof, _hmac(_HF, s.stored_key, auth_message))
        ok = hmac.compare_digest(h(_HF, client_key), s.stored_key)
        if not ok or self._mock:
            raise ScramAuthFailed("SCRAM proof does not match")
        self.client_key = client_key
        return ("v=" + _b64(_hmac(_HF, s.server_key, auth_message))).encode("ascii")


# --- client side (the pooler logging in to PostgreSQL) -------------------------------


class ScramClientExchange:
    """Drives the client side of a SCRAM-SHA-256 exchange with a server.

    ``password``: plaintext, or a stored SCRAM secret (passthrough: the
    ClientKey a client proved is looked up with ``client_key_for``).
    ``start(mechanisms)`` -> (mechanism, client-first bytes);
    ``server_first(data)`` -> client-final bytes; ``server_final(data)``
    checks the server's signature. Failures raise ValueError with a message
    meant for logs (no secrets in it).
    """

    def __init__(self, user, password, nonce=None):
        self._user = user
        self._password = password
        self._secret = None
        self._client_key = None
        self._nonce = nonce or _new_nonce()
        if is_scram_secret(password):
            self._secret = parse_secret(password)

    def start(self, mechanisms):
        if MECHANISM not in mechanisms:
            raise ValueError(f"server offers no supported SASL mechanism: {mechanisms}")
        if self._secret is not None:
            self._client_key = client_key_for(self._secret)
            if self._client_key is None:
                raise ValueError(
                    f'cannot log in as "{self._user}" yet: its password is a SCRAM secret, '
                    "and the keys to use it come from a client's SCRAM login, none of "
                    "which has happened yet")
        self._first_bare = f"n=,r={self._nonce}"
        return MECHANISM, ("n,," + self._first_bare).encode("ascii")

    def server_first(self, data):
        text = bytes(data).decode("utf-8", "replace")
        attrs = dict(_attributes(text, "server-first message"))
        if "e" in attrs:
            raise ValueError(f"server refused SCRAM: {attrs['e']}")
        try:
            nonce, salt_b64, iters = attrs["r"], attrs["s"], attrs["i"]
        except KeyError:
            raise ValueError("malformed SCRAM server-first message") from None
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ValueError("SCRAM server nonce does not extend the client nonce")
        if not iters.isdigit() or not 0 < int(iters) <= MAX_ITERATIONS:
            raise ValueError(f"invalid SCRAM iteration count {iters!r}")
        salt = _unb64(salt_b64, "salt")
        iterations = int(iters)
        if self._secret is not None:
            s = self._secret
            if salt != s.salt or iterations != s.iterations:
                raise ValueError(
                    f'the server\'s SCRAM secret for "{self._user}" differs from the '
                    "pooler's (another salt or iteration count): the password changed on "
                    "the server, or the configured secret is not the server's")
            client_key, stored_key, server_key = self._client_key, s.stored_key, s.server_key
        else:
            client_key, stored_key, server_key = derive_keys(self._password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        auth_message = ",".join((self._first_bare, text, without_proof)).encode("utf-8")
        proof = xor(client_key, _hmac(_HF, stored_key, auth_message))
        self._server_signature = _hmac(_HF, server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def server_final(self, data):
        text = bytes(data).decode("utf-8", "replace")
        attrs = dict(_attributes(text, "server-final message"))
        if "e" in attrs:
            raise ValueError(f"server refused SCRAM: {attrs['e']}")
        sig = base64.b64decode(attrs.get("v", ""), validate=False)
        if not hmac.compare_digest(sig, self._server_signature):
            raise ValueError("SCRAM server signature does not match")
