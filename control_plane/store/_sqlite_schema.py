"""The SQLite store's schema: its versioned migrations, oldest first.

Append-only: never edit a shipped migration, add the next version instead
(``migrations``). ``sqlite.SqliteStore.migrate()`` applies them.
"""

from __future__ import annotations

from control_plane.store.migrations import Migration

__all__ = ["MIGRATIONS"]

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        (
            """CREATE TABLE tenants (
                name TEXT PRIMARY KEY,
                created_at TEXT NOT NULL
            )""",
            """CREATE TABLE provider_keys (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                provider TEXT NOT NULL,
                label TEXT NOT NULL,
                base_url TEXT NOT NULL,
                status TEXT NOT NULL,
                weight INTEGER NOT NULL,
                allowed_models TEXT NOT NULL,
                secret_ciphertext BLOB NOT NULL,
                fingerprint TEXT NOT NULL,
                last4 TEXT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                UNIQUE (tenant, label)
            )""",
            "CREATE INDEX provider_keys_by_tenant ON provider_keys (tenant, created_at, id)",
            """CREATE TABLE routes (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                public_model TEXT NOT NULL,
                targets TEXT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                UNIQUE (tenant, public_model)
            )""",
            "CREATE INDEX routes_by_tenant ON routes (tenant, created_at, id)",
            """CREATE TABLE client_keys (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                label TEXT NOT NULL,
                prefix TEXT NOT NULL,
                token_sha256 BLOB NOT NULL,
                created_at TEXT NOT NULL,
                UNIQUE (tenant, label)
            )""",
            "CREATE INDEX client_keys_by_tenant ON client_keys (tenant, created_at, id)",
            "CREATE INDEX client_keys_by_token ON client_keys (token_sha256)",
            """CREATE TABLE changes (
                version INTEGER PRIMARY KEY AUTOINCREMENT,
                tenant TEXT NOT NULL,
                kind TEXT NOT NULL,
                entity_id TEXT NOT NULL,
                op TEXT NOT NULL,
                created_at TEXT NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "learnt key and provider health",
        (
            # Only non-healthy entries are stored; model '' is key-wide.
            """CREATE TABLE key_health (
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                key_id TEXT NOT NULL REFERENCES provider_keys(id) ON DELETE CASCADE,
                model TEXT NOT NULL,
                state TEXT NOT NULL,
                until TEXT,
                reason TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (key_id, model)
            )""",
            "CREATE INDEX key_health_by_tenant ON key_health (tenant, key_id, model)",
            """CREATE TABLE provider_health (
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                provider TEXT NOT NULL,
                model TEXT NOT NULL,
                state TEXT NOT NULL,
                until TEXT,
                reason TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (tenant, provider, model)
            )""",
        ),
    ),
    Migration(
        3,
        "revisions (etags) of mutable objects",
        (
            "ALTER TABLE tenants ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE provider_keys ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE routes ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE client_keys ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
        ),
    ),
    Migration(
        4,
        "audit log of admin writes",
        (
            # No foreign keys: the record of a tenant outlives the tenant.
            """CREATE TABLE audit_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                event_time TEXT NOT NULL,
                caller TEXT NOT NULL CHECK (caller <> ''),
                method TEXT NOT NULL CHECK (method <> ''),
                tenant TEXT NOT NULL,
                resource_kind TEXT NOT NULL,
                resource_id TEXT NOT NULL,
                fields TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                result TEXT NOT NULL CHECK (result <> '')
            )""",
            "CREATE INDEX audit_events_by_time ON audit_events (event_time, id)",
            "CREATE INDEX audit_events_by_tenant ON audit_events (tenant, id)",
            "CREATE INDEX audit_events_by_resource ON audit_events (resource_id, id)",
            "CREATE INDEX audit_events_by_kind ON audit_events (resource_kind, id)",
        ),
    ),
    Migration(
        5,
        "admin and sidecar tokens managed through the API",
        (
            # Only the SHA-256 of a token; tenants: a JSON array, NULL for every tenant.
            """CREATE TABLE access_tokens (
                id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                label TEXT NOT NULL,
                prefix TEXT NOT NULL,
                token_sha256 BLOB NOT NULL UNIQUE,
                tenants TEXT,
                created_at TEXT NOT NULL,
                revoked_at TEXT,
                revision INTEGER NOT NULL DEFAULT 1
            )""",
            "CREATE INDEX access_tokens_by_kind ON access_tokens (kind, created_at, id)",
        ),
    ),
    Migration(
        6,
        "the fleet's shared record of sidecar streams and acknowledgements",
        (
            # One row per sidecar id; tenants NULL for every tenant. Not in the change log.
            """CREATE TABLE sidecar_status (
                sidecar_id TEXT PRIMARY KEY,
                replica TEXT NOT NULL DEFAULT '',
                tenants TEXT,
                peer TEXT NOT NULL DEFAULT '',
                connected_at TEXT,
                sent_version INTEGER NOT NULL DEFAULT 0,
                seen_at TEXT,
                applied_version INTEGER NOT NULL DEFAULT 0,
                rejected_version INTEGER NOT NULL DEFAULT 0,
                error_detail TEXT NOT NULL DEFAULT '',
                acked_at TEXT
            )""",
        ),
    ),
    Migration(
        7,
        "affinity: nodes of vllm targets, their learnt health, (client key, model) -> node bindings",
        (
            # id is derived from (route_id, url): keyplane.affinity.node_id_for.
            """CREATE TABLE nodes (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                route_id TEXT NOT NULL REFERENCES routes(id) ON DELETE CASCADE,
                url TEXT NOT NULL,
                upstream_model TEXT NOT NULL,
                state TEXT NOT NULL,
                from_route INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                revision INTEGER NOT NULL DEFAULT 1,
                UNIQUE (route_id, url)
            )""",
            "CREATE INDEX nodes_by_tenant ON nodes (tenant, route_id, created_at, id)",
            """CREATE TABLE node_health (
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                node_id TEXT NOT NULL PRIMARY KEY
                    REFERENCES nodes(id) ON DELETE CASCADE,
                state TEXT NOT NULL,
                until TEXT,
                reason TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )""",
            "CREATE INDEX node_health_by_tenant ON node_health (tenant, node_id)",
            # Deleting the client key (or the node, route or tenant) deletes its bindings.
            """CREATE TABLE bindings (
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                client_key_id TEXT NOT NULL REFERENCES client_keys(id) ON DELETE CASCADE,
                public_model TEXT NOT NULL,
                node_id TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                moves INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (client_key_id, public_model)
            )""",
            "CREATE INDEX bindings_by_expiry ON bindings (expires_at)",
            "CREATE INDEX bindings_by_node ON bindings (node_id)",
            "CREATE INDEX bindings_by_tenant ON bindings (tenant, created_at)",
        ),
    ),
    Migration(
        8,
        "usage rollups per minute and prices per model",
        (
            # Usage is history: no foreign keys (it outlives deleted keys and tenants until retention).
            """CREATE TABLE usage_rollups (
                minute INTEGER NOT NULL,
                tenant TEXT NOT NULL,
                client_key_id TEXT NOT NULL,
                public_model TEXT NOT NULL,
                provider_key_id TEXT NOT NULL,
                upstream_model TEXT NOT NULL,
                provider TEXT NOT NULL,
                requests INTEGER NOT NULL DEFAULT 0,
                failed_requests INTEGER NOT NULL DEFAULT 0,
                estimated_requests INTEGER NOT NULL DEFAULT 0,
                input_tokens INTEGER NOT NULL DEFAULT 0,
                cached_input_tokens INTEGER NOT NULL DEFAULT 0,
                cache_write_input_tokens INTEGER NOT NULL DEFAULT 0,
                output_tokens INTEGER NOT NULL DEFAULT 0,
                reasoning_tokens INTEGER NOT NULL DEFAULT 0,
                cost_micros INTEGER NOT NULL DEFAULT 0,
                unpriced_requests INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (minute, tenant, client_key_id, public_model, provider_key_id, upstream_model)
            )""",
            "CREATE INDEX usage_rollups_by_tenant ON usage_rollups (tenant, minute)",
            """CREATE TABLE prices (
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                provider TEXT NOT NULL,
                model TEXT NOT NULL,
                input_micros_per_million INTEGER NOT NULL,
                cached_input_micros_per_million INTEGER NOT NULL,
                output_micros_per_million INTEGER NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (tenant, provider, model)
            )""",
        ),
    ),
    Migration(
        9,
        "limits per client key or tenant (rates and spend budgets)",
        (
            # client_key_id '' for the tenant as a whole; not in the change log
            # (sidecars learn limits through their leases).
            """CREATE TABLE limits (
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                client_key_id TEXT NOT NULL DEFAULT '',
                requests_per_minute INTEGER NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
                tokens_per_minute INTEGER NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
                daily_budget_micros INTEGER NOT NULL DEFAULT 0 CHECK (daily_budget_micros >= 0),
                monthly_budget_micros INTEGER NOT NULL DEFAULT 0 CHECK (monthly_budget_micros >= 0),
                updated_at TEXT NOT NULL,
                PRIMARY KEY (tenant, client_key_id)
            )""",
        ),
    ),
    Migration(
        10,
        "quota claims of control-plane replicas on each limited bucket's window",
        (
            # One row per (bucket, window, replica); replica_id '' is a budget's
            # seed (spend the usage rollups held when the window's first claim came).
            """CREATE TABLE quota_claims (
                tenant TEXT NOT NULL,
                client_key_id TEXT NOT NULL,
                kind INTEGER NOT NULL,
                window_start_ms INTEGER NOT NULL,
                replica_id TEXT NOT NULL,
                window_end_ms INTEGER NOT NULL,
                claimed INTEGER NOT NULL DEFAULT 0,
                used INTEGER NOT NULL DEFAULT 0,
                rate REAL NOT NULL DEFAULT 0,
                updated_at_ms INTEGER NOT NULL,
                PRIMARY KEY (tenant, client_key_id, kind, window_start_ms, replica_id)
            )""",
            "CREATE INDEX quota_claims_by_end ON quota_claims (window_end_ms)",
        ),
    ),
    Migration(
        11,
        "usage rollups count upstream attempts apart from app requests",
        (
            # Rows written before it keep attempts = 0 (their requests counted attempts).
            "ALTER TABLE usage_rollups ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        ),
    ),
)
