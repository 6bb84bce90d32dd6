// One gRPC channel with the client's connection policy: TLS, bearer token, deadlines, retries.
//
// Both clients (policy and trainer) talk through a Connection. It owns what every call shares:
// - TLS roots (a path or PEM bytes) and an optional client certificate, or plaintext;
// - a bearer token sent as `authorization: Bearer <token>` on every call, unary and streaming alike;
// - a connect deadline: a call waits at most `connectTimeoutMs` for a connection, and a refused
//   connection fails at once, so a bad address is an error within seconds, not a hang (grpc-js
//   alone would wait for the operating system's TCP timeout on an address that never answers);
// - per-call deadlines, and retries with exponential backoff on UNAVAILABLE for calls that are
//   safe to repeat (the caller says which); never for anything else.
// Messages are protobuf-es types generated from proto/ (gen/); grpc-js carries their bytes.
// The policy mirrors the Python client's (clients/python/tokenfeedback/connection.py).

import { readFileSync } from "node:fs";
import * as grpc from "@grpc/grpc-js";
import {
  create,
  fromBinary,
  toBinary,
  type DescMessage,
  type DescMethodClientStreaming,
  type DescMethodServerStreaming,
  type DescMethodUnary,
  type MessageInitShape,
  type MessageShape,
} from "@bufbuild/protobuf";
import { Code, DeadlineExceededError, TokenfeedbackError, UnavailableError, errorFor, fromGrpcError } from "./errors.js";

/** Exponential backoff for UNAVAILABLE on idempotent calls: retry k (1-based) first waits
 * min(maxBackoffMs, initialBackoffMs * multiplier^(k-1)) * (1 +- jitter). */
export interface RetryPolicy {
  /** Retries after the first attempt; 0 disables retrying. */
  retries: number;
  /** Wait before the first retry, milliseconds. */
  initialBackoffMs: number;
  /** Growth of the wait per retry. */
  multiplier: number;
  /** Cap on one wait, milliseconds. */
  maxBackoffMs: number;
  /** The wait is scaled by a random factor in [1 - jitter, 1 + jitter]. */
  jitter: number;
}

export const DEFAULT_RETRY: RetryPolicy = { retries: 4, initialBackoffMs: 100, multiplier: 2, maxBackoffMs: 2000, jitter: 0.2 };

/** PEM data, or the path of a PEM file. */
export type Pem = string | Uint8Array;

export interface ClientOptions {
  /** PEM root certificates the server's certificate must chain to (PEM text, bytes or a file path).
   * Implies TLS. */
  rootCertificates?: Pem;
  /** Use TLS. Default: true when rootCertificates or a client certificate is given or the address
   * starts with grpcs:// or https://, else plaintext. TLS without rootCertificates uses Node's roots. */
  tls?: boolean;
  /** Client certificate chain and key for servers that verify clients (give both or neither). */
  clientCertificate?: Pem;
  clientKey?: Pem;
  /** The name to check the server's certificate against, when it differs from the address's host. */
  tlsServerName?: string;
  /** Bearer token sent on every call (the servers' `--token-file` roles: annotator, admin). */
  token?: string;
  /** Default deadline of unary calls, milliseconds (null: none). Streams have none unless a call
   * gives one. Default 30000. */
  timeoutMs?: number | null;
  /** How long a call waits for a connection before failing with UNAVAILABLE. Default 5000. */
  connectTimeoutMs?: number;
  /** Retries on UNAVAILABLE for idempotent calls: a count, or a policy. Default 4 retries. */
  retries?: number | Partial<RetryPolicy>;
  /** Largest message sent or received, bytes. Default 64 MiB. */
  maxMessageBytes?: number;
}

export interface CallOptions {
  /** This call's deadline in milliseconds from now; overrides the client's default. */
  timeoutMs?: number | null;
  /** Aborting cancels the call (it then fails with CancelledError). */
  signal?: AbortSignal;
  /** Extra request metadata (headers). */
  metadata?: Record<string, string>;
}

// HOST:PORT, [IPv6]:PORT, or a gRPC target with a scheme (unix:/path, dns:///host:port).
const ADDRESS = /^(?:\[[0-9A-Fa-f:.]+\]|[^\s:/[\]]+):\d{1,5}$|^(?:unix|unix-abstract|dns|ipv4|ipv6):\S+$/;
// UNAVAILABLE details that come from the transport (as opposed to a server saying it is not ready).
const TRANSPORT = /connect|dns|resolv|socket|unreachable|handshake|ssl|tls|refused|reset|no connection/i;

/** Read PEM data from bytes, PEM text, or a file path, with a clear error when it is not PEM. */
export function readPem(value: Pem | undefined, what: string): Buffer | null {
  if (value === undefined) return null;
  if (typeof value !== "string") return Buffer.from(value);
  if (value.includes("-----BEGIN")) return Buffer.from(value);
  let data: Buffer;
  try {
    data = readFileSync(value);
  } catch (err) {
    throw new TokenfeedbackError(`${what}: cannot read ${value}: ${(err as Error).message}`);
  }
  if (!data.includes("-----BEGIN")) throw new TokenfeedbackError(`${what}: ${value} is not a PEM file`);
  return data;
}

/** Split "grpcs://host:port" into the bare target and whether the scheme asks for TLS. */
export function parseAddress(address: string): { target: string; tls: boolean | undefined } {
  let target = address.trim();
  let tls: boolean | undefined;
  for (const [scheme, secure] of [["grpc://", false], ["http://", false], ["grpcs://", true], ["https://", true]] as const) {
    if (target.startsWith(scheme)) {
      target = target.slice(scheme.length).replace(/\/+$/, "");
      tls = secure;
    }
  }
  if (!ADDRESS.test(target)) {
    throw new TokenfeedbackError(`address: expected HOST:PORT (e.g. 127.0.0.1:50051), got ${JSON.stringify(address)}`);
  }
  return { target, tls };
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done);
  });
}

const serializer =
  <D extends DescMessage>(schema: D) =>
  (message: MessageShape<D>): Buffer => {
    const bytes = toBinary(schema, message);
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  };

const deserializer =
  <D extends DescMessage>(schema: D) =>
  (bytes: Buffer): MessageShape<D> =>
    fromBinary(schema, bytes);

/** The gRPC path of a method, e.g. "/tokenfeedback.v1.PolicyService/Generate". */
export function methodPath(method: { name: string; parent: { typeName: string } }): string {
  return `/${method.parent.typeName}/${method.name}`;
}

/** A channel to one server plus the calling conventions (deadlines, retries, typed errors). */
export class Connection {
  readonly address: string;
  readonly tls: boolean;
  readonly timeoutMs: number | null;
  readonly connectTimeoutMs: number;
  readonly retry: RetryPolicy;
  private readonly client: grpc.Client;
  private readonly token: string | null;

  constructor(address: string, options: ClientOptions = {}) {
    const { target, tls: schemeTls } = parseAddress(address);
    const token = options.token?.trim();
    if (options.token !== undefined && (!token || /[\r\n]/.test(token))) {
      throw new TokenfeedbackError("token: must be a non-empty single line");
    }
    const timeoutMs = options.timeoutMs === undefined ? 30_000 : options.timeoutMs;
    if (timeoutMs !== null && !(timeoutMs > 0)) {
      throw new TokenfeedbackError(`timeoutMs: must be > 0 or null, got ${timeoutMs}`);
    }
    const connectTimeoutMs = options.connectTimeoutMs ?? 5_000;
    if (!(connectTimeoutMs > 0)) {
      throw new TokenfeedbackError(`connectTimeoutMs: must be > 0, got ${connectTimeoutMs}`);
    }
    const retries = options.retries ?? {};
    this.retry = { ...DEFAULT_RETRY, ...(typeof retries === "number" ? { retries } : retries) };
    if (!(Number.isInteger(this.retry.retries) && this.retry.retries >= 0)) {
      throw new TokenfeedbackError(`retries: must be an integer >= 0, got ${this.retry.retries}`);
    }
    const roots = readPem(options.rootCertificates, "rootCertificates");
    const cert = readPem(options.clientCertificate, "clientCertificate");
    const key = readPem(options.clientKey, "clientKey");
    if ((cert === null) !== (key === null)) {
      throw new TokenfeedbackError("clientCertificate and clientKey: give both or neither");
    }
    this.address = target;
    this.tls = options.tls ?? (schemeTls || roots !== null || cert !== null);
    if (!this.tls && (roots !== null || cert !== null)) {
      throw new TokenfeedbackError("tls: false contradicts the certificates given");
    }
    this.timeoutMs = timeoutMs;
    this.connectTimeoutMs = connectTimeoutMs;
    this.token = token ?? null;
    const maxBytes = options.maxMessageBytes ?? 64 * 1024 * 1024;
    const channelOptions: grpc.ChannelOptions = {
      "grpc.max_receive_message_length": maxBytes,
      "grpc.max_send_message_length": maxBytes,
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": 2000,
      "grpc.enable_retries": 0, // retries are ours (idempotent calls only)
    };
    if (options.tlsServerName) {
      channelOptions["grpc.ssl_target_name_override"] = options.tlsServerName;
      channelOptions["grpc.default_authority"] = options.tlsServerName;
    }
    const credentials = this.tls
      ? grpc.credentials.createSsl(roots, key, cert)
      : grpc.credentials.createInsecure();
    this.client = new grpc.Client(target, credentials, channelOptions);
  }

  // ---- calls -------------------------------------------------------------------------------------

  /** Call a unary RPC. The deadline (default: the connection's) bounds the whole call, retries
   * included; UNAVAILABLE is retried with backoff only when `idempotent`. */
  async unary<I extends DescMessage, O extends DescMessage>(
    method: DescMethodUnary<I, O>,
    request: MessageInitShape<I>,
    idempotent: boolean,
    call: CallOptions = {},
  ): Promise<MessageShape<O>> {
    const timeoutMs = call.timeoutMs === undefined ? this.timeoutMs : call.timeoutMs;
    const deadline = timeoutMs === null ? null : Date.now() + timeoutMs;
    const name = methodPath(method).slice(1);
    const message = this.build(method.input, request, name);
    for (let retry = 0; ; retry++) {
      let error: TokenfeedbackError;
      try {
        await this.connected(deadline, name, timeoutMs, call.signal);
        return await new Promise<MessageShape<O>>((resolve, reject) => {
          const pending = this.client.makeUnaryRequest(
            methodPath(method),
            serializer(method.input),
            deserializer(method.output),
            message,
            this.metadata(call),
            deadline === null ? {} : { deadline },
            (err, reply) => (err ? reject(err) : resolve(reply as MessageShape<O>)),
          );
          this.cancelOnAbort(pending, call.signal, reject);
        });
      } catch (err) {
        error = this.error(err, name, timeoutMs);
      }
      if (!(await this.shouldRetry(error, idempotent, retry, deadline, call.signal))) throw error;
    }
  }

  /** Call a server-streaming RPC and yield its messages. The deadline (default none: streams run
   * as long as they need) bounds the whole stream. An idempotent stream is retried on UNAVAILABLE
   * only before its first message. Leaving the loop early (break, throw) cancels the call. */
  async *serverStream<I extends DescMessage, O extends DescMessage>(
    method: DescMethodServerStreaming<I, O>,
    request: MessageInitShape<I>,
    idempotent: boolean,
    call: CallOptions = {},
  ): AsyncGenerator<MessageShape<O>, void, undefined> {
    const timeoutMs = call.timeoutMs ?? null;
    const deadline = timeoutMs === null ? null : Date.now() + timeoutMs;
    const name = methodPath(method).slice(1);
    const message = this.build(method.input, request, name);
    for (let retry = 0; ; retry++) {
      let error: TokenfeedbackError;
      let received = false;
      let stream: grpc.ClientReadableStream<MessageShape<O>> | null = null;
      let aborted: unknown = null;
      try {
        await this.connected(deadline, name, timeoutMs, call.signal);
        stream = this.client.makeServerStreamRequest(
          methodPath(method),
          serializer(method.input),
          deserializer(method.output),
          message,
          this.metadata(call),
          deadline === null ? {} : { deadline },
        );
        // The status also arrives as an 'error' event after a cancel: keep it from being unhandled.
        stream.on("error", () => {});
        this.cancelOnAbort(stream, call.signal, (reason) => (aborted = reason));
        for await (const reply of stream) {
          received = true;
          yield reply as MessageShape<O>;
        }
        if (aborted !== null) throw aborted;
        return;
      } catch (err) {
        error = this.error(err, name, timeoutMs);
      } finally {
        stream?.cancel(); // a no-op once the stream ended; frees the server's slot otherwise
      }
      if (received || !(await this.shouldRetry(error, idempotent, retry, deadline, call.signal))) throw error;
    }
  }

  /** Call a client-streaming RPC: send every message of `requests`, then wait for the reply.
   * Never retried (the messages may be consumed). */
  async clientStream<I extends DescMessage, O extends DescMessage>(
    method: DescMethodClientStreaming<I, O>,
    requests: AsyncIterable<MessageInitShape<I>> | Iterable<MessageInitShape<I>>,
    call: CallOptions = {},
  ): Promise<MessageShape<O>> {
    const timeoutMs = call.timeoutMs ?? null;
    const deadline = timeoutMs === null ? null : Date.now() + timeoutMs;
    const name = methodPath(method).slice(1);
    try {
      await this.connected(deadline, name, timeoutMs, call.signal);
      let stream: grpc.ClientWritableStream<MessageShape<I>> | null = null;
      const reply = new Promise<MessageShape<O>>((resolve, reject) => {
        stream = this.client.makeClientStreamRequest(
          methodPath(method),
          serializer(method.input),
          deserializer(method.output),
          this.metadata(call),
          deadline === null ? {} : { deadline },
          (err, response) => (err ? reject(err) : resolve(response as MessageShape<O>)),
        );
        this.cancelOnAbort(stream, call.signal, reject);
      });
      reply.catch(() => {}); // awaited below; an early failure must not be an unhandled rejection
      const writer = stream as unknown as grpc.ClientWritableStream<MessageShape<I>>;
      try {
        for await (const request of requests) {
          if (writer.destroyed || writer.writableEnded) break; // the call already failed
          const built = this.build(method.input, request, name);
          if (!writer.write(built)) await new Promise((resolve) => writer.once("drain", resolve));
        }
        writer.end();
      } catch (err) {
        writer.cancel();
        throw err;
      }
      return await reply;
    } catch (err) {
      throw this.error(err, name, timeoutMs);
    }
  }

  /** Close the channel; calls in flight are cancelled. */
  close(): void {
    this.client.close();
  }

  // ---- helpers -----------------------------------------------------------------------------------

  private build<D extends DescMessage>(schema: D, init: MessageInitShape<D>, name: string): MessageShape<D> {
    try {
      const message = create(schema, init);
      toBinary(schema, message); // fail here, with a typed error, rather than inside grpc-js
      return message;
    } catch (err) {
      throw new TokenfeedbackError(`${schema.typeName}: ${(err as Error).message}`, null, {
        method: name,
        address: this.address,
      });
    }
  }

  private metadata(call: CallOptions): grpc.Metadata {
    const metadata = new grpc.Metadata();
    for (const [key, value] of Object.entries(call.metadata ?? {})) metadata.set(key, value);
    if (this.token !== null) metadata.set("authorization", `Bearer ${this.token}`);
    return metadata;
  }

  private cancelOnAbort(
    call: { cancel(): void },
    signal: AbortSignal | undefined,
    fail: (reason: unknown) => void,
  ): void {
    if (!signal) return;
    const cancel = () => {
      fail(errorFor(Code.CANCELLED, "cancelled by the caller", { address: this.address }));
      call.cancel();
    };
    if (signal.aborted) cancel();
    else signal.addEventListener("abort", cancel, { once: true });
  }

  /** Wait until the channel is connected, at most until `deadline` and connectTimeoutMs. A channel
   * whose connection attempt failed (refused, unresolvable, TLS handshake) is not waited for: the
   * call then fails at once with UNAVAILABLE and grpc-js's reason. */
  private async connected(
    deadline: number | null,
    name: string,
    timeoutMs: number | null,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    const channel = this.client.getChannel();
    let state = channel.getConnectivityState(true);
    const connectBy = Date.now() + this.connectTimeoutMs;
    const until = deadline === null ? connectBy : Math.min(deadline, connectBy);
    const context = { method: name, address: this.address };
    while (state === grpc.connectivityState.IDLE || state === grpc.connectivityState.CONNECTING) {
      if (signal?.aborted) throw errorFor(Code.CANCELLED, "cancelled by the caller", context);
      const changed = await new Promise<boolean>((resolve) =>
        channel.watchConnectivityState(state, until, (err) => resolve(!err)),
      );
      if (!changed) {
        if (deadline !== null && deadline <= connectBy) {
          throw new DeadlineExceededError(
            `no connection within the ${timeoutMs! / 1000}s deadline`, Code.DEADLINE_EXCEEDED, context);
        }
        throw new UnavailableError(
          `cannot reach a server at ${this.address}: no connection within ${this.connectTimeoutMs / 1000}s`,
          Code.UNAVAILABLE, context);
      }
      state = channel.getConnectivityState(true);
    }
    if (state === grpc.connectivityState.SHUTDOWN) {
      throw new UnavailableError("the client was closed", Code.UNAVAILABLE, context);
    }
  }

  private async shouldRetry(
    error: TokenfeedbackError,
    idempotent: boolean,
    retry: number,
    deadline: number | null,
    signal: AbortSignal | undefined,
  ): Promise<boolean> {
    if (!(idempotent && error instanceof UnavailableError && retry < this.retry.retries) || signal?.aborted) {
      return false;
    }
    const p = this.retry;
    const base = Math.min(p.maxBackoffMs, p.initialBackoffMs * p.multiplier ** retry);
    const wait = base * (1 + p.jitter * (2 * Math.random() - 1));
    // Give up early when the wait would run past the deadline anyway.
    if (deadline !== null && Date.now() + wait >= deadline) return false;
    await sleep(wait, signal);
    return !signal?.aborted;
  }

  private error(err: unknown, name: string, timeoutMs: number | null): TokenfeedbackError {
    const context = { method: name, address: this.address };
    if (err instanceof TokenfeedbackError) {
      if (err.method) return err;
      return err.code === null ? new TokenfeedbackError(err.details, null, context) : errorFor(err.code, err.details, context);
    }
    let error = fromGrpcError(err, context);
    // grpc-js appends an empty "Resolution note:" to connection errors: drop it.
    const details = error.details.replace(/\.?\s*Resolution note:\s*$/, "");
    if (details !== error.details && error.code !== null) error = errorFor(error.code, details, context);
    if (error.code === Code.DEADLINE_EXCEEDED && timeoutMs !== null) {
      return errorFor(error.code, `${error.details} (no answer within the ${timeoutMs / 1000}s deadline)`, context);
    }
    if (error.code === Code.UNAVAILABLE && TRANSPORT.test(error.details)) {
      return errorFor(error.code, `cannot reach a server at ${this.address}: ${error.details}`, context);
    }
    return error;
  }

}
