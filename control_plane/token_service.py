"""The admin API's token RPCs: create, list and revoke admin and sidecar tokens.

``TokenAdminMixin`` is mixed into ``AdminService`` (the RPCs belong to that
service; they live here to keep it small). A token is ``kpa-`` (admin) or
``kps-`` (sidecar) and 43 URL-safe characters (32 random bytes); Create
returns it once, the store keeps its SHA-256 and its first 10 characters.
Each write is audited like every admin write (resource kind
``admin_token`` / ``sidecar_token``, tenant "", the token's fingerprint on
create, never the token) and goes through the store (one change row) and is
then followed by
the hub, which updates the token registry the Authenticator consults: on
this replica before the RPC answers, on the others through the change log.

The bootstrap tokens (token file, env) are not in the store: they are not
listed, and ``bootstrap`` is refused as an id to revoke with a message
saying how to retire them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

from grpc import aio

from control_plane import validation as v
from control_plane.admin_base import AdminBase
from control_plane.audit import AuditDraft, audited
from control_plane.auth import BOOTSTRAP_TOKEN_ID
from control_plane.status import map_errors
from control_plane.token_registry import token_sha256
from keyplane import convert
from keyplane.crypto import fingerprint
from keyplane.domain import AccessToken, TokenKind
from keyplane.errors import InvalidArgument
from keyplane.ids import ADMIN_TOKEN_PREFIX, SIDECAR_TOKEN_PREFIX, new_id
from keyplane.v1 import admin_service_pb2 as pb
from keyplane.v1 import resources_pb2

__all__ = [
    "ADMIN_TOKEN_VALUE_PREFIX",
    "MAX_TOKEN_TENANTS",
    "SIDECAR_TOKEN_VALUE_PREFIX",
    "TokenAdminMixin",
    "admin_token_to_proto",
    "new_token",
    "sidecar_token_to_proto",
]

log = logging.getLogger(__name__)

Context = aio.ServicerContext[Any, Any]
ADMIN_TOKEN_VALUE_PREFIX = "kpa-"
SIDECAR_TOKEN_VALUE_PREFIX = "kps-"
PREFIX_CHARS = 10
MAX_TOKEN_TENANTS = 1000

_BOOTSTRAP_HINT = {
    TokenKind.ADMIN: (
        "the bootstrap admin token (--admin-token-file / KEYPLANE_ADMIN_TOKEN) cannot be revoked through the API; "
        "replace it in the file or environment and restart the replicas"
    ),
    TokenKind.SIDECAR: (
        "the bootstrap sidecar tokens (--sidecar-tokens-file / KEYPLANE_SIDECAR_TOKEN) cannot be revoked through "
        "the API; remove them from the file or environment and restart the replicas"
    ),
}


def new_token(kind: TokenKind) -> str:
    """A fresh token: ``kpa-`` / ``kps-`` and 43 URL-safe characters."""
    prefix = ADMIN_TOKEN_VALUE_PREFIX if kind is TokenKind.ADMIN else SIDECAR_TOKEN_VALUE_PREFIX
    return prefix + secrets.token_urlsafe(32)


def admin_token_to_proto(token: AccessToken) -> resources_pb2.AdminToken:
    """The admin view: the prefix only, never the token or its hash."""
    message = resources_pb2.AdminToken(
        id=token.id,
        label=token.label,
        prefix=token.prefix,
        create_time=convert.timestamp_from_datetime(token.created_at),
        etag=convert.etag_from_revision(token.revision),
    )
    if token.revoked_at is not None:
        message.revoke_time.CopyFrom(convert.timestamp_from_datetime(token.revoked_at))
    return message


def sidecar_token_to_proto(token: AccessToken) -> resources_pb2.SidecarToken:
    message = resources_pb2.SidecarToken(
        id=token.id,
        label=token.label,
        prefix=token.prefix,
        tenants=sorted(token.tenants or ()),
        all_tenants=token.tenants is None,
        create_time=convert.timestamp_from_datetime(token.created_at),
        etag=convert.etag_from_revision(token.revision),
    )
    if token.revoked_at is not None:
        message.revoke_time.CopyFrom(convert.timestamp_from_datetime(token.revoked_at))
    return message


def _scope(tenants: Sequence[str], all_tenants: bool) -> tuple[str, ...] | None:
    if all_tenants:
        if tenants:
            raise InvalidArgument("tenants: give tenants or all_tenants, not both")
        return None
    if not tenants:
        raise InvalidArgument("tenants: a sidecar token needs at least one tenant (or all_tenants)")
    if len(tenants) > MAX_TOKEN_TENANTS:
        raise InvalidArgument(f"tenants: at most {MAX_TOKEN_TENANTS} tenants per token")
    return tuple(sorted({v.validate_tenant_name(t, field="tenants") for t in tenants}))


def _revision(etag: str) -> int | None:
    if not etag:
        return None
    try:
        return convert.revision_from_etag(etag)
    except ValueError:
        raise InvalidArgument("etag: not an etag this API returned; use the etag from a List") from None


def _token_id(value: str, kind: TokenKind) -> str:
    token_id = v.validate_id(value)
    if token_id == BOOTSTRAP_TOKEN_ID:
        raise InvalidArgument(f"id: {_BOOTSTRAP_HINT[kind]}")
    return token_id


class TokenAdminMixin(AdminBase):
    """The token RPCs of ``AdminService``."""

    async def _create_token(
        self, kind: TokenKind, label: str, tenants: tuple[str, ...] | None, audit: AuditDraft
    ) -> tuple[AccessToken, str]:
        value = new_token(kind)
        token = AccessToken(
            id=new_id(ADMIN_TOKEN_PREFIX if kind is TokenKind.ADMIN else SIDECAR_TOKEN_PREFIX),
            kind=kind,
            label=label,
            prefix=value[:PREFIX_CHARS],
            token_sha256=token_sha256(value),
            tenants=tenants,
            created_at=self._clock(),
        )
        fields = ("label",) if kind is TokenKind.ADMIN else ("label", "tenants")
        audit.about("", token.id, fields, fingerprint(value))
        created = await audit.write(lambda entry: self._store.create_token(token, audit=entry))
        await self._publish()  # the registry knows it before the caller does
        log.info("created %s token %s (%s)", kind.value, created.id, label)
        return created, value

    async def _revoke_token(self, kind: TokenKind, token_id: str, etag: str, audit: AuditDraft) -> AccessToken:
        token_id = _token_id(token_id, kind)
        audit.about("", token_id, ("revoke_time",))
        expected, now = _revision(etag), self._clock()
        revoked = await audit.write(
            lambda entry: self._store.revoke_token(kind, token_id, now, expected_revision=expected, audit=entry)
        )
        await self._publish()  # refused on this replica before the RPC answers
        log.info("revoked %s token %s", kind.value, token_id)
        return revoked

    # admin tokens ------------------------------------------------------------------
    @map_errors
    @audited("admin_token")
    async def CreateAdminToken(
        self, request: pb.CreateAdminTokenRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateAdminTokenResponse:
        created, value = await self._create_token(TokenKind.ADMIN, v.validate_label(request.label), None, audit)
        return pb.CreateAdminTokenResponse(admin_token=admin_token_to_proto(created), token=value)

    @map_errors
    async def ListAdminTokens(self, request: pb.ListAdminTokensRequest, context: Context) -> pb.ListAdminTokensResponse:
        tokens = await self._store.list_tokens(TokenKind.ADMIN)
        return pb.ListAdminTokensResponse(admin_tokens=[admin_token_to_proto(t) for t in tokens])

    @map_errors
    @audited("admin_token")
    async def RevokeAdminToken(
        self, request: pb.RevokeAdminTokenRequest, context: Context, audit: AuditDraft
    ) -> pb.RevokeAdminTokenResponse:
        revoked = await self._revoke_token(TokenKind.ADMIN, request.id, request.etag, audit)
        return pb.RevokeAdminTokenResponse(admin_token=admin_token_to_proto(revoked))

    # sidecar tokens ------------------------------------------------------------------
    @map_errors
    @audited("sidecar_token")
    async def CreateSidecarToken(
        self, request: pb.CreateSidecarTokenRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateSidecarTokenResponse:
        label = v.validate_label(request.label)
        tenants = _scope(list(request.tenants), request.all_tenants)
        created, value = await self._create_token(TokenKind.SIDECAR, label, tenants, audit)
        return pb.CreateSidecarTokenResponse(sidecar_token=sidecar_token_to_proto(created), token=value)

    @map_errors
    async def ListSidecarTokens(
        self, request: pb.ListSidecarTokensRequest, context: Context
    ) -> pb.ListSidecarTokensResponse:
        tokens = await self._store.list_tokens(TokenKind.SIDECAR)
        return pb.ListSidecarTokensResponse(sidecar_tokens=[sidecar_token_to_proto(t) for t in tokens])

    @map_errors
    @audited("sidecar_token")
    async def RevokeSidecarToken(
        self, request: pb.RevokeSidecarTokenRequest, context: Context, audit: AuditDraft
    ) -> pb.RevokeSidecarTokenResponse:
        revoked = await self._revoke_token(TokenKind.SIDECAR, request.id, request.etag, audit)
        return pb.RevokeSidecarTokenResponse(sidecar_token=sidecar_token_to_proto(revoked))
