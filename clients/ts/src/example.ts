// The README's example: create a tenant and a key, then follow the changes
// of that tenant as a sidecar would. Run from clients/ts:
//   KEYPLANE_ADMIN_TOKEN=... KEYPLANE_SIDECAR_TOKEN=... OPENAI_API_KEY=... npx tsx src/example.ts
import { adminClient, sidecarClient, Provider } from "./client.js";

const server = process.env.KEYPLANE_SERVER ?? "127.0.0.1:50051";
const admin = adminClient({ server, token: process.env.KEYPLANE_ADMIN_TOKEN ?? "" });
const sidecar = sidecarClient({ server, token: process.env.KEYPLANE_SIDECAR_TOKEN ?? "" });

await admin.createTenant({ name: "acme" });
const { key } = await admin.createProviderKey({
  tenant: "acme", provider: Provider.OPENAI, label: "main", secret: process.env.OPENAI_API_KEY ?? "",
});
console.log("created", key?.id, key?.fingerprint);
for await (const message of sidecar.watch({ tenants: ["acme"], sidecarId: "example" })) {
  console.log(message.version, message.payload.case);
}
