"""TLS certificates for local test servers: self-signed, or a test CA issuing
server and client certificates (mTLS)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyplane.devcerts import Issued, issue, make_ca, write_issued

__all__ = ["Pki", "make_pki", "self_signed_certificate", "served_certificate"]


def self_signed_certificate(directory: Path, name: str = "keyplane test server") -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1 and localhost, the certificate its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@dataclass
class Pki:
    """A test CA in ``directory`` that issues server and client certificates as files."""

    directory: Path
    name: str
    ca: Issued

    @property
    def ca_file(self) -> Path:
        return self.directory / f"{self.name}-ca.crt"

    def server(
        self, hosts: Sequence[str] = ("127.0.0.1", "localhost"), *, label: str = "server", serial: int | None = None
    ) -> tuple[Path, Path]:
        """(certificate, key) files for a server reachable as ``hosts``."""
        return self._write(label, issue(self.ca, hosts[0], hosts=hosts, serial=serial))

    def client(self, common_name: str = "sidecar-1", *, label: str = "client") -> tuple[Path, Path]:
        return self._write(label, issue(self.ca, common_name, server=False, client=True))

    def _write(self, label: str, issued: Issued) -> tuple[Path, Path]:
        cert_file = self.directory / f"{self.name}-{label}.crt"
        key_file = self.directory / f"{self.name}-{label}.key"
        write_issued(issued, cert_file, key_file)
        return cert_file, key_file


def make_pki(directory: Path, name: str = "a") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory, name, make_ca(f"keyplane test CA {name}"))
    pki.ca_file.write_bytes(pki.ca.cert_pem)
    return pki


def served_certificate(address: str, pki: Pki, client: tuple[Path, Path] | None = None) -> x509.Certificate:
    """The certificate a TLS server at ``address`` presents now (a fresh handshake,
    blocking: call it in a thread), verified against ``pki``'s CA."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(client[0], client[1])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
