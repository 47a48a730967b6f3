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
import re

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

ALPN_PROTOCOL = b"postgresql"


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used. ``setting`` is the
    [general] key (``tls_private_key``), ``problem`` names the file and what
    is wrong; ``str(e)`` is both."""

    def __init__(self, setting, problem):
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem


def _read(path, setting):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(setting, f"{path!r}: cannot read: {e.strerror or e}") from None


# Files are read by OpenSSL (through pyOpenSSL), the library that serves
# them: what it can use is never refused. (cryptography's own PEM reader is
# stricter: it refuses, e.g., a PKCS#8 key under a "BEGIN RSA PRIVATE KEY"
# header, which OpenSSL and PgCat's rustls-pemfile read; PgCat's CI key is one.)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
# The labels OpenSSL's PEM_read_bio_X509 takes for a certificate.
_CERT_LABELS = (b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE")


def load_certificates(path, setting):
    """Every certificate of a PEM file, in order, as pyOpenSSL X509
    objects; other PEM blocks (a key in the same file) are skipped, as
    OpenSSL's chain loading does."""
    data = _read(path, setting)
    certs = []
    for n, block in enumerate(_PEM_BLOCK.finditer(data), 1):
        if block.group(1) not in _CERT_LABELS:
            continue
        try:
            certs.append(crypto.load_certificate(crypto.FILETYPE_PEM, block.group(0)))
        except crypto.Error as e:
            label = block.group(1).decode()
            raise TLSError(setting, f"{path!r}: PEM block {n} ({label}) is not a certificate "
                           f"OpenSSL can load (OpenSSL: {_ssl_reason(e)})") from None
    if not certs:
        raise TLSError(setting, f"{path!r}: no PEM certificate in the file "
                       "(-----BEGIN CERTIFICATE----- ...)")
    return certs


class _Encrypted(Exception):
    pass


def _no_passphrase(*args):
    # Called by OpenSSL for an encrypted key (instead of asking on the terminal).
    raise _Encrypted()


def load_private_key(path, setting):
    """The private key of a PEM file, read by OpenSSL as a server reads it
    (PKCS#1, PKCS#8 or SEC1, whatever the header says)."""
    data = _read(path, setting)
    labels = [m.group(1) for m in _PEM_BLOCK.finditer(data)]
    if not any(label.endswith(b"PRIVATE KEY") for label in labels):
        found = (f"; it has {', '.join(sorted({label.decode() for label in labels}))}"
                 if labels else "")
        raise TLSError(setting, f"{path!r}: no PEM private key in the file "
                       f"(-----BEGIN PRIVATE KEY----- ...){found}")
    try:
        return crypto.load_privatekey(crypto.FILETYPE_PEM, data, _no_passphrase)
    except _Encrypted:
        raise TLSError(setting, f"{path!r}: the private key is encrypted "
                       "(a key without a passphrase is needed)") from None
    except crypto.Error as e:
        raise TLSError(setting, f"{path!r}: not a private key OpenSSL can load "
                       f"(OpenSSL: {_ssl_reason(e)})") from None


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
        raise TLSError("tls_private_key", f"{general.tls_private_key!r} and tls_certificate "
                       f"{general.tls_certificate!r} cannot be used together: "
                       f"{_ssl_reason(e)}") from None
    return options


def _ssl_reason(err):
    """OpenSSL's error queue as text: the reasons, in order, once each."""
    args = getattr(err, "args", None)
    if args and isinstance(args[0], list):
        parts = [item[-1] for item in args[0] if isinstance(item, tuple) and item]
        parts = [p for i, p in enumerate(parts) if p and p not in parts[:i]]
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
