"""The upstream client's TLS and proxies, with certificates made in the test:
``ca_file`` adds to the system's CAs (or replaces them with ``ca_file_only``),
a hostname mismatch is refused, HTTP(S)_PROXY / NO_PROXY with ``trust_env``."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from sidecar.upstream import (
    UpstreamClient,
    UpstreamConnectError,
    UpstreamRequest,
    UpstreamTimeout,
    UpstreamTlsError,
    make_ssl_context,
)
from tests.fakes.raw_http import RawServer, read_request, response
from tests.fakes.tls import Pki, make_pki


async def answer_each(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (request := await server.request(reader)) is not None:
        writer.write(response(200, b"echo:" + request.body))
        await writer.drain()


def server_tls(pki: Pki, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), label: str = "server") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*pki.server(hosts, label=label))
    return context


async def started(**kw: object) -> UpstreamClient:
    values: dict[str, object] = {"connect_timeout": 2.0, "read_timeout": 5.0, "total_timeout": 10.0, **kw}
    client = UpstreamClient(**values)  # type: ignore[arg-type]
    await client.start()
    return client


async def fetch(client: UpstreamClient, url: str, body: bytes = b"x") -> bytes:
    reply = await client.send(UpstreamRequest(url + "/v1/chat/completions", {"content-type": "application/json"}), body)
    try:
        return await reply.read(1000)
    finally:
        reply.release()


async def test_ca_file_adds_to_the_system_cas_and_ca_file_only_replaces_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = make_pki(tmp_path / "system", "system")
    private = make_pki(tmp_path / "private", "private")
    # What the system trusts: OpenSSL reads SSL_CERT_FILE for the default verify paths.
    monkeypatch.setenv("SSL_CERT_FILE", str(system.ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with (
        RawServer(answer_each, tls=server_tls(system)) as public_site,
        RawServer(answer_each, tls=server_tls(private)) as private_site,
    ):
        plain = await started()
        adding = await started(ca_file=str(private.ca_file))
        only = await started(ca_file=str(private.ca_file), ca_file_only=True)
        try:
            assert await fetch(plain, public_site.url) == b"echo:x"
            with pytest.raises(UpstreamTlsError, match=r"TLS handshake with 127\.0\.0\.1"):
                await fetch(plain, private_site.url)
            assert await fetch(adding, public_site.url) == b"echo:x"
            assert await fetch(adding, private_site.url) == b"echo:x"
            with pytest.raises(UpstreamTlsError):
                await fetch(only, public_site.url)
            assert await fetch(only, private_site.url) == b"echo:x"
        finally:
            for client in (plain, adding, only):
                await client.close()
    with pytest.raises(ValueError, match="ca_file_only needs a ca_file"):
        make_ssl_context(None, ca_file_only=True)


async def test_a_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, "ca")
    async with RawServer(answer_each, tls=server_tls(pki, ("upstream.example",), label="other")) as server:
        client = await started(ca_file=str(pki.ca_file))
        try:
            with pytest.raises(UpstreamTlsError, match="SSLCertVerificationError"):
                await fetch(client, server.url)
            assert server.requests == []  # nothing was sent
        finally:
            await client.close()


async def test_connect_timeout_covers_the_tls_handshake() -> None:
    async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    client = await started(connect_timeout=0.2)
    try:
        async with RawServer(silent) as server:
            loop = asyncio.get_running_loop()
            begun = loop.time()
            with pytest.raises(UpstreamTimeout):
                await fetch(client, f"https://127.0.0.1:{server.port}")
            assert 0.15 < loop.time() - begun < 1.5
    finally:
        await client.close()


class ForwardProxy:
    """An HTTP proxy: absolute-form requests are forwarded, CONNECT opens a tunnel.
    It asks for credentials when ``credentials`` is set, and keeps what it was asked."""

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials
        self.seen: list[str] = []
        self.server = RawServer(self._handle)

    async def _handle(self, server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if request is None:
            return
        self.seen.append(request.request_line)
        if self.credentials is not None and request.header("proxy-authorization") != self.credentials:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return
        method, target, _ = request.request_line.split(" ")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:
            host_port = target.split("/")[2]
            host, port = host_port.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            path = "/" + target.split("/", 3)[3]
            kept = b"\r\n".join(
                line for line in request.head.split(b"\r\n")[1:] if not line.lower().startswith(b"proxy-")
            )
            up_writer.write(f"{method} {path} HTTP/1.1\r\n".encode() + kept + b"\r\n\r\n" + request.body)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)


async def test_trust_env_goes_through_the_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = make_pki(tmp_path, "ca")
    proxy = ForwardProxy(credentials="Basic dXNlcjpwIHc=")  # user:p w
    async with (
        proxy.server,
        RawServer(answer_each) as plain,
        RawServer(answer_each, tls=server_tls(pki)) as tls,
    ):
        monkeypatch.setenv("HTTP_PROXY", f"http://user:p%20w@127.0.0.1:{proxy.server.port}")
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:p%20w@127.0.0.1:{proxy.server.port}")
        monkeypatch.setenv("NO_PROXY", "bypassed.example")
        through = await started(trust_env=True, ca_file=str(pki.ca_file))
        direct = await started(trust_env=False)
        try:
            for url, body in ((plain.url, b"plain"), (f"https://localhost:{tls.port}", b"tunnelled")):
                for _ in range(2):
                    assert await fetch(through, url, body) == b"echo:" + body
            assert proxy.seen == [
                f"POST http://127.0.0.1:{plain.port}/v1/chat/completions HTTP/1.1",
                f"CONNECT localhost:{tls.port} HTTP/1.1",
            ]
            # Through the tunnel the upstream sees the request as if sent directly.
            assert tls.requests[0].request_line == "POST /v1/chat/completions HTTP/1.1"
            assert tls.requests[0].header("proxy-authorization") is None
            assert await fetch(direct, plain.url) == b"echo:x"
            assert len(proxy.seen) == 2
        finally:
            await through.close()
            await direct.close()
        proxy.credentials = "Basic wrong"
        refused = await started(trust_env=True, ca_file=str(pki.ca_file))
        try:
            with pytest.raises(UpstreamConnectError, match=r"the proxy refused the tunnel \(407\)"):
                await fetch(refused, f"https://localhost:{tls.port}")
        finally:
            await refused.close()
