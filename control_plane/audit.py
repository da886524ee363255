"""The audit log of admin writes: what the admin service records and how it
is read back (``ListAuditEvents``).

Each write RPC is decorated with ``@audited(kind)``, which reads the
caller's identity (``auth.current_caller()``) at the start of the call and
hands the handler an ``AuditDraft``. The handler fills in the resource and
the changed fields as it learns them and runs its store write through
``draft.write(...)``, which passes the finished ``AuditEntry`` to the store:
the event is inserted in the write's own transaction, so a change without its
audit row cannot commit. A call that fails before its write committed is
recorded too, with the status code as its result, in a transaction of its
own, best effort (a failure to record it is logged; one that failed because
the store is unavailable is only logged). Unauthenticated calls never reach
a handler and are not recorded.

Never recorded: a secret, a token, a field's value. A key creation or
rotation records the new secret's fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from grpc import aio

from control_plane import validation as v
from control_plane.auth import current_caller
from control_plane.status import status_for
from control_plane.store.base import AuditEntry, AuditEvent, AuditQuery, Store
from keyplane import convert
from keyplane.errors import InvalidArgument
from keyplane.v1 import admin_service_pb2 as pb
from keyplane.v1 import resources_pb2

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "RESULT_OK",
    "AuditDraft",
    "audit_event_to_proto",
    "audited",
    "list_audit_events",
]

log = logging.getLogger(__name__)

Context = aio.ServicerContext[Any, Any]
RESULT_OK = "ok"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_KIND = re.compile(r"[a-z][a-z0-9_]{0,62}")
_TOKEN_PREFIX = "a1:"

_T = TypeVar("_T")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class AuditDraft:
    """The audit event of one write call, filled in as the handler goes."""

    __slots__ = ("caller", "fields", "fingerprint", "kind", "method", "recorded", "resource_id", "tenant", "time")

    def __init__(self, caller: str, method: str, kind: str, time: datetime) -> None:
        self.caller = caller
        self.method = method
        self.kind = kind
        self.time = time
        self.tenant = ""
        self.resource_id = ""
        self.fields: tuple[str, ...] = ()
        self.fingerprint = ""
        self.recorded = False  # the write (and with it this event) committed

    def about(self, tenant: str, resource_id: str, fields: tuple[str, ...] = (), fingerprint: str = "") -> None:
        self.tenant, self.resource_id, self.fields, self.fingerprint = tenant, resource_id, fields, fingerprint

    def entry(self, result: str = RESULT_OK) -> AuditEntry:
        return AuditEntry(
            time=self.time,
            caller=self.caller,
            method=self.method,
            tenant=self.tenant,
            resource_kind=self.kind,
            resource_id=self.resource_id,
            fields=self.fields,
            fingerprint=self.fingerprint,
            result=result,
        )

    async def write(self, call: Callable[[AuditEntry], Awaitable[_T]]) -> _T:
        """Run the store write ``call(entry)``; once it returns, the event
        is recorded (it committed with the change)."""
        result = await call(self.entry())
        self.recorded = True
        return result


class _Audited(Protocol):
    _store: Store
    _clock: Callable[[], datetime]


_S = TypeVar("_S", bound=_Audited)


def result_name(exc: BaseException) -> str:
    """The result of a failed call: its gRPC status code name."""
    mapped = status_for(exc)
    return mapped[0].name if mapped is not None else "INTERNAL"


def audited(
    kind: str,
) -> Callable[
    [Callable[[_S, _Req, Context, AuditDraft], Awaitable[_Resp]]],
    Callable[[_S, _Req, Context], Awaitable[_Resp]],
]:
    """Decorate an admin write handler ``(self, request, context, draft)``
    about resources of ``kind``; put it under ``@map_errors``."""

    def decorate(
        method: Callable[[_S, _Req, Context, AuditDraft], Awaitable[_Resp]],
    ) -> Callable[[_S, _Req, Context], Awaitable[_Resp]]:
        name = method.__name__

        @functools.wraps(method)
        async def wrapper(self: _S, request: _Req, context: Context) -> _Resp:
            draft = AuditDraft(current_caller(), name, kind, self._clock())
            try:
                return await method(self, request, context, draft)
            except Exception as exc:
                if not draft.recorded:
                    await _record_failure(self._store, draft, result_name(exc))
                raise

        return wrapper

    return decorate


async def _record_failure(store: Store, draft: AuditDraft, result: str) -> None:
    if result == "UNAVAILABLE":
        # The store cannot be reached: recording would only wait out its timeout again.
        log.warning("could not record the failed %s call (%s): the store is unavailable", draft.method, result)
        return
    try:
        await store.append_audit(draft.entry(result))
    except Exception as exc:
        log.error("could not record the failed %s call (%s) in the audit log: %s", draft.method, result, exc)


# reading --------------------------------------------------------------------


def _filters_digest(query: AuditQuery) -> str:
    """Binds a page token to the filters it was issued for (AIP-158)."""
    text = repr((query.tenant, query.resource_kind, query.resource_id, query.start, query.end))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _page_token(before_id: int, query: AuditQuery) -> str:
    raw = f"{_TOKEN_PREFIX}{before_id}:{_filters_digest(query)}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _before_id(token: str, query: AuditQuery) -> int:
    invalid = "page_token: not a token this API returned; start again without it"
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument(invalid) from None
    if not raw.startswith(_TOKEN_PREFIX):
        raise InvalidArgument(invalid)
    number, _, digest = raw[len(_TOKEN_PREFIX) :].partition(":")
    if not number.isdigit():
        raise InvalidArgument(invalid)
    if digest != _filters_digest(query):
        raise InvalidArgument("page_token: the filters changed since the previous page; start again without it")
    return int(number)


def _query(request: pb.ListAuditEventsRequest) -> AuditQuery:
    if request.page_size < 0:
        raise InvalidArgument("page_size must not be negative")
    limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    kind = request.resource_kind or None
    if kind is not None and _KIND.fullmatch(kind) is None:
        raise InvalidArgument("resource_kind is not a resource kind (e.g. provider_key)")
    start = convert.datetime_from_timestamp(request.start_time) if request.HasField("start_time") else None
    end = convert.datetime_from_timestamp(request.end_time) if request.HasField("end_time") else None
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("end_time must be after start_time")
    return AuditQuery(
        limit=limit,
        tenant=v.validate_tenant_name(request.tenant) if request.tenant else None,
        resource_kind=kind,
        resource_id=v.validate_id(request.resource_id, field="resource_id") if request.resource_id else None,
        start=start,
        end=end,
    )


async def list_audit_events(store: Store, request: pb.ListAuditEventsRequest) -> pb.ListAuditEventsResponse:
    query = _query(request)
    if request.page_token:
        query = replace(query, before_id=_before_id(request.page_token, query))
    # One more than asked: whether there is a next page.
    events = await store.list_audit_events(replace(query, limit=query.limit + 1))
    page = events[: query.limit]
    more = len(events) > query.limit
    return pb.ListAuditEventsResponse(
        events=[audit_event_to_proto(e) for e in page],
        next_page_token=_page_token(page[-1].id, query) if more else "",
    )


def audit_event_to_proto(event: AuditEvent) -> resources_pb2.AuditEvent:
    entry = event.entry
    return resources_pb2.AuditEvent(
        id=event.id,
        time=convert.timestamp_from_datetime(entry.time),
        caller=entry.caller,
        method=entry.method,
        tenant=entry.tenant,
        resource_kind=entry.resource_kind,
        resource_id=entry.resource_id,
        fields=list(entry.fields),
        fingerprint=entry.fingerprint,
        result=entry.result,
    )
