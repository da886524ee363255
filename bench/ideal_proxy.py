"""The ideal pass-through proxy: the least a Python proxy can do (the baseline).

Raw ASGI on uvicorn (httptools, uvloop) + one aiohttp ClientSession: read the
body, POST it unchanged to the upstream, pass status, content type and body
back (streamed chunk by chunk when the upstream streams). No auth, no routing,
no JSON parsing, no metrics.

    python -m bench.ideal_proxy --upstream http://127.0.0.1:8900 --port 8901
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

Message = MutableMapping[str, Any]


class IdealProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Message]], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":
            return
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {"content-type": "application/json"}
        async with self.session.post(self.upstream + scope["path"], data=body, headers=headers) as response:
            out = [(b"content-type", response.headers.get("content-type", "application/json").encode())]
            if response.content_length is not None:
                data = await response.read()
                out.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": response.status, "headers": out})
                await send({"type": "http.response.body", "body": data})
                return
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


def serve(app: Any, sock: socket.socket) -> None:
    """Run an ASGI app on ``sock`` the way the ideal proxy runs: uvicorn with
    httptools on uvloop, nothing else per request (also ``bench.client_stack``)."""
    import uvicorn
    import uvloop

    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="off",
        log_level="warning",
        log_config=None,
        access_log=False,
        server_header=False,
        backlog=4096,
    )
    uvloop.run(uvicorn.Server(config).serve(sockets=[sock]))


def main(argv: list[str] | None = None) -> int:
    from bench.fake_upstream import bind

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8900")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8901, help="0 picks a free port (printed at startup)")
    args = parser.parse_args(argv)
    sock = bind(args.host, args.port)
    print(f"ideal proxy listening on http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
    serve(IdealProxy(args.upstream), sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
