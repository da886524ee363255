// End-to-end test of the generated TypeScript stubs against a real control
// plane (tests/clients/test_typescript.py starts one and runs this with
// KEYPLANE_SERVER, KEYPLANE_ADMIN_TOKEN and KEYPLANE_SIDECAR_TOKEN set).
// Through AdminService it creates a tenant and a provider key; through
// SidecarService it opens a Watch as a sidecar would, checks the snapshot,
// then makes admin changes and checks each delta. Exits 1 with a message
// naming the failed step.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";

import { Code, ConnectError } from "@connectrpc/connect";

import {
  adminClient,
  KeyStatus,
  Provider,
  sidecarClient,
  type Change,
  type WatchResponse,
} from "../src/client.js";

const STEP_TIMEOUT_MS = 10_000;

function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run this through tests/clients/test_typescript.py`);
  }
  return value;
}

let step = "setup";

async function within<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${STEP_TIMEOUT_MS} ms waiting for ${what}`)), STEP_TIMEOUT_MS);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function onlyChange(message: WatchResponse): Change {
  assert.equal(message.payload.case, "delta", `expected a delta, got ${message.payload.case}`);
  const changes = message.payload.value.changes;
  assert.equal(changes.length, 1, `expected one change, got ${changes.length}`);
  return changes[0];
}

async function main(): Promise<void> {
  const server = env("KEYPLANE_SERVER");
  const admin = adminClient({ server, token: env("KEYPLANE_ADMIN_TOKEN") });
  const sidecar = sidecarClient({ server, token: env("KEYPLANE_SIDECAR_TOKEN") });
  const tenant = `ts-${randomBytes(4).toString("hex")}`;
  const secret = `sk-ts-${randomBytes(12).toString("hex")}`;

  step = "AdminService.CreateTenant";
  const created = await admin.createTenant({ name: tenant });
  assert.equal(created.tenant?.name, tenant);

  step = "AdminService.CreateProviderKey";
  const { key } = await admin.createProviderKey({
    tenant,
    provider: Provider.OPENAI,
    label: "main",
    secret,
    allowedModels: ["gpt-4o-mini"],
  });
  assert.ok(key, "CreateProviderKey returned no key");
  assert.match(key.id, /.+/);
  assert.equal(key.tenant, tenant);
  assert.equal(key.provider, Provider.OPENAI);
  assert.equal(key.status, KeyStatus.ACTIVE);
  assert.equal(key.last4, secret.slice(-4));
  assert.equal(key.fingerprint, createHash("sha256").update(secret).digest("hex").slice(0, 16));
  assert.ok(!JSON.stringify(key, (_, v) => (typeof v === "bigint" ? v.toString() : v)).includes(secret),
    "the admin API returned the secret");

  step = "SidecarService.Watch with a wrong token";
  const intruder = sidecarClient({ server, token: "kps-not-a-token" });
  await assert.rejects(
    async () => {
      for await (const _ of intruder.watch({ tenants: [tenant] })) {
        // never reached
      }
    },
    (err: unknown) => ConnectError.from(err).code === Code.Unauthenticated,
    "a Watch with a wrong token was not refused with UNAUTHENTICATED",
  );

  step = "SidecarService.Watch snapshot";
  const abort = new AbortController();
  const stream = sidecar.watch({ tenants: [tenant], sidecarId: "ts-test" }, { signal: abort.signal });
  const messages = stream[Symbol.asyncIterator]();
  const next = async (what: string): Promise<WatchResponse> => {
    const result = await within(messages.next(), what);
    assert.ok(!result.done, `the Watch stream ended while waiting for ${what}`);
    return result.value;
  };
  try {
    const first = await next("the snapshot");
    assert.equal(first.payload.case, "snapshot", `the first message is a ${first.payload.case}, not a snapshot`);
    assert.ok(first.version > 0n, "the snapshot has no version");
    const states = first.payload.value.tenants;
    assert.deepEqual(states.map((s) => s.tenant), [tenant]);
    const [state] = states;
    assert.equal(state.keys.length, 1);
    assert.equal(state.keys[0].id, key.id);
    assert.equal(state.keys[0].secret, secret, "the sidecar's snapshot lacks the key's secret");
    assert.equal(state.keys[0].status, KeyStatus.ACTIVE);
    assert.deepEqual(state.keys[0].allowedModels, ["gpt-4o-mini"]);
    assert.equal(state.clientKeys.length, 0);

    step = "AdminService.UpdateProviderKey (disable) seen on the Watch";
    const updated = await admin.updateProviderKey({
      tenant,
      id: key.id,
      key: { status: KeyStatus.DISABLED },
      updateMask: { paths: ["status"] },
      etag: key.etag,
    });
    assert.equal(updated.key?.status, KeyStatus.DISABLED);
    const disabled = await next("the delta of the disabled key");
    assert.ok(disabled.version > first.version, "the delta's version did not increase");
    const change = onlyChange(disabled);
    assert.equal(change.tenant, tenant);
    assert.equal(change.version, disabled.version);
    assert.equal(change.change.case, "keyPut", `expected keyPut, got ${change.change.case}`);
    assert.equal(change.change.value.id, key.id);
    assert.equal(change.change.value.status, KeyStatus.DISABLED);

    step = "AdminService.CreateClientKey seen on the Watch";
    const clientKey = await admin.createClientKey({ tenant, label: "ts-app" });
    assert.match(clientKey.token, /.{16,}/);
    const issued = await next("the delta of the new client key");
    assert.ok(issued.version > disabled.version, "the delta's version did not increase");
    const put = onlyChange(issued);
    assert.equal(put.change.case, "clientKeyPut", `expected clientKeyPut, got ${put.change.case}`);
    assert.equal(put.change.value.id, clientKey.clientKey?.id);
    assert.equal(
      Buffer.from(put.change.value.tokenSha256).toString("hex"),
      createHash("sha256").update(clientKey.token).digest("hex"),
      "the sidecar got a token hash that is not the SHA-256 of the issued token",
    );

    step = "AdminService.DeleteTenant seen on the Watch";
    await admin.deleteTenant({ name: tenant });
    const gone = await next("the tenant_deleted delta");
    const deleted = onlyChange(gone);
    assert.equal(deleted.change.case, "tenantDeleted");
    assert.equal(deleted.tenant, tenant);
  } finally {
    abort.abort();
  }
}

main().then(
  () => {
    console.log("ok: AdminService and SidecarService.Watch from TypeScript");
    process.exit(0);
  },
  (err: unknown) => {
    const detail = err instanceof ConnectError ? `${Code[err.code]}: ${err.rawMessage}` : String(err);
    console.error(`FAIL at ${step}: ${detail}`);
    if (err instanceof Error && err.stack) {
      console.error(err.stack);
    }
    process.exit(1);
  },
);
