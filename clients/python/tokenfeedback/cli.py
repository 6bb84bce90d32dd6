"""`tokenfeedback`: the command line over the Python client.

    tokenfeedback serve                           # policy + trainer on the demo model, Ctrl-C stops
    tokenfeedback generate "The capital of Canada is" --color always --save out.jsonl
    tokenfeedback annotate export.json            # Label Studio / doccano / JSONL, auto-detected
    tokenfeedback train --steps 20
    tokenfeedback --json status

Every command takes --json (one JSON object per line on stdout, errors included). Connection
options (--policy, --trainer, --tls-ca, --token-file, --timeout) go before or after the command;
the bearer token comes from --token-file or $TOKENFEEDBACK_TOKEN, never from the command line.

This module builds the parser and runs a command. The commands live in tokenfeedback/commands/,
one module each, and register themselves with `@command` (tokenfeedback.commands.registry);
modules listed in EXTENSIONS are imported when present (that is how `label` and
`labelstudio-*` plug in without editing this file).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import Any

from tokenfeedback.commands import BUILTIN
from tokenfeedback.commands.registry import (  # noqa: F401 - re-exported: extensions import them from here
    COMMANDS,
    DEFAULT_POLICY,
    DEFAULT_TIMEOUT,
    DEFAULT_TRAINER,
    CliError,
    Command,
    Context,
    command,
    to_dict,
)
from tokenfeedback.errors import TokenfeedbackError
from tokenfeedback.imports import ConversionError
from tokenfeedback.launch import LaunchError

# Modules that register more commands when they exist (owned by other parts of the project).
EXTENSIONS = ("tokenfeedback.label", "tokenfeedback.labelstudio")


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool, environ: dict[str, str]) -> None:
    """The connection and output options. On the subcommands they default to SUPPRESS, so a value
    given before the command is not overwritten by the subparser's default."""

    def default(value):
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection and output")
    group.add_argument("--policy", metavar="HOST:PORT",
                       default=default(environ.get("TOKENFEEDBACK_POLICY", DEFAULT_POLICY)),
                       help=f"policy server ($TOKENFEEDBACK_POLICY, default {DEFAULT_POLICY})")
    group.add_argument("--trainer", metavar="HOST:PORT",
                       default=default(environ.get("TOKENFEEDBACK_TRAINER", DEFAULT_TRAINER)),
                       help=f"trainer server ($TOKENFEEDBACK_TRAINER, default {DEFAULT_TRAINER})")
    group.add_argument("--tls-ca", metavar="PATH", default=default(None),
                       help="PEM root certificate(s): connect with TLS and trust these")
    group.add_argument("--token-file", metavar="PATH", default=default(None),
                       help="file holding the bearer token (else $TOKENFEEDBACK_TOKEN)")
    group.add_argument("--timeout", type=float, metavar="SECONDS", default=default(None),
                       help=f"deadline per call (default {DEFAULT_TIMEOUT:g}s; streams: none unless given)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="machine output: one JSON object per line on stdout")


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    environ = dict(os.environ) if environ is None else environ
    for module in BUILTIN:
        importlib.import_module(module)  # registers its command
    for module in EXTENSIONS:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            importlib.import_module(module)  # registers its commands
        except Exception as exc:  # noqa: BLE001 - one broken extension must not take the CLI down
            print(f"tokenfeedback: warning: commands of {module} unavailable: {exc}", file=sys.stderr)
    parser = argparse.ArgumentParser(
        prog="tokenfeedback",
        description="Generate with a policy server, annotate tokens, train from the annotations.",
    )
    _add_global_options(parser, top=True, environ=environ)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        child = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(child)
        _add_global_options(child, top=False, environ=environ)
        child.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = Context(args, json=args.json)
    try:
        return args._command.run(args, ctx)
    except (TokenfeedbackError, ConversionError, CliError, LaunchError, ValueError) as exc:
        code = 2 if isinstance(exc, CliError) else 1
        if ctx.json:
            error: dict[str, Any] = {"event": "error", "message": str(exc)}
            if isinstance(exc, TokenfeedbackError):
                error |= {"code": exc.code_name, "field": exc.field, "detail": exc.message}
            ctx.emit(error)
        print(f"tokenfeedback {args.command}: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tokenfeedback generate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
