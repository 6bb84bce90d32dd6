"""The CLI's Label Studio commands (registered when `tokenfeedback.cli` imports this package):

    tokenfeedback labelstudio-backend --policy HOST:PORT --trainer HOST:PORT --port 9090
    tokenfeedback labelstudio-config > config.xml
"""

from __future__ import annotations

import argparse

from tokenfeedback.cli import Context, command
from tokenfeedback.labelstudio.config import label_config


def _configure_backend(parser: argparse.ArgumentParser) -> None:
    from tokenfeedback.labelstudio.server import add_arguments

    add_arguments(parser)


@command("labelstudio-backend", "serve the Label Studio ML backend (pre-marks unlikely tokens, "
         "submits saved annotations, trains on request)", _configure_backend)
def run_backend(args: argparse.Namespace, ctx: Context) -> int:
    from tokenfeedback.labelstudio.server import config_from_args, serve

    serve(config_from_args(args, token=ctx.token()))
    return 0


@command("labelstudio-config", "print the Label Studio labeling config the backend expects")
def run_config(args: argparse.Namespace, ctx: Context) -> int:
    if ctx.json:
        ctx.emit({"label_config": label_config()})
    else:
        ctx.out.write(label_config())
    return 0
