// Typed errors for everything a call can fail with.
//
// Every failed RPC surfaces as a subclass of TokenfeedbackError chosen by its gRPC status code, so
// callers can write `if (err instanceof InvalidArgumentError)` instead of inspecting grpc-js's
// ServiceError. An error keeps the status code, the server's message, the method and the address;
// `field` is the field the server named (its messages start "field.path: what went wrong").
// The classes mirror the Python client's (clients/python/tokenfeedback/errors.py).

import { status as GrpcStatus } from "@grpc/grpc-js";

/** gRPC status codes (the numbers on the wire): Code.INVALID_ARGUMENT === 3. */
export const Code = GrpcStatus;
export type Code = GrpcStatus;

// "sequences[0].token_labels[1].weight: must be finite, got nan" -> "sequences[0].token_labels[1].weight";
// a segment may carry a note in parentheses, dropped from the field:
// "sequences[0] (annotation_id='a').token_labels[0].weight: ..." -> "sequences[0].token_labels[0].weight".
const SEGMENT = String.raw`[A-Za-z_]\w*(?:\[\d+\])?(?: \([^()]*\))?`;
const FIELD = new RegExp(String.raw`^(${SEGMENT}(?:\.${SEGMENT})*): `);
const NOTE = / \([^()]*\)/g;

export interface ErrorContext {
  /** The RPC, e.g. "tokenfeedback.v1.PolicyService/Generate"; "" for errors raised before any call. */
  method?: string;
  /** The address the call was sent to. */
  address?: string;
}

/** A failed call. `code` is the gRPC status, or null for errors raised before any RPC was made. */
export class TokenfeedbackError extends Error {
  readonly code: Code | null;
  /** The server's message (or the client's, for code null), without the code and method. */
  readonly details: string;
  readonly method: string;
  readonly address: string;
  /** The field the server named, when its message starts with one (the servers' convention). */
  readonly field: string | null;

  constructor(details: string, code: Code | null = null, context: ErrorContext = {}) {
    const method = context.method ?? "";
    const address = context.address ?? "";
    const where = [method, address ? `at ${address}` : ""].filter(Boolean).join(" ");
    super(`${codeName(code)}: ${details}${where ? ` (${where})` : ""}`);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
    this.method = method;
    this.address = address;
    this.field = FIELD.exec(details)?.[1].replace(NOTE, "") ?? null;
  }

  /** The status name, e.g. "INVALID_ARGUMENT" (what the test vectors use); "CLIENT" for code null. */
  get codeName(): string {
    return codeName(this.code);
  }
}

export function codeName(code: Code | null): string {
  return code === null ? "CLIENT" : (GrpcStatus[code] ?? `CODE_${code}`);
}

export class CancelledError extends TokenfeedbackError {}
export class UnknownError extends TokenfeedbackError {}
/** The request was malformed; the server changed nothing. `field` names the culprit. */
export class InvalidArgumentError extends TokenfeedbackError {}
/** The call's deadline passed (or no connection was made within it). */
export class DeadlineExceededError extends TokenfeedbackError {}
export class NotFoundError extends TokenfeedbackError {}
export class AlreadyExistsError extends TokenfeedbackError {}
/** Authenticated, but the credential's role may not call this (e.g. an annotator calling Train). */
export class PermissionDeniedError extends TokenfeedbackError {}
/** A deliberate server limit was reached (streams, sizes); send less or retry later. */
export class ResourceExhaustedError extends TokenfeedbackError {}
export class FailedPreconditionError extends TokenfeedbackError {}
export class AbortedError extends TokenfeedbackError {}
export class OutOfRangeError extends TokenfeedbackError {}
export class UnimplementedError extends TokenfeedbackError {}
export class InternalError extends TokenfeedbackError {}
/** No server reachable at the address (or it is starting or stopping). Idempotent calls are
 * retried with backoff before this is thrown. */
export class UnavailableError extends TokenfeedbackError {}
export class DataLossError extends TokenfeedbackError {}
/** No bearer token, or a wrong one. */
export class UnauthenticatedError extends TokenfeedbackError {}

type ErrorClass = new (details: string, code: Code | null, context?: ErrorContext) => TokenfeedbackError;

const ERRORS: Partial<Record<Code, ErrorClass>> = {
  [Code.CANCELLED]: CancelledError,
  [Code.UNKNOWN]: UnknownError,
  [Code.INVALID_ARGUMENT]: InvalidArgumentError,
  [Code.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [Code.NOT_FOUND]: NotFoundError,
  [Code.ALREADY_EXISTS]: AlreadyExistsError,
  [Code.PERMISSION_DENIED]: PermissionDeniedError,
  [Code.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [Code.FAILED_PRECONDITION]: FailedPreconditionError,
  [Code.ABORTED]: AbortedError,
  [Code.OUT_OF_RANGE]: OutOfRangeError,
  [Code.UNIMPLEMENTED]: UnimplementedError,
  [Code.INTERNAL]: InternalError,
  [Code.UNAVAILABLE]: UnavailableError,
  [Code.DATA_LOSS]: DataLossError,
  [Code.UNAUTHENTICATED]: UnauthenticatedError,
};

/** The typed error for a status code (UnknownError for codes without a class of their own). */
export function errorFor(code: Code, details: string, context: ErrorContext = {}): TokenfeedbackError {
  const cls = ERRORS[code] ?? UnknownError;
  return new cls(details, code, context);
}

/** Turn whatever a grpc-js call failed with into the matching TokenfeedbackError. */
export function fromGrpcError(error: unknown, context: ErrorContext = {}): TokenfeedbackError {
  if (error instanceof TokenfeedbackError) return error;
  const e = error as { code?: unknown; details?: unknown; message?: unknown };
  if (typeof e?.code === "number" && e.code in GrpcStatus) {
    const details = typeof e.details === "string" && e.details ? e.details : String(e.message ?? error);
    return errorFor(e.code as Code, details, context);
  }
  // Not a status (e.g. a message that failed to serialize): a client-side error.
  return new TokenfeedbackError(error instanceof Error ? error.message : String(error), null, context);
}
