"""The opt-in access log, and no per-request log line at the default level."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from sidecar.access_log import AccessEntry, AccessLog, access_line
from sidecar.server import Sidecar
from tests.fakes.upstream import RATE_LIMITED, FakeUpstream, Reply

from .conftest import PUBLIC_MODEL, TENANT, auth, sidecar_config, standard_snapshot

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def _lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def test_one_json_line_per_chat_request(upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]) -> None:
    async with Sidecar(sidecar_config(access_log="-"), watch=False) as sc:
        capsys.readouterr()
        sc.state.apply(standard_snapshot(upstream, secrets=("sk-one", "sk-two")))
        async with httpx.AsyncClient(base_url=sc.url, timeout=20.0) as client:
            ok = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
            unknown = await client.post(CHAT, json={"model": "nope", "messages": MESSAGES}, headers=auth())
            denied = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES})
            upstream.replies["sk-two"] = RATE_LIMITED
            # The rotation is at k2 now: k2 is rate limited, k1 answers.
            fallback = await client.post(
                CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES, "stream": True}, headers=auth()
            )
            await client.get("/healthz")  # not a chat request: no line
    assert (ok.status_code, unknown.status_code, denied.status_code, fallback.status_code) == (200, 404, 401, 200)
    out = capsys.readouterr().out
    assert "sk-one" not in out and "sk-two" not in out
    first, second, third, fourth = _lines(out)
    assert first["request_id"] == ok.headers["x-keyplane-request-id"]
    assert {k: v for k, v in first.items() if k not in ("ts", "request_id", "latency_ms")} == {
        "tenant": TENANT,
        "model": PUBLIC_MODEL,
        "status": 200,
        "attempts": 1,
        "provider": "openai",
        "key_id": "k1",
    }
    assert isinstance(first["latency_ms"], float | int) and first["latency_ms"] >= 0
    assert (second["tenant"], second["model"], second["status"], second["attempts"]) == (TENANT, "nope", 404, 0)
    assert (second["provider"], second["key_id"], second["request_id"]) == ("", "", "")
    assert (third["tenant"], third["status"]) == ("", 401)
    assert (fourth["status"], fourth["attempts"], fourth["key_id"]) == (200, 2, "k1")
    assert fourth["request_id"] == fallback.headers["x-keyplane-request-id"]


async def test_no_access_log_and_no_info_line_per_request_by_default(
    sidecar: Sidecar,
    client: httpx.AsyncClient,
    upstream: FakeUpstream,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())  # warm
    capsys.readouterr()
    caplog.clear()
    caplog.set_level(logging.INFO)
    for stream in (False, True, False):
        r = await client.post(
            CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES, "stream": stream}, headers=auth()
        )
        assert r.status_code == 200
    upstream.replies["sk-one"] = Reply(400, {"error": {"message": "bad", "type": "invalid_request_error"}})
    r = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
    assert r.status_code == 400  # the app's own error, passed through
    assert [rec.getMessage() for rec in caplog.records if rec.name.startswith("sidecar")] == []
    assert capsys.readouterr().out == ""


def test_access_line_is_compact_json_without_secrets() -> None:
    entry = AccessEntry(started=0.0, request_id="req-1", tenant="acme", model="m", attempts=2, key_id="k9")
    line = access_line(entry, 502, 12.345, 1700000000.0)
    assert "\n" not in line and " " not in line
    assert json.loads(line) == {
        "ts": 1700000000.0,
        "request_id": "req-1",
        "tenant": "acme",
        "model": "m",
        "status": 502,
        "attempts": 2,
        "provider": "",
        "key_id": "k9",
        "latency_ms": 12.35,
    }


def test_access_line_escapes_what_the_app_chose() -> None:
    entry = AccessEntry(started=0.0, tenant="acme", model='gpt"}\n{"status":1 é')
    assert json.loads(access_line(entry, 404, 0.0, 0.0))["model"] == 'gpt"}\n{"status":1 é'


async def test_access_log_to_a_file(upstream: FakeUpstream, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    path.write_text('{"earlier":true}\n')
    for _ in range(2):  # the file is closed at stop and appended to by the next start
        async with Sidecar(sidecar_config(access_log=str(path)), watch=False) as sc:
            sc.state.apply(standard_snapshot(upstream))
            async with httpx.AsyncClient(base_url=sc.url, timeout=20.0) as client:
                r = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
                assert r.status_code == 200
    earlier, *lines = _lines(path.read_text())
    assert earlier == {"earlier": True}
    assert [(line["status"], line["key_id"]) for line in lines] == [(200, "k1"), (200, "k1")]
    assert "sk-one" not in path.read_text()


def test_access_log_needs_exactly_one_destination() -> None:
    with pytest.raises(ValueError, match="stream or a path"):
        AccessLog()
