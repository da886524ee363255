"""The admin service's provider-key RPCs: create, get, list, update
(fields by update mask, the secret by rotation, an optional etag
precondition), delete, and resetting a key's learnt health.

Secrets are sealed under the primary master key with the key id as
associated data and never returned. Updates write only what they name, so
concurrent updates of different fields never undo each other. Re-enabling a
key (status ACTIVE) or rotating its secret clears its learnt health.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from control_plane import admin_requests, limits
from control_plane import validation as v
from control_plane.admin_base import AdminBase, Context
from control_plane.audit import AuditDraft, audited
from control_plane.status import map_errors
from control_plane.store.base import ProviderKeyUpdate, SealedSecret
from keyplane import convert
from keyplane.crypto import fingerprint, last4
from keyplane.domain import EntityKind, KeyStatus, ProviderKey
from keyplane.errors import InvalidArgument
from keyplane.ids import PROVIDER_KEY_PREFIX, new_id
from keyplane.v1 import admin_service_pb2 as pb

__all__ = ["UPDATABLE_KEY_FIELDS", "ProviderKeyAdmin"]

log = logging.getLogger("control_plane.admin_service")

UPDATABLE_KEY_FIELDS = ("label", "status", "weight", "allowed_models", "base_url")
# What a creation sets, as its audit event names it.
_KEY_CREATE_FIELDS = ("provider", "label", "secret", "base_url", "weight", "allowed_models")


class ProviderKeyAdmin(AdminBase):
    def _check_key_fits(self, key: ProviderKey, secret_chars: int, *, new: bool) -> None:
        """The key, as sidecars will hold it, fits in its tenant's caps."""
        usage = self._hub.cache.usage(key.tenant)
        if new:
            limits.check_room(usage, "keys", key.tenant)
        # Tags and length prefixes: a few bytes on top of the fields.
        adding = convert.sidecar_key_to_proto(key, "").ByteSize() + secret_chars + 8
        removing = 0 if new else self._hub.cache.encoded_size(key.tenant, EntityKind.PROVIDER_KEY, key.id)
        limits.check_snapshot_growth(usage, key.tenant, adding=adding, removing=removing)

    def _seal(self, key_id: str, secret: str) -> SealedSecret:
        return SealedSecret(
            ciphertext=self._keys.seal(secret, associated_data=key_id),
            fingerprint=fingerprint(secret),
            last4=last4(secret),
        )

    @map_errors
    @audited("provider_key")
    async def CreateProviderKey(
        self, request: pb.CreateProviderKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateProviderKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        audit.about(tenant, "", _KEY_CREATE_FIELDS)
        provider = v.validate_provider(convert.provider_from_proto(request.provider))
        label = v.validate_label(request.label)
        secret = v.validate_secret(request.secret, provider)
        base_url = v.validate_base_url(request.base_url, provider, policy=self._url_policy)
        weight = v.validate_weight(request.weight)
        limits.check_allowed_models(len(request.allowed_models))
        allowed_models = v.validate_allowed_models(request.allowed_models)
        key_id = new_id(PROVIDER_KEY_PREFIX)
        now = self._clock()
        sealed = self._seal(key_id, secret)
        key = ProviderKey(
            id=key_id,
            tenant=tenant,
            provider=provider,
            label=label,
            base_url=base_url,
            status=KeyStatus.ACTIVE,
            weight=weight,
            allowed_models=allowed_models,
            created_at=now,
            updated_at=now,
            secret_ciphertext=sealed.ciphertext,
            fingerprint=sealed.fingerprint,
            last4=sealed.last4,
        )
        audit.about(tenant, key_id, _KEY_CREATE_FIELDS, sealed.fingerprint)
        self._check_key_fits(key, len(secret), new=True)
        created = await audit.write(lambda entry: self._store.create_provider_key(key, audit=entry))
        version = await self._publish()
        log.info("created provider key %s (%s) for tenant %s", key_id, provider.value, tenant)
        return pb.CreateProviderKeyResponse(key=convert.provider_key_to_proto(created), version=version)

    @map_errors
    async def GetProviderKey(self, request: pb.GetProviderKeyRequest, context: Context) -> pb.GetProviderKeyResponse:
        key = await self._store.get_provider_key(v.validate_tenant_name(request.tenant), v.validate_id(request.id))
        return pb.GetProviderKeyResponse(key=convert.provider_key_to_proto(key))

    @map_errors
    async def ListProviderKeys(
        self, request: pb.ListProviderKeysRequest, context: Context
    ) -> pb.ListProviderKeysResponse:
        keys = await self._store.list_provider_keys(v.validate_tenant_name(request.tenant))
        return pb.ListProviderKeysResponse(keys=[convert.provider_key_to_proto(k) for k in keys])

    @map_errors
    @audited("provider_key")
    async def UpdateProviderKey(
        self, request: pb.UpdateProviderKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.UpdateProviderKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        key_id = v.validate_id(request.id)
        audit.about(tenant, key_id)
        paths = admin_requests.update_paths(list(request.update_mask.paths), UPDATABLE_KEY_FIELDS)
        audit.fields = tuple(paths) + (("secret",) if request.new_secret else ())
        expected = admin_requests.expected_revision(request.etag, request.key.etag, resource="key")
        if not paths and not request.new_secret:
            raise InvalidArgument(
                f"nothing to update: name fields in update_mask ({', '.join(UPDATABLE_KEY_FIELDS)}) or set new_secret"
            )
        # Read for the provider only, which never changes; the write below
        # takes nothing else from this read.
        current = await self._store.get_provider_key(tenant, key_id)
        wanted = request.key
        changes: dict[str, Any] = {}
        for path in paths:
            if path == "label":
                changes["label"] = v.validate_label(wanted.label, field="key.label")
            elif path == "status":
                changes["status"] = v.validate_key_status(
                    convert.key_status_from_proto(wanted.status), field="key.status"
                )
            elif path == "weight":
                changes["weight"] = v.validate_weight(wanted.weight, field="key.weight")
            elif path == "allowed_models":
                limits.check_allowed_models(len(wanted.allowed_models), field="key.allowed_models")
                changes["allowed_models"] = v.validate_allowed_models(wanted.allowed_models, field="key.allowed_models")
            elif path == "base_url":
                changes["base_url"] = v.validate_base_url(
                    wanted.base_url, current.provider, field="key.base_url", policy=self._url_policy
                )
        if request.new_secret:
            secret = v.validate_secret(request.new_secret, current.provider, field="new_secret")
            changes["secret"] = self._seal(key_id, secret)
            audit.fingerprint = changes["secret"].fingerprint
        update = ProviderKeyUpdate(updated_at=self._clock(), **changes)
        preview = dataclasses.replace(current, **{name: value for name, value in changes.items() if name != "secret"})
        self._check_key_fits(preview, len(request.new_secret) or v.MAX_SECRET_CHARS, new=False)
        stored = await audit.write(
            lambda entry: self._store.update_provider_key(
                tenant, key_id, update, expected_revision=expected, audit=entry
            )
        )
        version = await self._publish()
        if changes.get("status") is KeyStatus.ACTIVE or request.new_secret:
            # Re-enabled or rotated: whatever was learnt about the old state is moot.
            version = await self._reset_key_health(tenant, key_id)
        log.info(
            "updated provider key %s of tenant %s (%s)",
            key_id,
            tenant,
            ", ".join(paths + (["secret"] if request.new_secret else [])),
        )
        return pb.UpdateProviderKeyResponse(key=convert.provider_key_to_proto(stored), version=version)

    @map_errors
    @audited("provider_key")
    async def DeleteProviderKey(
        self, request: pb.DeleteProviderKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.DeleteProviderKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        key_id = v.validate_id(request.id)
        audit.about(tenant, key_id)
        await audit.write(lambda entry: self._store.delete_provider_key(tenant, key_id, audit=entry))
        version = await self._publish()
        log.info("deleted provider key %s of tenant %s", key_id, tenant)
        return pb.DeleteProviderKeyResponse(version=version)

    @map_errors
    @audited("provider_key")
    async def ResetKeyHealth(
        self, request: pb.ResetKeyHealthRequest, context: Context, audit: AuditDraft
    ) -> pb.ResetKeyHealthResponse:
        tenant = v.validate_tenant_name(request.tenant)
        key_id = v.validate_id(request.key_id, field="key_id")
        audit.about(tenant, key_id, ("health",))
        await self._store.get_provider_key(tenant, key_id)  # NotFound for an unknown tenant or key
        version = await audit.write(lambda entry: self._reset_key_health(tenant, key_id, entry))
        log.info("reset the health of provider key %s of tenant %s", key_id, tenant)
        return pb.ResetKeyHealthResponse(version=version)
