"""Errors the engines raise, free of grpc.

The engines (generation, store, training) know nothing of gRPC or Connect; they raise these, and
each transport maps them to its status codes in one place (common/rpc.py for gRPC,
common/connect.py for Connect). Every error names the field it is about, so a client sees
"params.top_p: must be in (0, 1], got 1.5" rather than a stack trace.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: an error a client caused or can act on. `code` names the status to send."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgument(ServiceError):
    """The request is malformed; nothing was changed."""

    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    """The request is well-formed but the system is not in a state to run it."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    """A deliberate limit was reached (streams, sizes); retry later or send less."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """Not ready yet (model loading) or shutting down; safe to retry."""

    code = "UNAVAILABLE"


class Aborted(ServiceError):
    """A concurrent change won (e.g. another weight update); retry."""

    code = "ABORTED"


class Unimplemented(ServiceError):
    """This transport does not offer the RPC (e.g. UpdateWeights over Connect)."""

    code = "UNIMPLEMENTED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


def check(condition: bool, field: str, message: str) -> None:
    """Raise InvalidArgument(message, field) unless condition holds."""
    if not condition:
        raise InvalidArgument(message, field)


def quote(value, limit: int = 80) -> str:
    """A client-supplied value as an error message may quote it: its repr, cut to `limit`
    characters with the full length said, so that no error grows with what a client sent
    (a status message travels in gRPC metadata, which has a size limit; docs/design.md,
    "Errors and limits")."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, (str, bytes)) else ""
    return f"{text[: max(limit - 3, 1)]}...{length}"
