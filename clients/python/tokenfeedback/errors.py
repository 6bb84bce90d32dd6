"""Typed errors for everything a client call can fail with.

Every failed RPC surfaces as a subclass of `TokenfeedbackError` chosen by its gRPC status code, so
callers can `except tokenfeedback.InvalidArgumentError` instead of inspecting `grpc.RpcError`.
The error keeps the status code, the server's message, the method and the address it was sent to;
`field` is the field the server named (its messages start "field.path: what went wrong").
"""

from __future__ import annotations

import re

import grpc

# "sequences[0] (annotation_id='a').token_labels[1].weight: must be finite, got nan"
#   -> "sequences[0] (annotation_id='a').token_labels[1].weight"
_PART = r"[A-Za-z_]\w*(?:\[\d+\])*(?: \((?:'[^']*'|\"[^\"]*\"|[^()'\"])*\))?"
_FIELD = re.compile(rf"^({_PART}(?:\.{_PART})*): ")


class TokenfeedbackError(Exception):
    """A failed call. `code` is the grpc.StatusCode (None for errors raised before any RPC)."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, method: str = "", address: str = ""):
        if code is not None:
            self.code = code
        self.message = message
        self.method = method
        self.address = address
        match = _FIELD.match(message)
        # The field the server named, when its message starts with one (the servers' convention).
        self.field: str | None = match.group(1) if match else None
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = " ".join(part for part in (self.method, f"at {self.address}" if self.address else "") if part)
        code = self.code.name if self.code is not None else "CLIENT"
        return f"{code}: {self.message}" + (f" ({where})" if where else "")

    @property
    def code_name(self) -> str:
        """The status name, e.g. "INVALID_ARGUMENT" (what --json output and the test vectors use)."""
        return self.code.name if self.code is not None else "CLIENT"


class CancelledError(TokenfeedbackError):
    code = grpc.StatusCode.CANCELLED


class UnknownError(TokenfeedbackError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(TokenfeedbackError, ValueError):
    """The request was malformed; the server changed nothing. `field` names the culprit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(TokenfeedbackError, TimeoutError):
    """The call's deadline passed (or no connection was made within it)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(TokenfeedbackError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TokenfeedbackError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(TokenfeedbackError):
    """Authenticated, but the credential's role may not call this (e.g. an annotator calling Train)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(TokenfeedbackError):
    """A deliberate server limit was reached (streams, sizes); send less or retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(TokenfeedbackError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(TokenfeedbackError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(TokenfeedbackError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(TokenfeedbackError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TokenfeedbackError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(TokenfeedbackError, ConnectionError):
    """No server reachable at the address (or it is starting/stopping). Idempotent calls are
    retried with backoff before this is raised."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(TokenfeedbackError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(TokenfeedbackError):
    """No bearer token, or a wrong one."""

    code = grpc.StatusCode.UNAUTHENTICATED


ERRORS: dict[grpc.StatusCode, type[TokenfeedbackError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_for(code: grpc.StatusCode, message: str, *, method: str = "", address: str = "") -> TokenfeedbackError:
    """The typed error for a status code (UnknownError for codes without a class of their own)."""
    return ERRORS.get(code, UnknownError)(message, code=code, method=method, address=address)


def from_rpc_error(error: grpc.RpcError, *, method: str = "", address: str = "") -> TokenfeedbackError:
    """Turn a grpc.RpcError (a grpc.Call) into the matching TokenfeedbackError."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, details, method=method, address=address)
