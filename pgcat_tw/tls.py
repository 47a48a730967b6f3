"""TLS material for both sides of the pooler (pyOpenSSL via Twisted).

Towards clients: a ``CertificateOptions`` built from ``tls_certificate``
(a PEM chain, leaf first) and ``tls_private_key``; TLS 1.2 at least; ALPN
``postgresql`` (PostgreSQL 17's direct TLS requires it); with
``verify_client_certificate``, clients must present a certificate signed by
a CA of ``tls_ca_file``.

Towards servers (``server_tls``): a connection creator per host. With
``verify_server_certificate`` the chain is checked against
``server_tls_ca_file`` (or the system's trust store) and the host name or IP
address against the certificate through service-identity, as
``sslmode=verify-full`` does; without it nothing is checked (PgCat's
default, ``sslmode=require``).

``TLSState`` holds what is in force. ``reload(general)`` re-reads every
file; a part that fails to load keeps its previous value, and the problems
are returned for the caller to log. Connections already established keep
the material they started with.
"""

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

ALPN_PROTOCOL = b"postgresql"


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; the message names
    the setting and the file."""


def _read(path, setting):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"{setting} {path!r}: cannot read: {e.strerror or e}") from None


def load_certificates(path, setting):
    """Every certificate of a PEM file, as pyOpenSSL X509 objects."""
    data = _read(path, setting)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSError(f"{setting} {path!r}: not a PEM certificate file ({e})") from None
    return [crypto.X509.from_cryptography(c) for c in certs]


def load_private_key(path, setting):
    data = _read(path, setting)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSError(f"{setting} {path!r}: the private key is encrypted "
                       "(a key without a passphrase is needed)") from None
    except (ValueError, Exception) as e:  # noqa: BLE001 - cryptography's UnsupportedAlgorithm
        raise TLSError(f"{setting} {path!r}: not a PEM private key ({e})") from None
    return crypto.PKey.from_cryptography_key(key)


def end_point_hash(cert):
    """tls-server-end-point channel-binding data (RFC 5929) of a pyOpenSSL
    X509: the DER certificate hashed with its signature's hash algorithm
    (SHA-256 instead of MD5 or SHA-1, or when there is none)."""
    c = cert.to_cryptography()
    der = c.public_bytes(serialization.Encoding.DER)
    try:
        algo = c.signature_hash_algorithm
    except Exception:  # noqa: BLE001 - unsupported algorithm
        algo = None
    name = algo.name if algo is not None else "sha256"
    if name in ("md5", "sha1"):
        name = "sha256"
    try:
        return hashlib.new(name, der).digest()
    except ValueError:
        return hashlib.sha256(der).digest()


def client_side_options(general):
    """The CertificateOptions for accepting TLS clients, or None when
    ``tls_certificate`` is not set. Raises TLSError."""
    if not general.tls_certificate:
        return None
    chain = load_certificates(general.tls_certificate, "tls_certificate")
    key = load_private_key(general.tls_private_key, "tls_private_key")
    ca_certs = None
    if general.verify_client_certificate:
        ca_certs = load_certificates(general.tls_ca_file, "tls_ca_file")
    try:
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableProtocols=[ALPN_PROTOCOL],
            verify=ca_certs is not None,
            caCerts=ca_certs,
            requireCertificate=True,
        )
        # Build the context now, so that a key that does not match the
        # certificate is reported here and not at the first client.
        options.getContext()
    except (SSL.Error, ValueError) as e:
        raise TLSError(f"tls_certificate {general.tls_certificate!r} and tls_private_key "
                       f"{general.tls_private_key!r} cannot be used together: "
                       f"{_ssl_reason(e)}") from None
    return options


def _ssl_reason(err):
    args = getattr(err, "args", None)
    if args and isinstance(args[0], list):
        parts = [item[-1] for item in args[0] if isinstance(item, tuple) and item]
        if parts:
            return ", ".join(parts)
    return str(err) or err.__class__.__name__


class ServerConnector:
    """Connection creators for servers, per host (each holds its own
    OpenSSL context, built once)."""

    def __init__(self, verify, ca_file):
        self.verify = verify
        self.ca_file = ca_file
        self._creators = {}
        self._trust = None
        if verify:
            if ca_file:
                certs = load_certificates(ca_file, "server_tls_ca_file")
                self._trust = ssl.trustRootFromCertificates(
                    [ssl.Certificate(c) for c in certs])
            else:
                self._trust = ssl.platformTrust()
        else:
            self._plain = ssl.CertificateOptions(
                raiseMinimumTo=TLSVersion.TLSv1_2, acceptableProtocols=[ALPN_PROTOCOL])

    def creator(self, host):
        if not self.verify:
            return self._plain
        c = self._creators.get(host)
        if c is None:
            c = self._creators[host] = ssl.optionsForClientTLS(
                host, trustRoot=self._trust, acceptableProtocols=[ALPN_PROTOCOL],
                extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})
        return c


def describe_handshake_failure(failure, host, port):
    """A log-friendly reason for a failed TLS handshake with a server."""
    err = failure.value if hasattr(failure, "value") else failure
    name = err.__class__.__name__
    if name == "VerificationError":
        return (f"TLS handshake with server {host}:{port} failed: its certificate is not "
                f"valid for host {host!r} (verify_server_certificate = true)")
    if isinstance(err, SSL.Error):
        reason = _ssl_reason(err)
        if "certificate verify failed" in reason:
            return (f"TLS handshake with server {host}:{port} failed: certificate verify "
                    f"failed (its chain is not signed by a CA of server_tls_ca_file or the "
                    f"system's trust store)")
        return f"TLS handshake with server {host}:{port} failed: {reason}"
    msg = failure.getErrorMessage() if hasattr(failure, "getErrorMessage") else str(err)
    return f"TLS handshake with server {host}:{port} failed: {msg}"


class TLSState:
    """The TLS material in force. Construction raises TLSError (a start
    with unusable files fails); ``reload`` keeps what cannot be replaced."""

    def __init__(self, general):
        self.client_options = client_side_options(general)
        self.connector = self._make_connector(general)

    @staticmethod
    def _make_connector(general):
        if not general.server_tls:
            return None
        return ServerConnector(general.verify_server_certificate, general.server_tls_ca_file)

    @property
    def accepts_tls(self):
        return self.client_options is not None

    def server_creator(self, host):
        """The creator for a TLS connection to ``host``, or None when
        ``server_tls`` is off."""
        c = self.connector
        return None if c is None else c.creator(host)

    def reload(self, general):
        """Re-read every file for ``general``. Returns a list of problems
        (each a string naming the setting and file); the parts they concern
        keep their previous value."""
        problems = []
        try:
            self.client_options = client_side_options(general)
        except TLSError as e:
            problems.append(f"{e}; keeping the previous client-side TLS settings")
        try:
            self.connector = self._make_connector(general)
        except TLSError as e:
            problems.append(f"{e}; keeping the previous server-side TLS settings")
        return problems
