"""Which hosts a provider key's ``base_url`` and a vLLM node URL may name.

Sidecars send provider secrets and app traffic to these URLs, so an admin
(or a stolen admin token) must not be able to aim them at the machine's own
cloud metadata service. Pure logic: the host is judged as written, never
resolved.

Always refused:
- link-local addresses, where the cloud metadata services live:
  169.254.0.0/16 (AWS, GCP, Azure, OCI, ECS task metadata), fe80::/10;
- other well-known metadata addresses: fd00:ec2::254 (AWS IMDS over IPv6),
  100.100.100.200 (Alibaba Cloud), 168.63.129.16 (Azure WireServer);
- unspecified addresses (0.0.0.0/8, ::), which reach the local machine;
- multicast and broadcast addresses;
- metadata host names: metadata, metadata.google.internal, metadata.goog,
  instance-data, instance-data.ec2.internal.

Refused too with ``deny_private`` (``--deny-private-base-urls``): private and
loopback addresses, where self-hosted vLLM usually lives and which are
therefore allowed by default: 10/8, 172.16/12, 192.168/16, 100.64/10 (CGNAT),
127/8, ::1, fc00::/7, and the names localhost and *.localhost.

IPv4 is judged in every spelling the C resolver accepts (2852039166,
0xa9fea9fe, 0251.0376.0251.0376, 169.254.43518), and inside IPv6 addresses
that carry one (::ffff:a.b.c.d, 64:ff9b::/96 NAT64, 2002::/16 6to4).

Not checked: what a host name resolves to. Any other name is accepted, and
may point at any address (or change what it points at later); keep
metadata endpoints unreachable from the sidecars at the network level too
(IMDSv2 with a hop limit of 1, egress rules).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from keyplane.errors import InvalidArgument

__all__ = ["DEFAULT_URL_POLICY", "UrlPolicy", "refusal"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


_METADATA = _networks(
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    "168.63.129.16/32",
)
_UNSPECIFIED = _networks("0.0.0.0/8", "::/128")
_NOT_UNICAST = _networks("224.0.0.0/4", "255.255.255.255/32", "ff00::/8")
_PRIVATE = _networks(
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "::1/128",
    "fc00::/7",
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_METADATA_NAMES = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_IPV4_CHARS = frozenset("0123456789abcdefx.")

_REFUSED_METADATA = "must not point at a link-local or cloud metadata address"
_REFUSED_UNSPECIFIED = "must not point at an unspecified address (0.0.0.0/8 or ::)"
_REFUSED_NOT_UNICAST = "must not point at a multicast or broadcast address"
_REFUSED_PRIVATE = (
    "must not point at a private or loopback address (this control plane runs with --deny-private-base-urls)"
)


def _ipv4_any_spelling(host: str) -> ipaddress.IPv4Address | None:
    """``host`` as the C resolver reads a numeric IPv4 host (inet_aton: one
    to four parts, decimal, octal or hex), or None if it is a name."""
    if not host or not set(host) <= _IPV4_CHARS or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))  # pure parsing, no lookup
    except OSError:
        return None


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _ipv4_any_spelling(host)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _address_refusal(address: IPAddress, *, deny_private: bool) -> str | None:
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.IPv6Address(int(address))  # without a zone id (fe80::1%eth0)
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            found = _address_refusal(embedded, deny_private=deny_private)
            if found is not None:
                return found
    if any(address in net for net in _METADATA):
        return _REFUSED_METADATA
    if any(address in net for net in _UNSPECIFIED):
        return _REFUSED_UNSPECIFIED
    if any(address in net for net in _NOT_UNICAST):
        return _REFUSED_NOT_UNICAST
    if deny_private and any(address in net for net in _PRIVATE):
        return _REFUSED_PRIVATE
    return None


def refusal(host: str, *, deny_private: bool = False) -> str | None:
    """Why ``host`` (a URL's host: lower case, no brackets) is refused, as the
    end of a sentence that starts with the field's name; None if allowed."""
    host = host.lower().removesuffix(".")
    address = _address(host)
    if address is not None:
        return _address_refusal(address, deny_private=deny_private)
    if host in _METADATA_NAMES:
        return _REFUSED_METADATA
    if deny_private and (host == "localhost" or host.endswith(".localhost")):
        return _REFUSED_PRIVATE
    return None


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """``deny_private``: also refuse private and loopback hosts."""

    deny_private: bool = False

    def check(self, url: str, *, field: str) -> None:
        """Raise ``InvalidArgument`` naming ``field`` (never the URL, which
        may hold credentials) if the host of ``url`` is refused. ``url`` is
        an absolute http(s) URL already checked by ``validate_url``."""
        host = urlsplit(url).hostname or ""
        reason = refusal(host, deny_private=self.deny_private)
        if reason is not None:
            raise InvalidArgument(f"{field} {reason}")


DEFAULT_URL_POLICY = UrlPolicy()
