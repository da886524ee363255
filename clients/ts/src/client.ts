// Hand-written helper over the generated stubs in ../gen: typed clients for
// the control plane's AdminService and SidecarService over HTTP/2 gRPC (the
// control plane is a plain gRPC server, so the Connect gRPC transport, not
// gRPC-Web), with the bearer token on every call.
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { AdminService } from "../gen/keyplane/v1/admin_service_pb.js";
import { SidecarService } from "../gen/keyplane/v1/sidecar_service_pb.js";

export interface ConnectOptions {
  /** "host:port" as the CLI's --server, or a full "http(s)://host:port" URL. */
  server: string;
  /** An admin token (kpa-...) for AdminService, a sidecar token (kps-...) for SidecarService. */
  token: string;
  /** Use TLS (https). Implied by an "https://" server. */
  tls?: boolean;
}

function baseUrl(options: ConnectOptions): string {
  if (/^https?:\/\//.test(options.server)) {
    return options.server;
  }
  return `${options.tls ? "https" : "http"}://${options.server}`;
}

function bearer(token: string): Interceptor {
  return (next) => async (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

function transport(options: ConnectOptions) {
  return createGrpcTransport({ baseUrl: baseUrl(options), interceptors: [bearer(options.token)] });
}

export function adminClient(options: ConnectOptions): Client<typeof AdminService> {
  return createClient(AdminService, transport(options));
}

export function sidecarClient(options: ConnectOptions): Client<typeof SidecarService> {
  return createClient(SidecarService, transport(options));
}

export * from "../gen/keyplane/v1/resources_pb.js";
export * from "../gen/keyplane/v1/admin_service_pb.js";
export * from "../gen/keyplane/v1/sidecar_service_pb.js";
