// The page's clients: the same services and messages as every other client, generated from proto/
// by protoc-gen-es, spoken over Connect to the origin that served the page.

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { PolicyService } from "../gen/tokenfeedback/v1/policy_pb";
import { TrainerService } from "../gen/tokenfeedback/v1/trainer_pb";

let bearer = "";

/** The annotator's credential, sent on every call once set (same auth as the other clients). */
export function setBearer(token: string): void {
  bearer = token.trim();
}

const auth: Interceptor = (next) => async (req) => {
  if (bearer) req.header.set("authorization", `Bearer ${bearer}`);
  return next(req);
};

const transport = createConnectTransport({
  baseUrl: new URL(".", location.href).href.replace(/\/$/, ""),
  useBinaryFormat: true,
  interceptors: [auth],
});

export const policy = createClient(PolicyService, transport);
export const trainer = createClient(TrainerService, transport);

/** "unavailable: trainer at 127.0.0.1:5 unreachable" from anything a call threw. */
export function describe(err: unknown): string {
  const e = ConnectError.from(err);
  return `${Code[e.code].replace(/[A-Z]/g, (c, i) => (i ? "_" : "") + c.toLowerCase())}: ${e.rawMessage}`;
}

export function isAbort(err: unknown): boolean {
  return ConnectError.from(err).code === Code.Canceled;
}
