// Client behaviour that needs no server: errors, addresses, options, and failing fast when nothing
// answers at an address.

import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import {
  Code,
  InvalidArgumentError,
  PolicyClient,
  TokenfeedbackError,
  TrainerClient,
  UnavailableError,
  UnknownError,
  errorFor,
  fromGrpcError,
  parseAddress,
  readPem,
} from "../src/index.js";
import { closedPort } from "./env.js";

test("errorFor picks the class by status code and parses the field", () => {
  const err = errorFor(Code.INVALID_ARGUMENT, "params.top_p: must be in (0, 1], got 1.5", {
    method: "tokenfeedback.v1.PolicyService/Generate",
    address: "127.0.0.1:1",
  });
  assert.ok(err instanceof InvalidArgumentError);
  assert.ok(err instanceof TokenfeedbackError);
  assert.equal(err.code, Code.INVALID_ARGUMENT);
  assert.equal(err.codeName, "INVALID_ARGUMENT");
  assert.equal(err.field, "params.top_p");
  assert.equal(err.details, "params.top_p: must be in (0, 1], got 1.5");
  assert.match(err.message, /^INVALID_ARGUMENT: params\.top_p: .* \(tokenfeedback\.v1\.PolicyService\/Generate at 127\.0\.0\.1:1\)$/);
  assert.equal(err.name, "InvalidArgumentError");
});

for (const [details, field] of [
  ["sequences[0].token_labels[1].weight: must be finite, got nan", "sequences[0].token_labels[1].weight"],
  ["annotation_id: 1..200 characters", "annotation_id"],
  ["sequences[0] (annotation_id='x1').token_labels[0].weight: must be finite, got nan", "sequences[0].token_labels[0].weight"],
  ["params (a note).top_p: bad", "params.top_p"],
  ["no field here", null],
  ["two words: not a field", null],
] as const) {
  test(`field of ${JSON.stringify(details)} is ${field}`, () => {
    assert.equal(errorFor(Code.INVALID_ARGUMENT, details).field, field);
  });
}

test("every status code maps to a class whose code matches", () => {
  for (let code = 1; code <= 16; code++) {
    const err = errorFor(code as Code, "x");
    assert.equal(err.code, code);
    assert.equal(err.codeName, Code[code]);
  }
});

test("fromGrpcError keeps code and details of a grpc-js ServiceError; anything else is CLIENT", () => {
  const grpcError = Object.assign(new Error("14 UNAVAILABLE: down"), { code: 14, details: "down" });
  const err = fromGrpcError(grpcError);
  assert.ok(err instanceof UnavailableError);
  assert.equal(err.details, "down");
  const plain = fromGrpcError(new RangeError("int32 out of range"));
  assert.equal(plain.code, null);
  assert.equal(plain.codeName, "CLIENT");
  assert.ok(!(plain instanceof UnknownError));
});

test("parseAddress accepts HOST:PORT and schemes, rejects the rest", () => {
  assert.deepEqual(parseAddress("127.0.0.1:50051"), { target: "127.0.0.1:50051", tls: undefined });
  assert.deepEqual(parseAddress(" grpcs://example.org:443/ "), { target: "example.org:443", tls: true });
  assert.deepEqual(parseAddress("http://localhost:8080"), { target: "localhost:8080", tls: false });
  assert.deepEqual(parseAddress("[::1]:7"), { target: "[::1]:7", tls: undefined });
  assert.deepEqual(parseAddress("unix:/tmp/socket"), { target: "unix:/tmp/socket", tls: undefined });
  for (const bad of ["", "localhost", "127.0.0.1", "host:port", "a b:1", "127.0.0.1:50051/x"]) {
    assert.throws(() => parseAddress(bad), (e: unknown) => e instanceof TokenfeedbackError && e.code === null, bad);
  }
});

test("options are checked before any call", () => {
  const bad: [string, object][] = [
    ["token", { token: "" }],
    ["token", { token: "a\nb" }],
    ["timeoutMs", { timeoutMs: 0 }],
    ["connectTimeoutMs", { connectTimeoutMs: -1 }],
    ["retries", { retries: 1.5 }],
    ["clientCertificate and clientKey", { clientCertificate: "-----BEGIN CERTIFICATE-----\n" }],
    ["rootCertificates", { rootCertificates: "/nonexistent/roots.pem" }],
    ["tls", { tls: false, rootCertificates: "-----BEGIN CERTIFICATE-----\n" }],
  ];
  for (const [what, options] of bad) {
    assert.throws(
      () => new PolicyClient("127.0.0.1:1", options),
      (e: unknown) => e instanceof TokenfeedbackError && e.message.includes(what),
      what,
    );
  }
});

test("readPem takes PEM text, bytes or a path, and refuses a file that is not PEM", () => {
  const dir = mkdtempSync(join(tmpdir(), "tf-pem-"));
  const pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
  writeFileSync(join(dir, "ok.pem"), pem);
  writeFileSync(join(dir, "bad.pem"), "not a certificate");
  assert.equal(readPem(join(dir, "ok.pem"), "roots")?.toString(), pem);
  assert.equal(readPem(pem, "roots")?.toString(), pem);
  assert.equal(readPem(new TextEncoder().encode(pem), "roots")?.toString(), pem);
  assert.equal(readPem(undefined, "roots"), null);
  assert.throws(() => readPem(join(dir, "bad.pem"), "roots"), /is not a PEM file/);
});

test("a closed port fails with UnavailableError within seconds, retries included", async () => {
  const port = await closedPort();
  const client = new PolicyClient(`127.0.0.1:${port}`);
  const started = Date.now();
  await assert.rejects(client.getModelInfo(), (e: unknown) => {
    assert.ok(e instanceof UnavailableError, String(e));
    assert.equal(e.code, Code.UNAVAILABLE);
    assert.match(e.details, new RegExp(`cannot reach a server at 127\\.0\\.0\\.1:${port}`));
    return true;
  });
  assert.ok(Date.now() - started < 10_000, `took ${Date.now() - started} ms`);
  client.close();
});

test("a stream to a closed port fails with UnavailableError, not a hang", async () => {
  const port = await closedPort();
  const client = new TrainerClient(`127.0.0.1:${port}`, { retries: 0 });
  await assert.rejects(
    (async () => {
      for await (const _ of client.train({ steps: 1 })) assert.fail("no progress expected");
    })(),
    UnavailableError,
  );
  client.close();
});

test("an address that never answers fails after connectTimeoutMs", async () => {
  // 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never routed. Either the connection attempt hangs
  // (then the connect timeout ends it) or the network refuses it at once.
  const client = new PolicyClient("192.0.2.1:9", { connectTimeoutMs: 500, retries: 0, timeoutMs: 20_000 });
  const started = Date.now();
  await assert.rejects(client.getModelInfo(), UnavailableError);
  assert.ok(Date.now() - started < 5_000, `took ${Date.now() - started} ms`);
  client.close();
});

test("a call deadline shorter than the connect timeout ends as DEADLINE_EXCEEDED", async () => {
  const client = new PolicyClient("192.0.2.1:9", { connectTimeoutMs: 5_000, retries: 0 });
  await assert.rejects(client.getModelInfo({ timeoutMs: 200 }), (e: unknown) => {
    // Unreachable networks refuse at once (UNAVAILABLE); a silent one runs into the deadline.
    assert.ok(e instanceof TokenfeedbackError && (e.code === Code.DEADLINE_EXCEEDED || e.code === Code.UNAVAILABLE), String(e));
    return true;
  });
  client.close();
});

test("a message that cannot be encoded is a CLIENT error, before any call", async () => {
  const client = new PolicyClient("127.0.0.1:1", { retries: 0 });
  await assert.rejects(client.score({ promptText: "a", completionTokenIds: [2 ** 40] }), (e: unknown) => {
    assert.ok(e instanceof TokenfeedbackError, String(e));
    assert.equal(e.code, null);
    assert.match(e.details, /tokenfeedback\.v1\.ScoreRequest/);
    return true;
  });
  client.close();
});
