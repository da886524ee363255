"""The sidecar service's affinity RPCs, GetOrCreateBinding and
RefreshBindings (a mixin of ``SidecarService``): validation, the token's
tenant scope, and the mapping onto ``control_plane.affinity.Affinity``."""

from __future__ import annotations

from typing import Any

from google.protobuf.duration_pb2 import Duration
from grpc import aio

from control_plane import validation as v
from control_plane.affinity import Affinity
from control_plane.auth import PermissionDenied, current_sidecar_scope
from control_plane.status import map_errors
from keyplane import affinity_convert
from keyplane.affinity import BindingKey, BindingResult
from keyplane.errors import InvalidArgument, Unavailable
from keyplane.v1 import sidecar_service_pb2 as pb

__all__ = ["AffinityRpcs"]

MAX_EXCLUDED = 64
MAX_REFRESH = 1000
_MAX_ID = 256
_RESULTS = {
    BindingResult.HIT: pb.BINDING_RESULT_HIT,
    BindingResult.CREATED: pb.BINDING_RESULT_CREATED,
    BindingResult.MOVED: pb.BINDING_RESULT_MOVED,
}


def _scoped_tenant(tenant: str) -> str:
    tenant = v.validate_tenant_name(tenant)
    scope = current_sidecar_scope()
    if scope is None or not scope.allows(tenant):
        raise PermissionDenied(f"the sidecar token may not use tenant {tenant!r}")
    return tenant


def _binding_key(tenant: str, client_key_id: str, public_model: str, field: str) -> BindingKey:
    if not client_key_id or len(client_key_id) > _MAX_ID or "/" in client_key_id:
        raise InvalidArgument(f"{field}client_key_id: required, at most {_MAX_ID} characters, no '/'")
    model = v.validate_public_model(public_model, field=f"{field}public_model")
    return BindingKey(_scoped_tenant(tenant), client_key_id, model)


class AffinityRpcs:
    """Needs ``self._affinity`` (None: the RPCs answer UNAVAILABLE)."""

    _affinity: Affinity | None

    def _require_affinity(self) -> Affinity:
        if self._affinity is None:
            raise Unavailable("affinity is not served by this control plane")
        return self._affinity

    @map_errors
    async def GetOrCreateBinding(
        self, request: pb.GetOrCreateBindingRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetOrCreateBindingResponse:
        affinity = self._require_affinity()
        key = _binding_key(request.tenant, request.client_key_id, request.public_model, "")
        if len(request.exclude_node_ids) > MAX_EXCLUDED:
            raise InvalidArgument(f"exclude_node_ids: at most {MAX_EXCLUDED}")
        binding, result = await affinity.get_or_create(key, frozenset(request.exclude_node_ids))
        ttl = Duration()
        ttl.FromTimedelta(affinity.ttl)
        return pb.GetOrCreateBindingResponse(
            binding=affinity_convert.binding_to_proto(binding), result=_RESULTS[result], ttl=ttl
        )

    @map_errors
    async def RefreshBindings(
        self, request: pb.RefreshBindingsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RefreshBindingsResponse:
        affinity = self._require_affinity()
        if len(request.bindings) > MAX_REFRESH:
            raise InvalidArgument(f"bindings: at most {MAX_REFRESH} per call")
        refs = []
        for index, ref in enumerate(request.bindings):
            key = _binding_key(ref.tenant, ref.client_key_id, ref.public_model, f"bindings[{index}].")
            if not ref.node_id:
                raise InvalidArgument(f"bindings[{index}].node_id: required")
            refs.append((key, ref.node_id))
        counters = [(_scoped_tenant(c.tenant), c) for c in request.counters]
        refreshed, current, gone = await affinity.refresh(refs) if refs else (0, [], [])
        for tenant, c in counters:
            affinity.count(tenant, hits=c.local_hits, overrides=c.overrides, fallbacks=c.fallbacks)
        return pb.RefreshBindingsResponse(
            refreshed=refreshed,
            current=[affinity_convert.binding_to_proto(b) for b in current],
            gone=[affinity_convert.binding_ref_to_proto(k, n) for k, n in gone],
        )
