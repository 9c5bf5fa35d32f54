"""A throwaway PKI for the TLS and mTLS tests (docs/delivery.md#how-the-guarantees-are-tested).

Why `cryptography` and not the openssl CLI: an expired certificate needs a validity window in the
past, which `openssl x509 -req` cannot set without faketime; `cryptography` (already installed as a
dependency of moto) sets not_valid_before/after directly and needs no subprocess.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Every file a TLS test needs; all PEM."""

    ca: Path                 # CA that signed server, expired_server and client
    server: CertPair         # CN localhost, SAN localhost + 127.0.0.1, valid now
    expired_server: CertPair  # same names, validity ended yesterday
    other_ca: Path           # unrelated CA: trusting it instead of `ca` must fail
    other_server: CertPair   # server cert signed by other_ca (wrong-CA case from the server side)
    client: CertPair         # client cert for mTLS, signed by `ca`
    other_client: CertPair   # client cert signed by other_ca: the broker must refuse it


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    return path


def _make_ca(cn: str, path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, directory: Path,
           stem: str, *, server: bool, expired: bool = False) -> CertPair:
    ca_cert, ca_key = ca
    key = _key()
    now = dt.datetime.now(dt.UTC)
    start, end = ((now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired
                  else (now - dt.timedelta(days=1), now + dt.timedelta(days=30)))
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path = directory / f"{stem}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertPair(cert_path, _write_key(key, directory / f"{stem}.key"))


def make_test_pki(directory: str | os.PathLike[str]) -> Pki:
    """Write a fresh PKI into `directory` (EC P-256 keys: fast to generate, accepted by mosquitto)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = _make_ca("gateway-test-ca", d / "ca.crt")
    other = _make_ca("unrelated-test-ca", d / "other-ca.crt")
    return Pki(
        ca=d / "ca.crt",
        server=_issue(ca, "localhost", d, "server", server=True),
        expired_server=_issue(ca, "localhost", d, "expired-server", server=True, expired=True),
        other_ca=d / "other-ca.crt",
        other_server=_issue(other, "localhost", d, "other-server", server=True),
        client=_issue(ca, "gateway-client", d, "client", server=False),
        other_client=_issue(other, "gateway-client", d, "other-client", server=False),
    )
