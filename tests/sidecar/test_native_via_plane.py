"""Azure classic deployments and the Anthropic Messages API configured through the real
control plane: the admin API stores the target's api-version and deployment, the watch
stream carries them to a sidecar, and the official SDKs get their answers through it; an
anthropic key's 401 on /v1/messages reaches the control plane's health for the fleet."""

from __future__ import annotations

import anthropic
import openai

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from sidecar.server import Sidecar
from tests.fakes.anthropic import ANTHROPIC_INVALID_KEY, FakeAnthropic
from tests.fakes.azure import FakeAzure

from .plane import ADMIN_MD, Plane, eventually
from .test_reporter import reporter_config


async def test_azure_and_anthropic_configured_through_the_control_plane(plane: Plane) -> None:
    admin = await plane.start()
    async with FakeAzure(deployments={"gpt4o-prod"}) as azure, FakeAnthropic() as claude:
        await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
        claude.program("sk-revoked-0001", ANTHROPIC_INVALID_KEY)
        ids: dict[str, str] = {}
        for provider, label, base_url, weight in (
            (rpb.PROVIDER_AZURE_OPENAI, "east", azure.url, 1),
            # Tried first (heavier), and Anthropic says its key is invalid.
            (rpb.PROVIDER_ANTHROPIC, "revoked", claude.base_url, 100),
            (rpb.PROVIDER_ANTHROPIC, "claude", claude.base_url, 1),
        ):
            created = await admin.CreateProviderKey(
                apb.CreateProviderKeyRequest(
                    tenant="acme",
                    provider=provider,
                    label=label,
                    secret=f"sk-{label}-0001",
                    base_url=base_url,
                    weight=weight,
                ),
                metadata=ADMIN_MD,
            )
            ids[label] = created.key.id
        classic = rpb.RouteTarget(
            provider=rpb.PROVIDER_AZURE_OPENAI,
            upstream_model="gpt-4o",
            api_version="2024-10-21",
            deployment="gpt4o-prod",
        )
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="gpt-4o", targets=[classic]), metadata=ADMIN_MD
        )
        sonnet = rpb.RouteTarget(provider=rpb.PROVIDER_ANTHROPIC, upstream_model="claude-sonnet-4-5")
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="claude", targets=[sonnet]), metadata=ADMIN_MD
        )
        token = (
            await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD)
        ).token
        async with Sidecar(reporter_config(plane.address, sidecar_id="sc-native")) as sc:
            assert await sc.wait_ready(10)
            async with openai.AsyncOpenAI(api_key=token, base_url=f"{sc.url}/v1", max_retries=0) as oai:
                done = await oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            async with anthropic.AsyncAnthropic(api_key=token, base_url=sc.url, max_retries=0) as ant:
                message = await ant.messages.create(
                    model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
                )

            async def marked_invalid() -> bool:
                health = await admin.GetHealth(apb.GetHealthRequest(tenant="acme"), metadata=ADMIN_MD)
                return any(
                    h.key_id == ids["revoked"]
                    and h.state == rpb.HEALTH_STATE_UNHEALTHY
                    and "authentication_error" in h.reason
                    for h in health.key_health
                )

            await eventually(marked_invalid, within=10)
    assert done.choices[0].message.content == "Hello from the fake upstream!"
    [call] = azure.calls
    assert (call.path, call.api_version, call.api_key) == (
        "/openai/deployments/gpt4o-prod/chat/completions",
        "2024-10-21",
        "sk-east-0001",
    )
    assert message.content[0].type == "text"
    assert claude.api_keys() == ["sk-revoked-0001", "sk-claude-0001"]
    assert claude.messages_requests()[-1].json["model"] == "claude-sonnet-4-5"
