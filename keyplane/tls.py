"""TLS for every gRPC connection: the control plane's server credentials
(re-read from disk when the files change) and the clients' channel credentials.

Server side: ``server_credentials`` builds ``grpc.dynamic_ssl_server_credentials``
whose fetcher grpc calls before every new handshake (on one of its own
threads). The fetcher only ``stat``s the three files; when one changed it reads
them, checks that the key matches the certificate, and hands grpc the new
configuration. A half-written rotation (a certificate without its new key yet)
is ignored until the pair matches again, so a running server keeps serving its
last good certificate. Connections already open keep theirs.

Client side: ``channel_credentials`` reads the files once, when a channel is
opened; ``ClientTls.signature`` tells a long-lived client (the sidecar) that
they changed, so it can open a new channel.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from keyplane.errors import KeyplaneError

__all__ = [
    "CertificateReloader",
    "ClientTls",
    "FileSignature",
    "ServerTls",
    "TlsError",
    "channel_credentials",
    "channel_options",
    "files_signature",
    "is_loopback_listen",
    "server_credentials",
]

_log = logging.getLogger(__name__)

# (device, inode, size, mtime_ns, ctime_ns) per file; None for a missing file.
FileSignature = tuple[tuple[int, int, int, int, int] | None, ...]


class TlsError(KeyplaneError, ValueError):
    """A TLS file is missing, unreadable or does not fit (names the file, never its contents)."""


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The control plane's certificate and key; with ``client_ca_file`` every
    client must present a certificate signed by that CA (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def files(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client reaches the control plane over TLS.

    ``ca_file``: the CA the server certificate is checked against (None: the
    system's); ``cert_file``/``key_file``: this client's certificate for mTLS;
    ``server_name``: the name expected in the server certificate when it is
    not the host of the target address (``grpc.ssl_target_name_override``).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsError("a client certificate needs its key: give both the certificate and the key, or neither")

    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.ca_file, self.cert_file, self.key_file) if p is not None)

    def signature(self) -> FileSignature:
        """Changes whenever one of the files is replaced or rewritten."""
        return files_signature(self.files())


def files_signature(paths: Sequence[Path]) -> FileSignature:
    signature: list[tuple[int, int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks: a Kubernetes secret swap changes the target
        except OSError:
            signature.append(None)
            continue
        signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(signature)


def is_loopback_listen(listen: str) -> bool:
    """True when ``listen`` (``host:port``, ``[v6]:port`` or ``unix:path``) only
    accepts connections from this machine: 127.0.0.0/8, ::1, localhost, a unix socket."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (it may resolve anywhere) or an empty host (every interface)


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror or type(exc).__name__}") from None
    if not data.strip():
        raise TlsError(f"the {what} {path} is empty")
    return data


def _check_pair(cert_pem: bytes, key_pem: bytes, cert_file: Path, key_file: Path) -> None:
    """The first certificate in ``cert_pem`` must belong to the key in ``key_pem``."""
    from cryptography import x509  # imported when used: the admin commands start faster
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TlsError(f"{cert_file} does not hold a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"{key_file} does not hold an unencrypted PEM private key") from None
    cert_public = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if cert_public != key_public:
        raise TlsError(f"the key {key_file} does not belong to the certificate {cert_file}")


def _check_ca(ca_pem: bytes, ca_file: Path) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise TlsError(f"{ca_file} does not hold PEM CA certificates") from None


def _server_configuration(tls: ServerTls) -> grpc.ServerCertificateConfiguration:
    cert_pem = _read(tls.cert_file, "TLS certificate")
    key_pem = _read(tls.key_file, "TLS key")
    _check_pair(cert_pem, key_pem, tls.cert_file, tls.key_file)
    roots: bytes | None = None
    if tls.client_ca_file is not None:
        roots = _read(tls.client_ca_file, "client CA")
        _check_ca(roots, tls.client_ca_file)
    return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=roots)


class CertificateReloader:
    """The fetcher grpc calls before each handshake: a new configuration when
    the files changed and are consistent, else None (keep the current one)."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._signature = files_signature(tls.files())
        self.initial = _server_configuration(tls)
        self.reloads = 0
        self._last_error: str | None = None

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                signature = files_signature(self._tls.files())
                if signature == self._signature:
                    return None
                try:
                    configuration = _server_configuration(self._tls)
                except TlsError as exc:
                    # Mid-rotation or broken: keep serving the last good pair, try again next handshake.
                    if str(exc) != self._last_error:
                        self._last_error = str(exc)
                        _log.warning("TLS files changed but cannot be used yet (%s); keeping the current ones", exc)
                    return None
                self._signature = signature
                self._last_error = None
                self.reloads += 1
                _log.info("TLS certificate reloaded from %s", self._tls.cert_file)
                return configuration
        except Exception as exc:  # never let an exception escape into grpc's handshake thread
            _log.error("TLS certificate reload failed: %s", type(exc).__name__)
            return None


def server_credentials(tls: ServerTls) -> tuple[grpc.ServerCredentials, CertificateReloader]:
    """Credentials that pick up rotated files on the next handshake (``TlsError`` if unusable now)."""
    reloader = CertificateReloader(tls)
    credentials = grpc.dynamic_ssl_server_credentials(
        reloader.initial,
        reloader,  # type: ignore[arg-type]  # grpc-stubs: None (keep the current one) is allowed too
        require_client_authentication=tls.mutual,
    )
    return credentials, reloader


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """Channel credentials from the files as they are now (``TlsError`` if unusable)."""
    roots: bytes | None = None
    if tls.ca_file is not None:
        roots = _read(tls.ca_file, "TLS CA")
        _check_ca(roots, tls.ca_file)
    cert_pem = key_pem = None
    if tls.cert_file is not None and tls.key_file is not None:
        cert_pem = _read(tls.cert_file, "client certificate")
        key_pem = _read(tls.key_file, "client key")
        _check_pair(cert_pem, key_pem, tls.cert_file, tls.key_file)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key_pem, certificate_chain=cert_pem)


def channel_options(tls: ClientTls | None) -> list[tuple[str, str]]:
    if tls is None or not tls.server_name:
        return []
    return [("grpc.ssl_target_name_override", tls.server_name)]
