"""The master-key RPCs of the admin service: GetMasterKeyStatus and
RewrapSecrets (``AdminService`` mixes this class in; the work is in
``control_plane.master_keys``)."""

from __future__ import annotations

import logging
from typing import Any

from grpc import aio

from control_plane import master_keys
from control_plane import validation as v
from control_plane.admin_base import AdminBase
from control_plane.audit import AuditDraft, audited
from control_plane.status import map_errors
from keyplane.errors import FailedPrecondition, InvalidArgument
from keyplane.v1 import admin_service_pb2 as pb

__all__ = ["MasterKeyAdmin"]

log = logging.getLogger(__name__)

Context = aio.ServicerContext[Any, Any]


class MasterKeyAdmin(AdminBase):
    """The master-key RPCs of ``AdminService``."""

    @map_errors
    async def GetMasterKeyStatus(
        self, request: pb.GetMasterKeyStatusRequest, context: Context
    ) -> pb.GetMasterKeyStatusResponse:
        usage = await master_keys.key_usage(self._store, self._keys)
        ring = usage.ring
        unknown = sorted(k for k in usage.secrets if k not in ring)
        return pb.GetMasterKeyStatusResponse(
            primary_key_id=ring.primary_id,
            keyring_key_ids=list(ring.ids),
            usage=[
                pb.MasterKeyUsage(key_id=k, secrets=usage.secrets.get(k, 0), in_keyring=k in ring)
                for k in (*ring.ids, *unknown)
            ],
            total_secrets=usage.total,
        )

    @map_errors
    @audited("master_key")
    async def RewrapSecrets(
        self, request: pb.RewrapSecretsRequest, context: Context, draft: AuditDraft
    ) -> pb.RewrapSecretsResponse:
        batch_size = request.batch_size or master_keys.DEFAULT_BATCH
        if not 1 <= batch_size <= master_keys.MAX_BATCH:
            raise InvalidArgument(f"batch_size: must be between 1 and {master_keys.MAX_BATCH}")
        after = v.validate_id(request.page_token, field="page_token") if request.page_token else ""
        primary = self._keys.current().primary_id
        if request.primary_key_id and request.primary_key_id != primary:
            raise FailedPrecondition(
                f"primary_key_id: this control plane seals with master key {primary!r}, not "
                f"{request.primary_key_id!r}; wait until it has re-read the keyring file"
            )
        # Each batch that rewrites a secret is audited in its own transaction.
        draft.about("", primary, ("secret_ciphertext",))
        progress = await master_keys.rewrap_secrets(
            self._store, self._keys, after=after, batch_size=batch_size, audit=draft.entry()
        )
        log.info(
            "rewrapped %d provider secrets under master key %s (%d examined, %d already current, "
            "%d changed meanwhile, %d unreadable)",
            progress.rewrapped,
            primary,
            progress.examined,
            progress.already_current,
            progress.skipped_changed,
            progress.unreadable,
        )
        return pb.RewrapSecretsResponse(
            primary_key_id=primary,
            examined=progress.examined,
            rewrapped=progress.rewrapped,
            already_current=progress.already_current,
            skipped_changed=progress.skipped_changed,
            unreadable=progress.unreadable,
            next_page_token=progress.next_after,
        )
