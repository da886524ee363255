"""Bearer-token authentication for the control plane's gRPC services.

``AuthInterceptor`` guards every method: the admin service (and anything not
listed as open) needs the admin token, the sidecar service needs one of the
sidecar tokens, health and reflection are open. Tokens are compared in
constant time and never echoed. The tenant scope of the sidecar token that
authenticated the call reaches the servicer through ``current_sidecar_scope()``
(a context variable set in the call's own task); the identity of the admin
caller (``admin-token:<id>``, plus `` cert:<subject>`` over mTLS; never the
token) reaches it through ``current_caller()``, for the audit log.

Two sources of tokens: the bootstrap ones from the token file or env (given
at start, valid until a restart without them, never revocable through the
API) and the managed ones created through the admin API, held as hashes in
the ``TokenRegistry`` the snapshot hub keeps current from the change log.
A stream opened with a managed sidecar token ends when it is revoked
(``control_plane.revocation``).
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from control_plane.revocation import end_on_revocation
from control_plane.token_registry import TokenRegistry
from keyplane.domain import TokenKind
from keyplane.errors import KeyplaneError

__all__ = [
    "ADMIN_SERVICE_PREFIX",
    "BOOTSTRAP_ADMIN_ID",
    "BOOTSTRAP_TOKEN_ID",
    "OPEN_METHOD_PREFIXES",
    "SIDECAR_SERVICE_PREFIX",
    "AuthInterceptor",
    "Authenticator",
    "PermissionDenied",
    "SidecarScope",
    "bearer_token",
    "client_certificate_subject",
    "current_caller",
    "current_sidecar_scope",
]

ADMIN_SERVICE_PREFIX = "/keyplane.v1.AdminService/"
SIDECAR_SERVICE_PREFIX = "/keyplane.v1.SidecarService/"
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
ALL_TENANTS = "*"
# The id of the admin token given in the configuration (--admin-token-file).
BOOTSTRAP_ADMIN_ID = "bootstrap"
UNKNOWN_CALLER = "unknown"
# Every bootstrap token (token file / env) goes by this id; managed ids start with at_ / st_.
BOOTSTRAP_TOKEN_ID = BOOTSTRAP_ADMIN_ID
_ADMIN_DENIED = "missing or invalid admin token"
_SIDECAR_DENIED = "missing or invalid sidecar token"


class PermissionDenied(KeyplaneError):
    """The caller is authenticated but may not do this (gRPC PERMISSION_DENIED)."""


@dataclass(frozen=True, slots=True)
class SidecarScope:
    """The tenants a sidecar token may watch; None means every tenant.
    ``token_id``: the managed token it came from (None: a bootstrap token)."""

    tenants: frozenset[str] | None
    token_id: str | None = field(default=None, compare=False)

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def resolve(self, requested: Sequence[str]) -> frozenset[str] | None:
        """The tenants a watch of ``requested`` covers (empty: all the token
        may see; None: every tenant, including future ones)."""
        if not requested:
            return self.tenants
        denied = sorted({t for t in requested if not self.allows(t)})
        if denied:
            raise PermissionDenied(f"this sidecar token may not watch tenant(s): {', '.join(denied)}")
        return frozenset(requested)


_current_scope: ContextVar[SidecarScope | None] = ContextVar("keyplane_sidecar_scope", default=None)


def current_sidecar_scope() -> SidecarScope | None:
    """The scope of the sidecar token that authenticated the current call."""
    return _current_scope.get()


_current_caller: ContextVar[str] = ContextVar("keyplane_caller", default=UNKNOWN_CALLER)


def current_caller() -> str:
    """Who makes the current admin call, e.g. ``admin-token:bootstrap`` or
    ``admin-token:bootstrap cert:CN=ops,O=acme``; ``unknown`` when the
    service runs without the ``AuthInterceptor``."""
    return _current_caller.get()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def client_certificate_subject(context: aio.ServicerContext[Any, Any]) -> str | None:
    """The subject of the certificate the caller presented over mTLS (e.g.
    ``CN=sidecar-7,O=acme``), else None. Read it at the start of a handler."""
    auth = context.auth_context()
    for key in ("x509_subject", "x509_common_name"):
        for value in auth.get(key, ()):
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


class Authenticator:
    """Pure token checks (constant-time comparisons against every token):
    the bootstrap tokens given here, then the managed ones in ``registry``."""

    __slots__ = ("_admin", "_registry", "_sidecars")

    def __init__(
        self,
        admin_token: str,
        sidecar_tokens: Mapping[str, Sequence[str]],
        registry: TokenRegistry | None = None,
    ) -> None:
        self._registry = registry
        if not admin_token:
            raise ValueError("the admin token must not be empty")
        self._admin = admin_token.encode()
        sidecars: list[tuple[bytes, SidecarScope]] = []
        for token, tenants in sidecar_tokens.items():
            if not token:
                raise ValueError("a sidecar token must not be empty")
            if not tenants:
                raise ValueError("a sidecar token needs at least one tenant (or '*')")
            scope = SidecarScope(None if ALL_TENANTS in tenants else frozenset(tenants))
            sidecars.append((token.encode(), scope))
        self._sidecars = tuple(sidecars)

    @property
    def registry(self) -> TokenRegistry | None:
        return self._registry

    def is_admin(self, token: str | None) -> bool:
        return self.admin_identity(token) is not None

    def admin_identity(self, token: str | None) -> str | None:
        """``admin-token:<id>`` for an admin token: ``bootstrap`` for the
        configured one, the managed token's id for one created through the
        API; None when ``token`` is not one. The one place that decides who
        an admin is; the identity never contains the token."""
        if token is None:
            return None
        bootstrap = hmac.compare_digest(token.encode(), self._admin)
        managed = self._registry.find(TokenKind.ADMIN, token) if self._registry is not None else None
        if bootstrap:
            return f"admin-token:{BOOTSTRAP_ADMIN_ID}"
        if managed is not None:
            return f"admin-token:{managed.id}"
        return None

    def sidecar_scope(self, token: str | None) -> SidecarScope | None:
        if token is None:
            return None
        presented = token.encode()
        found: SidecarScope | None = None
        for candidate, scope in self._sidecars:  # no early exit: constant work per token
            if hmac.compare_digest(presented, candidate) and found is None:
                found = scope
        managed = self._registry.find(TokenKind.SIDECAR, token) if self._registry is not None else None
        if found is None and managed is not None:
            found = SidecarScope(managed.tenants, token_id=managed.id)
        return found


def _denying_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as ``handler`` that only aborts."""

    async def deny(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, details)

    request_des = handler.request_deserializer
    response_ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, request_des, response_ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, request_des, response_ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, request_des, response_ser)
    return grpc.unary_unary_rpc_method_handler(deny, request_des, response_ser)


class AuthInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if method.startswith(SIDECAR_SERVICE_PREFIX):
            scope = self._auth.sidecar_scope(token)
            if scope is None:
                return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED, _SIDECAR_DENIED)
            # This runs in the call's own task, so the handler sees the value.
            _current_scope.set(scope)
            if scope.token_id is not None and self._auth.registry is not None:
                return end_on_revocation(handler, self._auth.registry, scope.token_id)
            return handler
        identity = self._auth.admin_identity(token)
        if identity is None:
            return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED, _ADMIN_DENIED)
        _current_caller.set(identity)
        return _with_certificate_subject(handler, identity)


def _with_certificate_subject(
    handler: grpc.RpcMethodHandler[Any, Any], identity: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler``, first adding the client certificate's subject (mTLS) to
    the caller's identity: the interceptor has no ``context`` to read it
    from, the handler does (at its start). Unary-unary handlers only (every
    admin method); others keep the token identity alone."""
    behaviour: Any = handler.unary_unary
    if handler.request_streaming or handler.response_streaming or not inspect.iscoroutinefunction(behaviour):
        return handler

    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        subject = client_certificate_subject(context)
        if subject:
            _current_caller.set(f"{identity} cert:{subject}")
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(call, handler.request_deserializer, handler.response_serializer)
