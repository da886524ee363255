"""sidecar.upload: a multipart body spooled as it arrives (to disk past the in-memory size),
the routing fields read on the way, and the model field swapped in place for a target,
however the body was cut into chunks."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import pytest

from sidecar.asgi import Message
from sidecar.errors import ErrorResponse
from sidecar.upload import SPOOL_IN_MEMORY, Upload, read_upload


def multipart(model: str, audio: bytes, *, stream: str | None = None) -> tuple[bytes, str]:
    """A body as httpx (the openai SDK's transport) encodes it, and its content type."""
    data = {"model": model, **({"stream": stream} if stream is not None else {})}
    request = httpx.Request("POST", "http://x/", data=data, files={"file": ("a.wav", audio, "audio/wav")})
    return request.read(), request.headers["content-type"]


def receiver(body: bytes, size: int) -> object:
    chunks = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]

    async def receive() -> Message:
        return messages.pop(0)

    return receive


async def read(body: bytes, content_type: str, size: int, limit: int = 1 << 30) -> Upload | ErrorResponse | None:
    return await read_upload(receiver(body, size), content_type, limit)  # type: ignore[arg-type]


async def sent(upload: Upload, model: str) -> bytes:
    view = upload.body_for(model)
    out = b"".join([chunk async for chunk in view.chunks()])
    assert len(out) == view.size
    return out


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
async def test_model_swapped_whatever_the_chunks(chunk: int) -> None:
    audio = bytes(range(256)) * 40
    body, content_type = multipart("public-model", audio, stream="true")
    upload = await read(body, content_type, chunk)
    assert isinstance(upload, Upload)
    try:
        assert (upload.model, upload.stream, upload.size) == ("public-model", True, len(body))
        assert await sent(upload, "public-model") == body
        want, _ = multipart("upstream-model-2024", audio, stream="true")
        # Same boundary? httpx makes a new one per request: compare with it swapped in.
        boundary = content_type.split("boundary=")[1].encode()
        other = want.split(b"\r\n", 1)[0][2:]
        assert await sent(upload, "upstream-model-2024") == want.replace(other, boundary)
        assert await sent(upload, "upstream-model-2024") == want.replace(other, boundary)  # again (failover)
    finally:
        upload.close()


async def test_large_upload_is_spooled_to_disk() -> None:
    audio = b"\x01" * (3 * SPOOL_IN_MEMORY)
    body, content_type = multipart("m", audio)
    upload = await read(body, content_type, 65536)
    assert isinstance(upload, Upload)
    try:
        assert upload.file._rolled  # type: ignore[attr-defined]
        assert await sent(upload, "m") == body
    finally:
        upload.close()


@pytest.mark.parametrize(
    ("content_type", "body", "limit", "status", "needle"),
    [
        ("application/json", b"{}", 100, 400, "multipart/form-data"),
        ("multipart/form-data", b"", 100, 400, "boundary"),
        (None, None, 10, 413, "larger than"),
    ],
)
async def test_refused(content_type: str | None, body: bytes | None, limit: int, status: int, needle: str) -> None:
    if body is None:
        body, content_type = multipart("m", b"x" * 100)
    assert content_type is not None
    got = await read(body, content_type, 16, limit)
    assert isinstance(got, ErrorResponse)
    assert got.status == status and needle.encode() in got.body


async def test_missing_model_is_a_400() -> None:
    request = httpx.Request("POST", "http://x/", files={"file": ("a.wav", b"abc", "audio/wav")})
    got = await read(request.read(), request.headers["content-type"], 16)
    assert isinstance(got, ErrorResponse)
    assert got.status == 400 and b'"param":"model"' in got.body


async def test_app_hanging_up_mid_upload() -> None:
    body, content_type = multipart("m", b"x" * 100)
    messages: Sequence[Message] = [
        {"type": "http.request", "body": body[:50], "more_body": True},
        {"type": "http.disconnect"},
    ]
    queue = list(messages)

    async def receive() -> Message:
        return queue.pop(0)

    assert await read_upload(receive, content_type, 1 << 20) is None
