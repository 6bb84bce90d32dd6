"""Bearer-token authentication with two roles, shared by both servers and both transports.

Who may call what (docs/design.md, "Security"):
- `annotator`: generate, score, tokenize, align spans, model info; submit, withdraw and read
  annotations; trainer status. What a labeling tool or a person annotating needs.
- `admin`: everything an annotator may, plus Train, SaveCheckpoint and the policy server's
  UpdateWeights. Nobody who can merely reach a policy server can replace its model.
- open: gRPC health checking and reflection (load balancers and grpcurl need them; they reveal
  nothing a client of the proto does not know).

Tokens come from files (one token per line, `#` comments; several lines give several valid tokens,
e.g. one per annotator or an old and a new one while rotating) or from environment variables, read
once at start (server `main`), never from a command-line argument (argv is visible to every user
of the machine in `ps`). A token is kept only as its SHA-256 digest; a presented token is hashed
and compared with `hmac.compare_digest` against every configured digest, so the time a check
takes does not depend on how much of a token was right. Auth is on as soon as one token is
configured; without any, every call is allowed (the loopback default, see `exposure_warning`).

`authorize(tokens, method, authorization_header)` is the one check; common/guard.py applies it to
every gRPC call (an interceptor, unary and streaming alike) and every Connect call.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

ANNOTATOR = "annotator"
ADMIN = "admin"
ROLES = (ANNOTATOR, ADMIN)  # ordered: each role may do what the ones before it may

# Full gRPC method path -> the least role that may call it. Methods of these services that are
# not listed need ADMIN (deny by default: a new RPC is admin-only until someone decides otherwise).
METHOD_ROLES: dict[str, str] = {
    "/tokenfeedback.v1.PolicyService/Generate": ANNOTATOR,
    "/tokenfeedback.v1.PolicyService/Score": ANNOTATOR,
    "/tokenfeedback.v1.PolicyService/Tokenize": ANNOTATOR,
    "/tokenfeedback.v1.PolicyService/AlignSpans": ANNOTATOR,
    "/tokenfeedback.v1.PolicyService/GetModelInfo": ANNOTATOR,
    "/tokenfeedback.v1.PolicyService/UpdateWeights": ADMIN,
    "/tokenfeedback.v1.TrainerService/SubmitAnnotations": ANNOTATOR,
    "/tokenfeedback.v1.TrainerService/WithdrawAnnotations": ANNOTATOR,
    "/tokenfeedback.v1.TrainerService/GetAnnotation": ANNOTATOR,
    "/tokenfeedback.v1.TrainerService/GetStatus": ANNOTATOR,
    "/tokenfeedback.v1.TrainerService/Train": ADMIN,
    "/tokenfeedback.v1.TrainerService/SaveCheckpoint": ADMIN,
}
# Services anyone may call, with or without a token.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# Environment variables a server's main() reads once (never deeper in the code).
ENV_ANNOTATOR = "TOKENFEEDBACK_ANNOTATOR_TOKEN"
ENV_ADMIN = "TOKENFEEDBACK_ADMIN_TOKEN"
ENV_POLICY = "TOKENFEEDBACK_POLICY_TOKEN"  # the admin token the trainer presents to policy servers

MIN_TOKEN_CHARS = 16  # shorter tokens are refused at start: guessable over a network


def role_needed(method: str) -> str | None:
    """The least role a method needs; None for the open services."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return METHOD_ROLES.get(method, ADMIN)


class Secret:
    """A token the process must send or check, never shown: repr and str print `<secret>`, so a
    config logged at start (dataclasses.asdict, json) cannot leak it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = check_token(value, "token")

    def reveal(self) -> str:
        return self._value

    def digest(self) -> bytes:
        return hashlib.sha256(self._value.encode()).digest()

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __deepcopy__(self, memo) -> Secret:  # dataclasses.asdict deep-copies field values
        return self

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self.digest(), other.digest())

    def __hash__(self) -> int:
        return hash(self.digest())


def check_token(value: str, what: str) -> str:
    """A token is one line of printable, non-space ASCII of at least MIN_TOKEN_CHARS characters
    (what fits an HTTP header unchanged); anything else is a configuration error."""
    value = value.strip()
    if len(value) < MIN_TOKEN_CHARS:
        raise ValueError(f"{what}: a token must be at least {MIN_TOKEN_CHARS} characters, got {len(value)}")
    if not all(33 <= ord(c) <= 126 for c in value):
        raise ValueError(f"{what}: a token must be printable ASCII without spaces")
    return value


def read_token_file(path: str | Path, what: str) -> tuple[Secret, ...]:
    """The tokens of a file: one per line, blank lines and `#` comments skipped. Warns when the
    file can be read by other users (like ssh, but without refusing: containers often mount
    secrets with loose modes)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {path} is not UTF-8 text") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s: %s is readable by other users (chmod 600 it)", what, path)
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(Secret(check_token(line, f"{what}: {path} line {number}")))
    if not tokens:
        raise ValueError(f"{what}: {path} holds no token")
    return tuple(tokens)


@dataclass(frozen=True)
class AuthTokens:
    """The tokens a server accepts, per role. Empty everywhere: auth is off."""

    annotator: tuple[Secret, ...] = ()  # tokens that may annotate (generate, score, submit, status, ...)
    admin: tuple[Secret, ...] = ()  # tokens that may also train, checkpoint and replace weights

    @property
    def enabled(self) -> bool:
        return bool(self.annotator or self.admin)

    def role_of(self, presented: str) -> str | None:
        """The role of a presented token (ADMIN wins when a token is in both), None if unknown.
        Every configured digest is compared, whatever matched first: constant work per call."""
        digest = hashlib.sha256(presented.encode()).digest()
        is_admin = False
        is_annotator = False
        for token in self.admin:
            is_admin |= hmac.compare_digest(digest, token.digest())
        for token in self.annotator:
            is_annotator |= hmac.compare_digest(digest, token.digest())
        return ADMIN if is_admin else ANNOTATOR if is_annotator else None


def bearer(authorization: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header value, None when absent or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorize(tokens: AuthTokens, method: str, authorization: str | None) -> str | None:
    """Check one call. Returns the caller's role (None for open methods or with auth off).
    Raises Unauthenticated (no token, or one nobody configured) or PermissionDenied (an annotator
    token on an admin method). Messages never repeat the presented token."""
    needed = role_needed(method)
    if needed is None or not tokens.enabled:
        return None
    presented = bearer(authorization)
    if presented is None:
        raise Unauthenticated(f"{method} needs a bearer token: send the metadata `authorization: Bearer <token>`")
    role = tokens.role_of(presented)
    if role is None:
        raise Unauthenticated(f"{method}: the bearer token is not valid on this server")
    if ROLES.index(role) < ROLES.index(needed):
        raise PermissionDenied(f"{method} needs the {needed} role; this token has the {role} role")
    return role


# ---- configuration: flags, environment, the warning for exposed servers -------------------------


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """--annotator-token-file / --admin-token-file (the tokens themselves never go on argv)."""
    parser.add_argument("--annotator-token-file", metavar="PATH", default=None,
                        help=f"file of annotator tokens, one per line (also ${ENV_ANNOTATOR}); turns auth on")
    parser.add_argument("--admin-token-file", metavar="PATH", default=None,
                        help=f"file of admin tokens, one per line (also ${ENV_ADMIN}); turns auth on")


def tokens_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> AuthTokens:
    """AuthTokens from the parsed flags and the environment a server's main passes (once)."""
    roles: dict[str, tuple[Secret, ...]] = {}
    for role, path, env in ((ANNOTATOR, args.annotator_token_file, ENV_ANNOTATOR),
                            (ADMIN, args.admin_token_file, ENV_ADMIN)):
        found: tuple[Secret, ...] = read_token_file(path, f"--{role}-token-file") if path else ()
        if environ.get(env, "").strip():
            found += (Secret(check_token(environ[env], f"${env}")),)
        roles[role] = found
    return AuthTokens(annotator=roles[ANNOTATOR], admin=roles[ADMIN])


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost are loopback; anything else (0.0.0.0, a name) is not."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, tls: bool, tokens: AuthTokens) -> str | None:
    """The warning a server logs when it listens beyond loopback without TLS or without auth."""
    if is_loopback(host):
        return None
    missing = [what for what, on in (("TLS (--tls-cert/--tls-key)", tls),
                                     ("auth (--annotator-token-file/--admin-token-file)", tokens.enabled)) if not on]
    if not missing:
        return None
    return (f"listening on {host}, beyond loopback, without {' and without '.join(missing)}: anyone who can "
            "reach this port can " + ("read and change everything" if not tokens.enabled else "read the traffic"))


def log_auth_summary(logger: logging.Logger, host: str, tls: bool, tokens: AuthTokens, server_name: str) -> None:
    """One line at start saying what protects the server, and the exposure warning if any."""
    logger.info("%s: TLS %s, auth %s (%d annotator, %d admin token(s))", server_name, "on" if tls else "off",
                "on" if tokens.enabled else "off", len(tokens.annotator), len(tokens.admin))
    if tokens.enabled and not tokens.admin:
        logger.warning("%s: auth is on but no admin token is configured: admin RPCs are refused to everyone",
                       server_name)
    warning = exposure_warning(host, tls, tokens)
    if warning:
        logger.warning("%s: %s", server_name, warning)


def loggable(value):
    """A config value as plain JSON-able data with every Secret shown as "<secret>"."""
    if isinstance(value, Secret):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): loggable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [loggable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
