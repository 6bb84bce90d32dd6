"""The CLI's commands, one module per command; `registry` holds what they share.

tokenfeedback.cli imports BUILTIN (in this order, the order of `tokenfeedback --help`), then its
EXTENSIONS, so every command has registered itself before the parser is built.
"""

BUILTIN = tuple(f"tokenfeedback.commands.{name}" for name in ("generate", "annotate", "train", "status", "tokenize",
                                                               "serve"))
