"""Command-line flags made from a frozen config dataclass's fields, so the dataclass is the one
source of a server's settings (docs/design.md, "Servers").

    @dataclass(frozen=True)
    class Config:
        port: int = flag(50051, "port; 0 picks a free one")           # --port
        grace_s: float = flag(10.0, "seconds ...", name="--grace")    # a flag named otherwise
        tls: TlsFiles = TlsFiles()                                     # no `flag`: set by other code

    parser = argparse.ArgumentParser(...); add_flags(parser, Config)
    config = Config(**flag_values(parser.parse_args(argv), Config), tls=...)

A field made with `flag` is the flag `--field-name` (or `name`); its help is the field's
documentation, and " (default X)" is appended where there is a default to show. The argparse
type comes from the default (bool False: a switch) unless the extra keyword arguments give one.
Values are checked once, by the dataclass (`__post_init__`), not by the parser.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields


def flag(default, help: str, *, name: str | None = None, aliases: tuple[str, ...] = (), **argparse_kwargs) -> Field:
    """A config field that is also a command-line flag (see the module docstring)."""
    return field(default=default, metadata={"help": help, "flag": name, "aliases": aliases, "argparse": argparse_kwargs})


def is_flag(f: Field) -> bool:
    return "help" in f.metadata


def flag_name(cls: type, name: str) -> str:
    """The flag of field `name` of the config class `cls` ("grace_s" -> "--grace")."""
    return cls.__dataclass_fields__[name].metadata.get("flag") or "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per `flag` field of `cls`, in field order, with dest = the field's name."""
    for f in fields(cls):
        if not is_flag(f):
            continue
        kwargs = dict(f.metadata["argparse"])
        help_text = f.metadata["help"]
        if f.default is False:
            kwargs.setdefault("action", "store_true")
        else:
            if f.default is not None and f.default is not MISSING:
                kwargs.setdefault("type", type(f.default))
                if help_text != argparse.SUPPRESS:
                    help_text += " (default %(default)s)"
            kwargs["default"] = f.default
        parser.add_argument(flag_name(cls, f.name), *f.metadata["aliases"], dest=f.name, help=help_text, **kwargs)


def flag_values(namespace: argparse.Namespace, cls: type) -> dict:
    """{field name: parsed value} for the `flag` fields of `cls`."""
    return {f.name: getattr(namespace, f.name) for f in fields(cls) if is_flag(f)}
