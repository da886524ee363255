"""Admin requests read into domain values: etag preconditions, update masks
and route targets. Pure functions that raise ``InvalidArgument`` naming the
field."""

from __future__ import annotations

from control_plane import limits
from control_plane import validation as v
from control_plane.url_policy import UrlPolicy
from keyplane import convert
from keyplane.domain import RouteTarget
from keyplane.errors import InvalidArgument
from keyplane.v1 import resources_pb2

__all__ = ["expected_revision", "route_targets", "update_paths"]


def expected_revision(request_etag: str, resource_etag: str, *, resource: str) -> int | None:
    """The revision an update's etag precondition names; None: unconditional.
    The request's ``etag`` wins; the resource's own etag counts when it is
    the only one (AIP-154); both set and different is a client bug."""
    if request_etag and resource_etag and request_etag != resource_etag:
        raise InvalidArgument(f"etag and {resource}.etag differ; send one etag")
    etag = request_etag or resource_etag
    if not etag:
        return None
    try:
        return convert.revision_from_etag(etag)
    except ValueError:
        field = "etag" if request_etag else f"{resource}.etag"
        raise InvalidArgument(f"{field}: not an etag this API returned; use the etag from a Get or List") from None


def update_paths(paths: list[str], updatable: tuple[str, ...]) -> list[str]:
    """The update mask's paths, each once, all of them updatable."""
    unique = list(dict.fromkeys(paths))
    unknown = [p for p in unique if p not in updatable]
    if unknown:
        hint = " (rotate the secret with new_secret)" if "secret" in unknown else ""
        raise InvalidArgument(
            f"update_mask: cannot update {', '.join(repr(p) for p in unknown)}; "
            f"updatable fields: {', '.join(updatable)}{hint}"
        )
    return unique


def route_targets(messages: list[resources_pb2.RouteTarget], policy: UrlPolicy) -> tuple[RouteTarget, ...]:
    """A route's targets, within the caps, each checked."""
    if not messages:
        raise InvalidArgument("targets: a route needs at least one target")
    limits.check_route_shape([len(m.node_urls) for m in messages])
    return tuple(
        v.validate_route_target(
            index,
            provider=convert.provider_from_proto(m.provider),
            upstream_model=m.upstream_model,
            priority=m.priority,
            weight=m.weight,
            node_urls=list(m.node_urls),
            api_version=m.api_version,
            deployment=m.deployment,
            policy=policy,
            endpoints=[convert.endpoint_from_proto(e) for e in m.endpoints],
        )
        for index, m in enumerate(messages)
    )
