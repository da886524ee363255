"""The base-URL policy: which hosts provider base URLs and vLLM node URLs
may name. Tables for the pure policy, then the rule at work in the admin
API over a real socket (default policy and --deny-private-base-urls)."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from control_plane import validation as v
from control_plane.url_policy import UrlPolicy, refusal
from keyplane.domain import Provider
from keyplane.errors import InvalidArgument
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import ADMIN_MD, Harness, HarnessFactory, rpc_error

METADATA = "must not point at a link-local or cloud metadata address"
UNSPECIFIED = "must not point at an unspecified address (0.0.0.0/8 or ::)"
NOT_UNICAST = "must not point at a multicast or broadcast address"
PRIVATE = "must not point at a private or loopback address (this control plane runs with --deny-private-base-urls)"

# host -> (refusal by default, refusal with deny_private)
HOSTS: dict[str, tuple[str | None, str | None]] = {
    # link-local and cloud metadata: always refused, in every spelling
    "169.254.169.254": (METADATA, METADATA),
    "169.254.170.2": (METADATA, METADATA),  # ECS task metadata
    "2852039166": (METADATA, METADATA),  # 169.254.169.254 as one number
    "0xa9fea9fe": (METADATA, METADATA),
    "0xA9.0xFE.0xA9.0xFE": (METADATA, METADATA),
    "0251.0376.0251.0376": (METADATA, METADATA),  # octal
    "169.254.43518": (METADATA, METADATA),  # a.b.c with a 16-bit tail
    "169.254.169.254.": (METADATA, METADATA),  # trailing dot
    "fe80::1": (METADATA, METADATA),
    "fe80::1%25eth0": (METADATA, METADATA),  # with a zone id, as urlsplit returns it
    "fd00:ec2::254": (METADATA, METADATA),  # AWS IMDS over IPv6, inside fc00::/7
    "::ffff:169.254.169.254": (METADATA, METADATA),  # IPv4-mapped
    "::ffff:a9fe:a9fe": (METADATA, METADATA),
    "64:ff9b::a9fe:a9fe": (METADATA, METADATA),  # NAT64
    "2002:a9fe:a9fe::1": (METADATA, METADATA),  # 6to4
    "::a9fe:a9fe": (METADATA, METADATA),  # IPv4-compatible
    "100.100.100.200": (METADATA, METADATA),  # Alibaba Cloud, inside 100.64/10
    "168.63.129.16": (METADATA, METADATA),  # Azure WireServer
    "metadata.google.internal": (METADATA, METADATA),
    "METADATA.google.internal.": (METADATA, METADATA),
    "metadata": (METADATA, METADATA),
    "metadata.goog": (METADATA, METADATA),
    "instance-data": (METADATA, METADATA),
    "instance-data.ec2.internal": (METADATA, METADATA),
    # unspecified, multicast, broadcast: always refused
    "0.0.0.0": (UNSPECIFIED, UNSPECIFIED),
    "0": (UNSPECIFIED, UNSPECIFIED),
    "0.1.2.3": (UNSPECIFIED, UNSPECIFIED),
    "::": (UNSPECIFIED, UNSPECIFIED),
    "::ffff:0.0.0.0": (UNSPECIFIED, UNSPECIFIED),
    "224.0.0.1": (NOT_UNICAST, NOT_UNICAST),
    "255.255.255.255": (NOT_UNICAST, NOT_UNICAST),
    "ff02::1": (NOT_UNICAST, NOT_UNICAST),
    # private and loopback: allowed unless deny_private (self-hosted vLLM)
    "10.0.0.1": (None, PRIVATE),
    "172.16.0.1": (None, PRIVATE),
    "172.31.255.254": (None, PRIVATE),
    "192.168.1.10": (None, PRIVATE),
    "100.64.0.1": (None, PRIVATE),
    "127.0.0.1": (None, PRIVATE),
    "127.1": (None, PRIVATE),
    "2130706433": (None, PRIVATE),  # 127.0.0.1
    "::1": (None, PRIVATE),
    "::ffff:127.0.0.1": (None, PRIVATE),
    "::ffff:10.1.2.3": (None, PRIVATE),
    "fc00::1": (None, PRIVATE),
    "fd12:3456::1": (None, PRIVATE),
    "localhost": (None, PRIVATE),
    "vllm.localhost": (None, PRIVATE),
    "LocalHost.": (None, PRIVATE),
    # public addresses and names: allowed (names are never resolved)
    "8.8.8.8": (None, None),
    "172.32.0.1": (None, None),
    "192.169.0.1": (None, None),
    "100.128.0.1": (None, None),
    "2001:db8::1": (None, None),
    "2606:4700::1111": (None, None),
    "api.openai.com": (None, None),
    "vllm.internal": (None, None),
    "metadata.example.com": (None, None),
    "169.254.169.254.nip.io": (None, None),  # a name: resolving it is out of scope
    "1.2.3.4.5": (None, None),  # not an address: a name
    "0x": (None, None),
    "1e100.net": (None, None),
}


@pytest.mark.parametrize(("host", "expected"), list(HOSTS.items()))
def test_refusal_table(host: str, expected: tuple[str | None, str | None]) -> None:
    assert (refusal(host), refusal(host, deny_private=True)) == expected


@pytest.mark.parametrize(
    ("url", "deny_private", "message"),
    [
        ("http://169.254.169.254/latest/meta-data", False, f"base_url {METADATA}"),
        ("http://[fe80::1%25eth0]:8000/v1", False, f"base_url {METADATA}"),
        ("http://[fd00:ec2::254]/", False, f"base_url {METADATA}"),
        ("https://metadata.google.internal/computeMetadata/v1", False, f"base_url {METADATA}"),
        ("http://0.0.0.0:8000", False, f"base_url {UNSPECIFIED}"),
        ("http://[::]:8000", False, f"base_url {UNSPECIFIED}"),
        ("http://10.1.2.3:8000/v1", True, f"base_url {PRIVATE}"),
        ("http://[::1]:8000/v1", True, f"base_url {PRIVATE}"),
        ("http://localhost:8000/v1", True, f"base_url {PRIVATE}"),
    ],
)
def test_base_url_refused_without_echoing_it(url: str, deny_private: bool, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        v.validate_base_url(url, Provider.OPENAI_COMPATIBLE, policy=UrlPolicy(deny_private=deny_private))
    assert str(info.value) == message
    assert "169.254" not in str(info.value) and "10.1.2.3" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "policy"),
    [
        ("http://127.0.0.1:8000/v1", UrlPolicy()),
        ("http://10.0.0.5:8000/v1", UrlPolicy()),
        ("http://[fc00::5]:8000/v1", UrlPolicy()),
        ("https://api.together.xyz/v1", UrlPolicy(deny_private=True)),
        ("https://1.2.3.4/v1", UrlPolicy(deny_private=True)),
    ],
)
def test_base_url_allowed(url: str, policy: UrlPolicy) -> None:
    assert v.validate_base_url(url, Provider.OPENAI_COMPATIBLE, policy=policy) == url


def test_default_policy_applies_without_injection() -> None:
    with pytest.raises(InvalidArgument, match=METADATA):
        v.validate_base_url("http://169.254.169.254", Provider.OPENAI)
    assert v.validate_base_url("http://127.0.0.1:8000", Provider.OPENAI) == "http://127.0.0.1:8000"


def test_vllm_node_urls_follow_the_policy() -> None:
    def target(*urls: str, policy: UrlPolicy = UrlPolicy()) -> object:
        return v.validate_route_target(
            2, provider=Provider.VLLM, upstream_model="llama", priority=0, weight=1, node_urls=urls, policy=policy
        )

    with pytest.raises(InvalidArgument) as info:
        target("http://10.0.0.1:8000", "http://169.254.169.254:8000")
    assert str(info.value) == f"targets[2].node_urls[1] {METADATA}"
    with pytest.raises(InvalidArgument) as info:
        target("http://10.0.0.1:8000", policy=UrlPolicy(deny_private=True))
    assert str(info.value) == f"targets[2].node_urls[0] {PRIVATE}"
    target("http://10.0.0.1:8000", "http://[fc00::2]:8000")


# ---- over a real socket ----------------------------------------------------


async def refused(call: Awaitable[object]) -> str:
    with pytest.raises(aio.AioRpcError) as info:
        await call
    code, details = rpc_error(info)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    return details


def vllm_route(*urls: str) -> apb.CreateRouteRequest:
    return apb.CreateRouteRequest(
        tenant="acme",
        public_model="llama",
        targets=[rpb.RouteTarget(provider=rpb.PROVIDER_VLLM, upstream_model="llama-3", node_urls=list(urls))],
    )


async def test_admin_api_refuses_metadata_urls_by_default(harness: Harness) -> None:
    await harness.tenant()
    metadata_url = "http://169.254.169.254/latest/meta-data/iam"
    details = await refused(
        harness.admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant="acme",
                label="evil",
                secret="sk-abcdefghijkl",
                provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
                base_url=metadata_url,
            ),
            metadata=ADMIN_MD,
        )
    )
    assert details == f"base_url {METADATA}"
    # Private and loopback are fine by default (self-hosted vLLM).
    key = await harness.key(label="local", provider=rpb.PROVIDER_OPENAI_COMPATIBLE, base_url="http://127.0.0.1:8000/v1")
    details = await refused(
        harness.admin.UpdateProviderKey(
            apb.UpdateProviderKeyRequest(
                tenant="acme",
                id=key.id,
                key=rpb.ProviderKey(base_url="http://[fd00:ec2::254]/latest"),
                update_mask=FieldMask(paths=["base_url"]),
            ),
            metadata=ADMIN_MD,
        )
    )
    assert details == f"key.base_url {METADATA}"
    details = await refused(
        harness.admin.CreateRoute(vllm_route("http://10.0.0.1:8000", "http://0.0.0.0:8000"), metadata=ADMIN_MD)
    )
    assert details == f"targets[0].node_urls[1] {UNSPECIFIED}"
    created = await harness.admin.CreateRoute(vllm_route("http://10.0.0.1:8000"), metadata=ADMIN_MD)
    assert list(created.route.targets[0].node_urls) == ["http://10.0.0.1:8000"]
    listed = await harness.admin.ListProviderKeys(apb.ListProviderKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert [k.label for k in listed.keys] == ["local"]


async def test_admin_api_refuses_private_urls_when_told(make_harness: HarnessFactory) -> None:
    harness = await make_harness(deny_private_base_urls=True)
    await harness.tenant()
    for url in ("http://127.0.0.1:8000/v1", "http://10.0.0.7:8000/v1", "http://[::1]:8000", "http://localhost:8000"):
        details = await refused(
            harness.admin.CreateProviderKey(
                apb.CreateProviderKeyRequest(
                    tenant="acme",
                    label="l",
                    secret="sk-abcdefghijkl",
                    provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
                    base_url=url,
                ),
                metadata=ADMIN_MD,
            )
        )
        assert details == f"base_url {PRIVATE}"
    details = await refused(harness.admin.CreateRoute(vllm_route("http://192.168.1.20:8000"), metadata=ADMIN_MD))
    assert details == f"targets[0].node_urls[0] {PRIVATE}"
    key = await harness.key(
        label="public", provider=rpb.PROVIDER_OPENAI_COMPATIBLE, base_url="https://api.example.com/v1"
    )
    assert key.base_url == "https://api.example.com/v1"
