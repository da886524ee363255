"""The admin service's client-key RPCs: issue (the token is returned once;
only its SHA-256 is stored and streamed), list and delete (which revokes it
on every sidecar)."""

from __future__ import annotations

import hashlib
import logging
import secrets

from control_plane import limits
from control_plane import validation as v
from control_plane.admin_base import AdminBase, Context
from control_plane.audit import AuditDraft, audited
from control_plane.status import map_errors
from keyplane import convert
from keyplane.crypto import fingerprint
from keyplane.domain import ClientKey
from keyplane.ids import CLIENT_KEY_PREFIX, new_id
from keyplane.v1 import admin_service_pb2 as pb

__all__ = ["CLIENT_TOKEN_PREFIX", "ClientKeyAdmin", "new_client_token"]

log = logging.getLogger("control_plane.admin_service")

CLIENT_TOKEN_PREFIX = "kp-"
_CLIENT_KEY_CREATE_FIELDS = ("label", "token")


def new_client_token() -> str:
    """A fresh client bearer token: ``kp-`` and 43 URL-safe characters."""
    return CLIENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


class ClientKeyAdmin(AdminBase):
    def _check_client_key_fits(self, client_key: ClientKey) -> None:
        usage = self._hub.cache.usage(client_key.tenant)
        limits.check_room(usage, "client_keys", client_key.tenant)
        adding = convert.sidecar_client_key_to_proto(client_key).ByteSize() + 8
        limits.check_snapshot_growth(usage, client_key.tenant, adding=adding)

    @map_errors
    @audited("client_key")
    async def CreateClientKey(
        self, request: pb.CreateClientKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateClientKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        audit.about(tenant, "", _CLIENT_KEY_CREATE_FIELDS)
        label = v.validate_label(request.label)
        token = new_client_token()
        client_key = ClientKey(
            id=new_id(CLIENT_KEY_PREFIX),
            tenant=tenant,
            label=label,
            prefix=token[:10],
            token_sha256=hashlib.sha256(token.encode()).digest(),
            created_at=self._clock(),
        )
        audit.about(tenant, client_key.id, _CLIENT_KEY_CREATE_FIELDS, fingerprint(token))
        self._check_client_key_fits(client_key)
        created = await audit.write(lambda entry: self._store.create_client_key(client_key, audit=entry))
        version = await self._publish()
        log.info("created client key %s for tenant %s", client_key.id, tenant)
        return pb.CreateClientKeyResponse(client_key=convert.client_key_to_proto(created), token=token, version=version)

    @map_errors
    async def ListClientKeys(self, request: pb.ListClientKeysRequest, context: Context) -> pb.ListClientKeysResponse:
        client_keys = await self._store.list_client_keys(v.validate_tenant_name(request.tenant))
        return pb.ListClientKeysResponse(client_keys=[convert.client_key_to_proto(c) for c in client_keys])

    @map_errors
    @audited("client_key")
    async def DeleteClientKey(
        self, request: pb.DeleteClientKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.DeleteClientKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        client_key_id = v.validate_id(request.id)
        audit.about(tenant, client_key_id)
        await audit.write(lambda entry: self._store.delete_client_key(tenant, client_key_id, audit=entry))
        version = await self._publish()
        log.info("deleted client key %s of tenant %s", client_key_id, tenant)
        return pb.DeleteClientKeyResponse(version=version)
