"""One request's book-keeping: the attempt observer, the reports and the answer's own headers.

Every attempt is recorded in the tenant's local health book at once and queued
for the control plane (never awaited) by ``flush``; the answer carries the
``x-keyplane-*`` headers built here. Every reported attempt but the request's
last is marked ``superseded`` (``Outcome.superseded``), so that usage counts the
request once (at its last attempt) and each attempt as an attempt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keyplane import convert
from keyplane.health.classify import ErrorClass, counts_against_key
from keyplane.health.machine import Outcome

from .health import TenantHealth
from .model import Key, Target
from .proxy import AttemptRecord, excluded_header
from .router import Attempt
from .usage_stream import Metering

if TYPE_CHECKING:
    from .access_log import AccessEntry
    from .chat_app import ChatApp

__all__ = [
    "ATTEMPTS_HEADER",
    "EXCLUDED_HEADER",
    "KEY_HEADER",
    "PROVIDER_HEADER",
    "REQUEST_ID_HEADER",
    "RequestBook",
]

ATTEMPTS_HEADER = b"x-keyplane-attempts"
PROVIDER_HEADER = b"x-keyplane-provider"
KEY_HEADER = b"x-keyplane-key"
EXCLUDED_HEADER = b"x-keyplane-excluded"
REQUEST_ID_HEADER = b"x-keyplane-request-id"


class RequestBook:
    """One request's book-keeping: the attempt observer, reports and answer headers."""

    __slots__ = (
        "access",
        "app",
        "client_key_id",
        "excluded",
        "health",
        "metering",
        "model",
        "request_id",
        "tenant",
        "unreported",
    )

    def __init__(
        self,
        app: ChatApp,
        tenant: str,
        request_id: str,
        access: AccessEntry | None = None,
        *,
        client_key_id: str = "",
        model: str = "",
    ) -> None:
        self.app = app
        self.tenant = tenant
        self.request_id = request_id
        # Whose request, for which public model: what usage is reported under.
        self.client_key_id = client_key_id
        self.model = model
        # How the answer's usage is read (``sidecar.usage_stream``); None: it is not.
        self.metering: Metering | None = None
        self.access = access
        if access is not None:
            access.request_id = request_id
        self.health: TenantHealth = app.state.health(tenant)
        # key id -> class or health state
        self.excluded: dict[str, str] = {}
        # Attempts seen but not yet queued for the control plane.
        self.unreported: list[AttemptRecord] = []

    def attempted(self, record: AttemptRecord) -> None:
        """Metrics, and this sidecar's own health book at once (no round trip)."""
        app = self.app
        app.count_attempt(record, self.tenant)
        if record.attempt.node_url is not None:
            app.node_affinity.attempted(self.tenant, record)  # a node: its binding and health
        key = record.attempt.key
        if key is None:
            return  # keyless: nothing to attribute in the health book or the reports
        unreported = self.unreported
        if unreported:
            unreported[-1].superseded = True  # this attempt came after it
        unreported.append(record)
        classification = record.classification
        if not counts_against_key(classification.error_class, on_node=record.attempt.node_url is not None):
            return  # the node's failure: its own health (above), not the key's
        if classification.error_class is ErrorClass.SUCCESS:
            # A plain success: the health book's fast path (no Outcome object).
            target = record.attempt.target
            self.health.record_success(
                key.id,
                target.provider,
                target.upstream_model,
                classification,
                provider_final=record.provider_final,
                recovered=record.recovered,
                now=app.state.wall_clock(),
                started=record.started,
            )
            return
        outcome = Outcome(
            key_id=key.id,
            provider=record.provider,
            model=record.model,
            classification=classification,
            provider_final=record.provider_final,
            recovered=record.recovered,
        )
        self.health.record(outcome, app.state.wall_clock())

    def misconfigured(self, attempt: Attempt) -> None:
        self.app.count_misconfigured(attempt)

    def flush(self, *, followed: bool = False) -> None:
        """Queue the attempts seen so far for the control plane (never blocks).

        ``followed``: a keyed attempt of this request is under way (a stream being
        relayed), so none of these is the request's last attempt."""
        records = self.unreported
        if not records:
            return
        if followed:
            records[-1].superseded = True
        self.unreported = []
        limiter = self.app.limiter
        if limiter is not None:
            tokens = sum(r.usage.total_tokens for r in records if r.usage is not None)
            limiter.charge_tokens(self.tenant, self.client_key_id, tokens)
            for r in records:
                if r.usage is not None:
                    provider = convert.provider_to_proto(r.attempt.target.provider)
                    limiter.charge_spend(self.tenant, self.client_key_id, provider, r.model, r.usage)
        reporter = self.app.reporter
        if reporter is None:
            return
        # Only keyed attempts are kept in ``unreported``.
        for record in records:
            reporter.enqueue_record(self.tenant, record, self.request_id, self.client_key_id, self.model)

    def headers(
        self, *, attempts: int, answer: Key | None = None, target: Target | None = None
    ) -> list[tuple[bytes, bytes]]:
        out = [(ATTEMPTS_HEADER, str(attempts).encode()), (REQUEST_ID_HEADER, self.request_id.encode())]
        if target is not None:
            out.append((PROVIDER_HEADER, target.provider.value.encode()))
        if answer is not None:
            out.append((KEY_HEADER, answer.id.encode("latin-1", "replace")))
        if self.excluded:
            out.append((EXCLUDED_HEADER, excluded_header(self.excluded).encode("latin-1", "replace")))
        return out
