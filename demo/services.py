"""Both servers as real subprocesses on 127.0.0.1, for one run of the loop.

Each run gets a fresh trainer data folder, so every arm of an experiment starts from the same
weights (version 0) and an empty annotation store.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tokenfeedback.launch import Servers, start_servers


@contextmanager
def running_services(model: str, trainer_flags: list[str], *, data: Path | None = None, log=print):
    """Start the policy server, then the trainer publishing to it (tokenfeedback.launch); yield
    (policy, trainer) server processes; stop both (trainer first) however the block ends."""
    own = data is None
    data = Path(tempfile.mkdtemp(prefix="tokenfeedback-demo-")) if own else data
    servers: Servers | None = None
    try:
        servers = start_servers(model, data, trainer_args=trainer_flags)
        log(f"policy server on {servers.policy.address}")
        log(f"trainer server on {servers.trainer.address} (data in {data})")
        yield servers.policy, servers.trainer
    finally:
        codes = servers.stop() if servers is not None else {}
        if own:
            shutil.rmtree(data, ignore_errors=True)
        bad = {name: code for name, code in codes.items() if code not in (0, None)}
        if bad:
            log(f"warning: servers exited uncleanly: {bad}")
