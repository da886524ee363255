"""Test certificates: a CA, a server certificate and a client certificate.

For trying TLS and mTLS out (``keyplane dev-certs``) and for tests; production
certificates come from your PKI (cert-manager, Vault, ...). ECDSA P-256 keys.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevCertFiles", "Issued", "issue", "make_ca", "write_dev_certs", "write_issued"]


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyplane"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str = "keyplane dev CA", *, days: int = 365) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    ca: Issued,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    server: bool = True,
    client: bool = False,
    days: int = 90,
    serial: int | None = None,
) -> Issued:
    """A leaf certificate signed by ``ca``: for a server (``hosts`` in its
    subject alternative names), a client, or both."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` (replacing it atomically), readable per ``mode`` only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_issued(issued: Issued, cert_file: Path, key_file: Path) -> None:
    """Certificate 0644, key 0600."""
    _write(key_file, issued.key_pem, 0o600)
    _write(cert_file, issued.cert_pem, 0o644)


@dataclass(frozen=True)
class DevCertFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def all(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.client_cert, self.client_key)


def write_dev_certs(
    out: Path, hosts: Sequence[str], *, client_name: str = "keyplane-client", days: int = 90, force: bool = False
) -> DevCertFiles:
    """ca.crt/ca.key, server.crt/server.key (for ``hosts``), client.crt/client.key
    in ``out`` (created 0700). ``FileExistsError`` if one exists and not ``force``."""
    if not hosts:
        raise ValueError("at least one host name or IP address is needed for the server certificate")
    files = DevCertFiles(
        *(out / name for name in ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"))
    )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = [str(p) for p in files.all() if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass --force)")
    ca = make_ca(days=max(days, 1) * 2)
    write_issued(ca, files.ca_cert, files.ca_key)
    write_issued(issue(ca, hosts[0], hosts=hosts, days=days), files.server_cert, files.server_key)
    write_issued(issue(ca, client_name, server=False, client=True, days=days), files.client_cert, files.client_key)
    return files
