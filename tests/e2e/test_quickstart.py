"""The README's user journey, end to end, through the real ``keyplane`` command.

``keyplane up`` (control plane on SQLite + one sidecar) and a second
``keyplane sidecar`` run as subprocesses; the admin CLI runs as a subprocess
against the gRPC admin API; the official ``openai`` SDK talks to the
sidecars; the provider is a real local HTTP server.
"""

from __future__ import annotations

import asyncio
import re
import stat
import time

import httpx
import openai
import pytest

from tests.e2e.deployment import Deployment
from tests.e2e.processes import child_env, cli, start
from tests.fakes.upstream import FakeUpstream

SECRET_1 = "sk-upstream-first-key-0001"
SECRET_2 = "sk-upstream-second-key-0002"


async def _configure(dep: Deployment, upstream: FakeUpstream) -> tuple[str, str]:
    """Steps 2 of the README: tenant, key, route, client key. Returns (key id, client token)."""
    await dep.ok("tenants", "create", "acme")
    added = await dep.ok(
        "keys",
        "add",
        "-t",
        "acme",
        "-p",
        "openai_compatible",
        "-l",
        "first",
        "--base-url",
        upstream.base_url,
        "--secret-stdin",
        stdin=SECRET_1 + "\n",
    )
    key_id = re.search(r"(pk_\S+)", added)
    assert key_id, added
    await dep.ok("routes", "add", "-t", "acme", "-m", "gpt-test", "--target", "openai_compatible:upstream-model")
    issued = await dep.ok("client-keys", "create", "-t", "acme", "-l", "my-app")
    token = re.search(r"token \(shown once.*\): (\S+)", issued)
    assert token, issued
    return key_id.group(1), token.group(1)


async def _wait_until_served(base_url: str, token: str, model: str = "gpt-test") -> None:
    """The sidecar learns the config over the watch stream; wait until it serves it."""
    deadline = time.monotonic() + 5
    async with httpx.AsyncClient() as client:
        while True:
            resp = await client.get(f"{base_url}/models", headers={"authorization": f"Bearer {token}"})
            if resp.status_code == 200 and any(m["id"] == model for m in resp.json()["data"]):
                return
            assert time.monotonic() < deadline, f"sidecar never served {model}: {resp.status_code} {resp.text}"
            await asyncio.sleep(0.05)


async def test_quickstart_with_the_openai_sdk(deployment: Deployment, upstream: FakeUpstream) -> None:
    dep = deployment
    # Step 1: the embedded default made its credentials private.
    for name in ("master.key", "admin.token", "sidecar.token"):
        assert stat.S_IMODE((dep.home / name).stat().st_mode) == 0o600, name
    assert (dep.home / "keyplane.db").exists()

    _, token = await _configure(dep, upstream)
    await _wait_until_served(dep.sidecar_url, token)

    # Step 3: plain and streaming completions through the official SDK.
    async with openai.AsyncOpenAI(base_url=dep.sidecar_url, api_key=token, max_retries=0) as client:
        reply = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hello from the fake upstream!"

        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(pieces) == "Hello from the fake upstream!"
        assert len([p for p in pieces if p]) == len(upstream.chunks)

        models = await client.models.list()
        assert [m.id for m in models.data] == ["gpt-test"]

        # A wrong client key is refused in OpenAI's error shape.
        async with openai.AsyncOpenAI(base_url=dep.sidecar_url, api_key="kp-wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])

    # The upstream saw the provider secret, the upstream model name, never the client key.
    seen = upstream.chat_requests()
    assert len(seen) == 2
    for request in seen:
        assert request.secret == SECRET_1
        assert request.json["model"] == "upstream-model"
        assert token not in str(request.headers)

    # The secret never appears in what the admin API returns, nor in the logs.
    listing = await dep.ok("keys", "list", "-t", "acme", "--json")
    assert SECRET_1 not in listing and SECRET_1[-4:] in listing
    assert SECRET_1 not in dep.up.output


async def test_disable_and_delete_reach_every_sidecar_within_a_second(
    deployment: Deployment, upstream: FakeUpstream
) -> None:
    dep = deployment
    first_id, token = await _configure(dep, upstream)
    added = await dep.ok(
        "keys",
        "add",
        "-t",
        "acme",
        "-p",
        "openai_compatible",
        "-l",
        "second",
        "--base-url",
        upstream.base_url,
        "--secret-stdin",
        stdin=SECRET_2 + "\n",
    )
    second = re.search(r"(pk_\S+)", added)
    assert second
    second_id = second.group(1)

    other = await start(
        ["sidecar", "--control-plane", dep.grpc_target, "--port", "0"], dep.env, r"sidecar listening on http://"
    )
    try:
        other_url = other.find(r"(http://\S+/v1)").group(1)
        sidecars = [dep.sidecar_url, other_url]
        for url in sidecars:
            await _wait_until_served(url, token)

        async def secrets_used(url: str, count: int) -> set[str | None]:
            before = len(upstream.chat_requests())
            async with openai.AsyncOpenAI(base_url=url, api_key=token, max_retries=0) as client:
                for _ in range(count):
                    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
            return {r.secret for r in upstream.chat_requests()[before:]}

        # Both keys are in rotation on both sidecars.
        for url in sidecars:
            assert await secrets_used(url, 6) == {SECRET_1, SECRET_2}

        await dep.ok("keys", "disable", "-t", "acme", first_id)
        await asyncio.sleep(1.0)
        for url in sidecars:
            assert await secrets_used(url, 6) == {SECRET_2}

        await dep.ok("keys", "enable", "-t", "acme", first_id)
        await dep.ok("keys", "delete", "-t", "acme", second_id)
        await asyncio.sleep(1.0)
        for url in sidecars:
            assert await secrets_used(url, 6) == {SECRET_1}

        # With no usable key left the app gets a clear OpenAI-shaped error, not a hang.
        await dep.ok("keys", "disable", "-t", "acme", first_id)
        await asyncio.sleep(1.0)
        before = len(upstream.chat_requests())
        async with httpx.AsyncClient() as client:
            for url in sidecars:
                resp = await client.post(
                    f"{url}/chat/completions",
                    headers={"authorization": f"Bearer {token}"},
                    json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]},
                )
                assert resp.status_code == 503
                assert resp.headers["content-type"].startswith("application/json")
                assert resp.json() == {
                    "error": {
                        "message": "No usable provider key for model 'gpt-test': "
                        "openai_compatible: every key is disabled.",
                        "type": "upstream_error",
                        "param": "model",
                        "code": "no_usable_key",
                        "reason": "disabled",
                        "providers": ["openai_compatible"],
                    }
                }
                assert resp.headers["x-should-retry"] == "false"
        # Said without trying the disabled key upstream.
        assert len(upstream.chat_requests()) == before
    finally:
        assert await other.stop() == 0, other.output


async def test_admin_cli_reports_bad_input_clearly(deployment: Deployment, upstream: FakeUpstream) -> None:
    dep = deployment
    await dep.ok("tenants", "create", "acme")
    duplicate = await dep.cli("tenants", "create", "acme")
    assert duplicate.code == 1 and "ALREADY_EXISTS" in duplicate.stderr

    no_tenant = await dep.cli(
        "keys", "add", "-t", "nope", "-p", "openai", "-l", "x", "--secret-stdin", stdin="sk-abcdefgh1234\n"
    )
    assert no_tenant.code == 1 and "NOT_FOUND" in no_tenant.stderr and "sk-abcdefgh1234" not in no_tenant.stderr

    bad_url = await dep.cli(
        "keys",
        "add",
        "-t",
        "acme",
        "-p",
        "openai_compatible",
        "-l",
        "x",
        "--base-url",
        "ftp://nowhere",
        "--secret-stdin",
        stdin="sk-abcdefgh1234\n",
    )
    assert bad_url.code == 1 and "INVALID_ARGUMENT" in bad_url.stderr and "base_url" in bad_url.stderr

    empty_secret = await dep.cli("keys", "add", "-t", "acme", "-p", "openai", "-l", "x", "--secret-stdin", stdin="\n")
    assert empty_secret.code == 1 and "INVALID_ARGUMENT" in empty_secret.stderr

    unknown_provider = await dep.cli("keys", "add", "-t", "acme", "-p", "nosuch", "-l", "x", "--secret-stdin")
    assert unknown_provider.code == 2 and "unknown provider" in unknown_provider.stderr

    wrong_token = await cli(
        ["tenants", "list", "--server", dep.grpc_target], child_env(dep.home, {"KEYPLANE_ADMIN_TOKEN": "kpa-wrong"})
    )
    assert wrong_token.code == 1 and "UNAUTHENTICATED" in wrong_token.stderr

    # Nothing was half-written by the failures.
    assert "(no keys)" in await dep.ok("keys", "list", "-t", "acme")
