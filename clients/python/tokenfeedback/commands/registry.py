"""The command registry and what every command is handed: its arguments and a `Context`.

Adding a command: in any module, define `configure(parser)` and `run(args, ctx) -> int` and
register them with `@command(name, help, configure)`. The built-in commands are the other modules
of this package; tokenfeedback.cli imports them, and the modules it lists in EXTENSIONS, before it
builds the parser.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

from tokenfeedback.client import PolicyClient, TrainerClient

DEFAULT_POLICY = "127.0.0.1:50051"  # where `serve` binds the policy server by default
DEFAULT_TRAINER = "127.0.0.1:50052"  # ... and the trainer
DEFAULT_TIMEOUT = 30.0  # seconds for a unary call; streams have no deadline unless --timeout is given


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Context], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] = lambda parser: None):
    """Register `run(args, ctx) -> exit code` as the subcommand `name`."""

    def register(run: Callable[[argparse.Namespace, Context], int]):
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


@dataclass
class Context:
    """What a command needs besides its arguments: clients built from the global options, and
    output that is human text or JSON lines."""

    args: argparse.Namespace
    json: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def token(self) -> str | None:
        """From --token-file, else $TOKENFEEDBACK_TOKEN; never from the command line."""
        path = getattr(self.args, "token_file", None)
        if path:
            return read_token_file(path, "--token-file")
        return self.environ.get("TOKENFEEDBACK_TOKEN", "").strip() or None

    def _options(self) -> dict[str, Any]:
        timeout = getattr(self.args, "timeout", None)
        return dict(
            root_certificates=getattr(self.args, "tls_ca", None),
            tls=True if getattr(self.args, "tls_ca", None) else None,
            token=self.token(),
            timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
        )

    def policy(self) -> PolicyClient:
        return PolicyClient(self.args.policy, **self._options())

    def trainer(self) -> TrainerClient:
        return TrainerClient(self.args.trainer, **self._options())

    @property
    def stream_timeout(self) -> float | None:
        """--timeout bounds a stream only when given explicitly."""
        return getattr(self.args, "timeout", None)

    def emit(self, obj: dict[str, Any]) -> None:
        """One JSON object per line (--json)."""
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()

    def say(self, text: str = "", *, end: str = "\n") -> None:
        """Human output on stdout (suppressed with --json)."""
        if not self.json:
            self.out.write(text + end)
            self.out.flush()

    def note(self, text: str) -> None:
        """Human side remarks on stderr (suppressed with --json)."""
        if not self.json:
            self.err.write(text + "\n")
            self.err.flush()


class CliError(Exception):
    """A usage or input problem found by the CLI itself (exit code 2)."""


def to_dict(message) -> dict[str, Any]:
    """A protobuf message as JSON-ready dict: proto field names, every field, int64 as numbers."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def with_numeric_horizon(fields: dict[str, Any]) -> dict[str, Any]:
    """A to_dict of TrainerStatus or TrainProgress with `horizon` a JSON number where it is one
    ("1" -> 1; "full" stays a string, as in TrainRequest.horizon)."""
    horizon = fields.get("horizon")
    if isinstance(horizon, str) and horizon.isdigit():
        fields["horizon"] = int(horizon)
    return fields


def to_dict_compact(message) -> dict[str, Any]:
    """The proto JSON mapping as `annotate` reads it back (lowerCamelCase, defaults left out)."""
    return json_format.MessageToDict(message)


def read_token_file(path: str | Path, flag: str) -> str:
    """The token in the file `flag` names (stripped); CliError naming the flag if it cannot be
    read or is empty. Tokens come from files or the environment, never from the command line."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CliError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise CliError(f"{flag}: {path} is empty")
    return token
