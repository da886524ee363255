"""The Postgres store's schema: its versioned migrations, oldest first.

Append-only: never edit a shipped migration, add the next version instead
(``migrations``). ``postgres.PostgresStore.migrate()`` applies them.
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
                name text CONSTRAINT tenants_pkey PRIMARY KEY,
                created_at timestamptz NOT NULL
            )""",
            """CREATE TABLE provider_keys (
                id text CONSTRAINT provider_keys_pkey PRIMARY KEY,
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                provider text NOT NULL,
                label text NOT NULL,
                base_url text NOT NULL,
                status text NOT NULL,
                weight integer NOT NULL,
                allowed_models text[] NOT NULL,
                secret_ciphertext bytea NOT NULL,
                fingerprint text NOT NULL,
                last4 text NOT NULL,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                CONSTRAINT provider_keys_tenant_label_key UNIQUE (tenant, label)
            )""",
            "CREATE INDEX provider_keys_by_tenant ON provider_keys (tenant, created_at, id)",
            """CREATE TABLE routes (
                id text CONSTRAINT routes_pkey PRIMARY KEY,
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                public_model text NOT NULL,
                targets jsonb NOT NULL,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                CONSTRAINT routes_tenant_public_model_key UNIQUE (tenant, public_model)
            )""",
            "CREATE INDEX routes_by_tenant ON routes (tenant, created_at, id)",
            """CREATE TABLE client_keys (
                id text CONSTRAINT client_keys_pkey PRIMARY KEY,
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                label text NOT NULL,
                prefix text NOT NULL,
                token_sha256 bytea NOT NULL,
                created_at timestamptz NOT NULL,
                CONSTRAINT client_keys_tenant_label_key UNIQUE (tenant, label)
            )""",
            "CREATE INDEX client_keys_by_tenant ON client_keys (tenant, created_at, id)",
            "CREATE INDEX client_keys_by_token ON client_keys (token_sha256)",
            """CREATE TABLE changes (
                version bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tenant text NOT NULL,
                kind text NOT NULL,
                entity_id text NOT NULL,
                op text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            )""",
        ),
    ),
    Migration(
        2,
        "learnt key and provider health",
        (
            # Only non-healthy entries are stored; model '' is key-wide.
            """CREATE TABLE key_health (
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                key_id text NOT NULL REFERENCES provider_keys (id) ON DELETE CASCADE,
                model text NOT NULL,
                state text NOT NULL,
                until timestamptz,
                reason text NOT NULL,
                updated_at timestamptz NOT NULL,
                CONSTRAINT key_health_pkey PRIMARY KEY (key_id, model)
            )""",
            "CREATE INDEX key_health_by_tenant ON key_health (tenant, key_id, model)",
            """CREATE TABLE provider_health (
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                provider text NOT NULL,
                model text NOT NULL,
                state text NOT NULL,
                until timestamptz,
                reason text NOT NULL,
                updated_at timestamptz NOT NULL,
                CONSTRAINT provider_health_pkey PRIMARY KEY (tenant, provider, model)
            )""",
        ),
    ),
    Migration(
        3,
        "revisions (etags) of mutable objects",
        (
            "ALTER TABLE tenants ADD COLUMN revision bigint NOT NULL DEFAULT 1",
            "ALTER TABLE provider_keys ADD COLUMN revision bigint NOT NULL DEFAULT 1",
            "ALTER TABLE routes ADD COLUMN revision bigint NOT NULL DEFAULT 1",
            "ALTER TABLE client_keys ADD COLUMN revision bigint NOT NULL DEFAULT 1",
        ),
    ),
    Migration(
        4,
        "audit log of admin writes",
        (
            # No foreign keys: the record of a tenant outlives the tenant.
            """CREATE TABLE audit_events (
                id bigint GENERATED ALWAYS AS IDENTITY CONSTRAINT audit_events_pkey PRIMARY KEY,
                event_time timestamptz NOT NULL,
                caller text NOT NULL CONSTRAINT audit_events_caller_check CHECK (caller <> ''),
                method text NOT NULL CONSTRAINT audit_events_method_check CHECK (method <> ''),
                tenant text NOT NULL,
                resource_kind text NOT NULL,
                resource_id text NOT NULL,
                fields jsonb NOT NULL,
                fingerprint text NOT NULL,
                result text NOT NULL CONSTRAINT audit_events_result_check CHECK (result <> '')
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
            # Only the SHA-256 of a token; tenants NULL: every tenant.
            """CREATE TABLE access_tokens (
                id text CONSTRAINT access_tokens_pkey PRIMARY KEY,
                kind text NOT NULL,
                label text NOT NULL,
                prefix text NOT NULL,
                token_sha256 bytea NOT NULL CONSTRAINT access_tokens_token_sha256_key UNIQUE,
                tenants text[],
                created_at timestamptz NOT NULL,
                revoked_at timestamptz,
                revision bigint NOT NULL DEFAULT 1
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
                sidecar_id text CONSTRAINT sidecar_status_pkey PRIMARY KEY,
                replica text NOT NULL DEFAULT '',
                tenants text[],
                peer text NOT NULL DEFAULT '',
                connected_at timestamptz,
                sent_version bigint NOT NULL DEFAULT 0,
                seen_at timestamptz,
                applied_version bigint NOT NULL DEFAULT 0,
                rejected_version bigint NOT NULL DEFAULT 0,
                error_detail text NOT NULL DEFAULT '',
                acked_at timestamptz
            )""",
        ),
    ),
    Migration(
        7,
        "affinity: nodes of vllm targets, their learnt health, (client key, model) -> node bindings",
        (
            # id is derived from (route_id, url): keyplane.affinity.node_id_for.
            """CREATE TABLE nodes (
                id text CONSTRAINT nodes_pkey PRIMARY KEY,
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                route_id text NOT NULL REFERENCES routes (id) ON DELETE CASCADE,
                url text NOT NULL,
                upstream_model text NOT NULL,
                state text NOT NULL,
                from_route boolean NOT NULL,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                revision bigint NOT NULL DEFAULT 1,
                CONSTRAINT nodes_route_url_key UNIQUE (route_id, url)
            )""",
            "CREATE INDEX nodes_by_tenant ON nodes (tenant, route_id, created_at, id)",
            """CREATE TABLE node_health (
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                node_id text NOT NULL CONSTRAINT node_health_pkey PRIMARY KEY
                    REFERENCES nodes (id) ON DELETE CASCADE,
                state text NOT NULL,
                until timestamptz,
                reason text NOT NULL,
                updated_at timestamptz NOT NULL
            )""",
            "CREATE INDEX node_health_by_tenant ON node_health (tenant, node_id)",
            # Deleting the client key (or the node, route or tenant) deletes its bindings.
            """CREATE TABLE bindings (
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                client_key_id text NOT NULL REFERENCES client_keys (id) ON DELETE CASCADE,
                public_model text NOT NULL,
                node_id text NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                expires_at timestamptz NOT NULL,
                moves integer NOT NULL DEFAULT 0,
                CONSTRAINT bindings_pkey PRIMARY KEY (client_key_id, public_model)
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
                minute bigint NOT NULL,
                tenant text NOT NULL,
                client_key_id text NOT NULL,
                public_model text NOT NULL,
                provider_key_id text NOT NULL,
                upstream_model text NOT NULL,
                provider text NOT NULL,
                requests bigint NOT NULL DEFAULT 0,
                failed_requests bigint NOT NULL DEFAULT 0,
                estimated_requests bigint NOT NULL DEFAULT 0,
                input_tokens bigint NOT NULL DEFAULT 0,
                cached_input_tokens bigint NOT NULL DEFAULT 0,
                cache_write_input_tokens bigint NOT NULL DEFAULT 0,
                output_tokens bigint NOT NULL DEFAULT 0,
                reasoning_tokens bigint NOT NULL DEFAULT 0,
                cost_micros bigint NOT NULL DEFAULT 0,
                unpriced_requests bigint NOT NULL DEFAULT 0,
                PRIMARY KEY (minute, tenant, client_key_id, public_model, provider_key_id, upstream_model)
            )""",
            "CREATE INDEX usage_rollups_by_tenant ON usage_rollups (tenant, minute)",
            """CREATE TABLE prices (
                tenant text NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                provider text NOT NULL,
                model text NOT NULL,
                input_micros_per_million bigint NOT NULL,
                cached_input_micros_per_million bigint NOT NULL,
                output_micros_per_million bigint NOT NULL,
                updated_at timestamptz NOT NULL,
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
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                client_key_id text NOT NULL DEFAULT '',
                requests_per_minute bigint NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
                tokens_per_minute bigint NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
                daily_budget_micros bigint NOT NULL DEFAULT 0 CHECK (daily_budget_micros >= 0),
                monthly_budget_micros bigint NOT NULL DEFAULT 0 CHECK (monthly_budget_micros >= 0),
                updated_at timestamptz NOT NULL,
                CONSTRAINT limits_pkey PRIMARY KEY (tenant, client_key_id)
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
                tenant text NOT NULL,
                client_key_id text NOT NULL,
                kind bigint NOT NULL,
                window_start_ms bigint NOT NULL,
                replica_id text NOT NULL,
                window_end_ms bigint NOT NULL,
                claimed bigint NOT NULL DEFAULT 0,
                used bigint NOT NULL DEFAULT 0,
                rate double precision NOT NULL DEFAULT 0,
                updated_at_ms bigint NOT NULL,
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
            "ALTER TABLE usage_rollups ADD COLUMN attempts bigint NOT NULL DEFAULT 0",
        ),
    ),
)
