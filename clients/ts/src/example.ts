// The README's example ("Clients in other languages"): create a tenant and a
// provider key, then follow the tenant's changes as a sidecar would. Run from
// clients/ts while `keyplane up` runs (tokens in $KEYPLANE_HOME, default ~/.keyplane):
//   KEYPLANE_ADMIN_TOKEN=$(cat ~/.keyplane/admin.token) KEYPLANE_SIDECAR_TOKEN=$(cat ~/.keyplane/sidecar.token) \
//   OPENAI_API_KEY=sk-... npx tsx src/example.ts
import { adminClient, sidecarClient, Provider } from "./client.js";

const admin = adminClient({ server: "127.0.0.1:50051", token: process.env.KEYPLANE_ADMIN_TOKEN! });
await admin.createTenant({ name: "acme" });
const { key } = await admin.createProviderKey({ tenant: "acme", provider: Provider.OPENAI, label: "main", secret: process.env.OPENAI_API_KEY! });
console.log("created key", key?.id, "ending in", key?.last4); // never the secret

const sidecar = sidecarClient({ server: "127.0.0.1:50051", token: process.env.KEYPLANE_SIDECAR_TOKEN! });
for await (const message of sidecar.watch({ tenants: ["acme"], sidecarId: "ts" })) {
  console.log(message.version, message.payload.case); // "snapshot", then "delta"s
}
