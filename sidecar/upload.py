"""Multipart uploads (``/v1/audio/transcriptions``): spooled as they arrive, streamed upstream.

The app's body is written to a spool (memory up to ``SPOOL_IN_MEMORY`` bytes,
a temporary file past that) while python-multipart's streaming parser reads
the small form fields the sidecar routes by (``model``, ``stream``); file
parts are never held whole in memory. Each attempt then streams the spool to
the upstream (``StreamedBody``) with a Content-Length, so a failover resends
the same bytes. When a target's upstream model differs from the app's, the
``model`` field's value is swapped on the way out (its byte span is known).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from . import errors
from .asgi import Receive, Scope

__all__ = ["SPOOL_IN_MEMORY", "Upload", "content_type_of", "read_upload"]

SPOOL_IN_MEMORY = 1024 * 1024
_READ_SIZE = 64 * 1024
# The form fields read (their values are short); longer values are refused.
_FIELDS = (b"model", b"stream")
_MAX_FIELD = 512


def content_type_of(scope: Scope) -> str:
    """The request's Content-Type header ("" when absent)."""
    for name, value in scope["headers"]:
        if name.lower() == b"content-type":
            return str(value.decode("latin-1"))
    return ""


class _Scan:
    """python-multipart callbacks: the routing fields' values and the model value's byte span."""

    def __init__(self) -> None:
        self.offset = 0  # bytes of the body before the chunk being parsed
        self.chunk = b""
        self.fields: dict[bytes, bytes] = {}
        self.model_span: tuple[int, int] | None = None
        self.too_long = False
        self._header = b""
        self._value = b""
        self._name: bytes | None = None
        self._capture: bytes | None = None
        self._data = bytearray()
        self._span: tuple[int, int] | None = None
        self._span_ok = True

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._name = None
        self._capture = None
        self._header = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            _, params = parse_options_header(self._value)
            if b"filename" not in params:
                self._name = params.get(b"name")
        self._header = self._value = b""

    def _headers_finished(self) -> None:
        name = self._name
        if name in _FIELDS and name not in self.fields:
            self._capture = name
            self._data = bytearray()
            self._span = None
            self._span_ok = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._capture is None:
            return
        if len(self._data) + end - start > _MAX_FIELD:
            self.too_long = True
            self._capture = None
            return
        self._data += data[start:end]
        if data is not self.chunk:  # bytes the parser held back (a boundary look-alike)
            self._span_ok = False
            return
        at, until = self.offset + start, self.offset + end
        if self._span is None:
            self._span = (at, until)
        elif self._span[1] == at:
            self._span = (self._span[0], until)
        else:
            self._span_ok = False

    def _part_end(self) -> None:
        name = self._capture
        if name is None:
            return
        self._capture = None
        self.fields[name] = bytes(self._data)
        if name == b"model":
            self.model_span = self._span if self._span_ok else None


class Upload:
    """A spooled multipart body and what the sidecar read of it; ``close()`` when done."""

    def __init__(self, file: IO[bytes], size: int, content_type: str, scan: _Scan) -> None:
        self.file = file
        self.size = size
        self.content_type = content_type
        self.model = scan.fields.get(b"model", b"").decode("utf-8", "replace").strip()
        self.stream = scan.fields.get(b"stream", b"").strip().lower() == b"true"
        self._span = scan.model_span
        self._views: dict[str, _View] = {}

    def body_for(self, upstream_model: str) -> _View:
        """The body to send to a target serving ``upstream_model``."""
        view = self._views.get(upstream_model)
        if view is None:
            if upstream_model == self.model or self._span is None:
                # No span (held-back bytes): the app's body as it is. Never happens with real clients.
                view = _View(self, None, b"")
            else:
                view = _View(self, self._span, upstream_model.encode())
            self._views[upstream_model] = view
        return view

    def close(self) -> None:
        self.file.close()


class _View:
    """One attempt's body: the spool, with the model value swapped when ``span`` is set."""

    __slots__ = ("_replacement", "_span", "_upload")

    def __init__(self, upload: Upload, span: tuple[int, int] | None, replacement: bytes) -> None:
        self._upload = upload
        self._span = span
        self._replacement = replacement

    @property
    def size(self) -> int:
        span = self._span
        if span is None:
            return self._upload.size
        return self._upload.size - (span[1] - span[0]) + len(self._replacement)

    async def chunks(self) -> AsyncIterator[bytes]:
        file = self._upload.file
        span = self._span
        if span is None:
            async for chunk in _read(file, 0, self._upload.size):
                yield chunk
            return
        async for chunk in _read(file, 0, span[0]):
            yield chunk
        yield self._replacement
        async for chunk in _read(file, span[1], self._upload.size):
            yield chunk


async def _read(file: IO[bytes], start: int, end: int) -> AsyncIterator[bytes]:
    file.seek(start)
    left = end - start
    while left > 0:
        chunk = file.read(min(_READ_SIZE, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


async def read_upload(receive: Receive, content_type: str, limit: int) -> Upload | errors.ErrorResponse | None:
    """Spool and scan the app's multipart body; None when the app hung up meanwhile."""
    media, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        return errors.invalid_request("This endpoint takes a multipart/form-data body (with a boundary).")
    scan = _Scan()
    parser = MultipartParser(boundary, scan.callbacks())  # type: ignore[arg-type]
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                spool.close()
                return None
            chunk: bytes = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    spool.close()
                    return errors.body_too_large(limit)
                spool.write(chunk)
                scan.chunk = chunk
                parser.write(chunk)
                scan.offset = size
            if not message.get("more_body", False):
                break
        parser.finalize()
    except MultipartParseError as exc:
        spool.close()
        return errors.invalid_request(f"Malformed multipart body: {str(exc)[:100]}")
    except BaseException:
        spool.close()
        raise
    if scan.too_long:
        spool.close()
        return errors.invalid_request("A form field the sidecar reads (model, stream) is too long.")
    upload = Upload(spool, size, content_type, scan)
    if not upload.model:
        upload.close()
        return errors.invalid_request("you must provide a model parameter", param="model")
    return upload
