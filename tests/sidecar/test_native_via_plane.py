"""Azure classic deployments and the Anthropic Messages API configured through the real
control plane: the admin API stores the target's api-version and deployment, the watch
stream carries them to a sidecar, and the official SDKs get their answers through it."""

from __future__ import annotations

import anthropic
import openai

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from sidecar.server import Sidecar
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.azure import FakeAzure

from .plane import ADMIN_MD, Plane
from .test_reporter import reporter_config


async def test_azure_and_anthropic_configured_through_the_control_plane(plane: Plane) -> None:
    admin = await plane.start()
    async with FakeAzure(deployments={"gpt4o-prod"}) as azure, FakeAnthropic() as claude:
        await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
        for provider, label, base_url in (
            (rpb.PROVIDER_AZURE_OPENAI, "east", azure.url),
            (rpb.PROVIDER_ANTHROPIC, "claude", claude.base_url),
        ):
            await admin.CreateProviderKey(
                apb.CreateProviderKeyRequest(
                    tenant="acme", provider=provider, label=label, secret=f"sk-{label}-0001", base_url=base_url
                ),
                metadata=ADMIN_MD,
            )
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
    assert done.choices[0].message.content == "Hello from the fake upstream!"
    [call] = azure.calls
    assert (call.path, call.api_version, call.api_key) == (
        "/openai/deployments/gpt4o-prod/chat/completions",
        "2024-10-21",
        "sk-east-0001",
    )
    assert message.content[0].type == "text"
    [sent] = claude.messages_requests()
    assert sent.headers["x-api-key"] == "sk-claude-0001" and sent.json["model"] == "claude-sonnet-4-5"
