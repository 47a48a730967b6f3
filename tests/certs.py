"""Certificates made at test time (cryptography; no openssl subprocess).

``CertSet(directory)`` writes a small PKI into ``directory``:

- ``ca.pem``: the CA that signs ``server.pem`` / ``server.key``
  (CN ``pooler.test``, SAN DNS ``pooler.test`` and IP ``127.0.0.1``: right
  for ``host=127.0.0.1``, wrong for ``host=localhost``);
- ``other-ca.pem``: an unrelated CA (the "wrong CA"), which signs
  ``other.pem`` / ``other.key`` (same names, used to swap certificates);
- ``client-ca.pem``: the CA of client certificates; ``client.pem`` /
  ``client.key`` (CN ``pgcat_md5``); ``rogue-client.pem`` / ``.key``
  signed by ``other-ca``;
- ``pg-ca.pem``, ``pg.pem`` / ``pg.key``: PostgreSQL's own (SAN IP
  127.0.0.1 and DNS ``pg.test``).

EC P-256 keys: quick to make. Paths are attributes (``certs.ca`` ...).
"""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(cn):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(ca, cn, dns=(), ips=(), client=False):
    ca_key, ca_cert = ca
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                             for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write(path, data, mode=0o600):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


class CertSet:
    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        p = lambda name: os.path.join(directory, name)  # noqa: E731

        ca = make_ca("pgcat_tw test CA")
        other_ca = make_ca("pgcat_tw other CA")
        client_ca = make_ca("pgcat_tw client CA")
        pg_ca = make_ca("pgcat_tw postgres CA")

        self.ca = write(p("ca.pem"), cert_pem(ca[1]), 0o644)
        self.other_ca = write(p("other-ca.pem"), cert_pem(other_ca[1]), 0o644)
        self.client_ca = write(p("client-ca.pem"), cert_pem(client_ca[1]), 0o644)
        self.pg_ca = write(p("pg-ca.pem"), cert_pem(pg_ca[1]), 0o644)

        key, cert = make_leaf(ca, "pooler.test", dns=["pooler.test"], ips=["127.0.0.1"])
        self.server_cert_obj = cert
        self.server_cert = write(p("server.pem"), cert_pem(cert), 0o644)
        self.server_key = write(p("server.key"), key_pem(key))

        key, cert = make_leaf(other_ca, "pooler.test", dns=["pooler.test"], ips=["127.0.0.1"])
        self.other_cert = write(p("other.pem"), cert_pem(cert), 0o644)
        self.other_key = write(p("other.key"), key_pem(key))

        key, cert = make_leaf(client_ca, "pgcat_md5", client=True)
        self.client_cert = write(p("client.pem"), cert_pem(cert), 0o644)
        self.client_key = write(p("client.key"), key_pem(key))
        key, cert = make_leaf(other_ca, "pgcat_md5", client=True)
        self.rogue_cert = write(p("rogue-client.pem"), cert_pem(cert), 0o644)
        self.rogue_key = write(p("rogue-client.key"), key_pem(key))

        key, cert = make_leaf(pg_ca, "pg.test", dns=["pg.test"], ips=["127.0.0.1"])
        self.pg_cert_pem = cert_pem(cert)
        self.pg_key_pem = key_pem(key)

    def general_toml(self, cert=None, key=None, extra=""):
        """[general] lines for TLS towards clients."""
        return (f'tls_certificate = "{cert or self.server_cert}"\n'
                f'tls_private_key = "{key or self.server_key}"\n' + extra)
