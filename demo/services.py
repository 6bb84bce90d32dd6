"""Both servers as real subprocesses on 127.0.0.1, for one run of the loop.

Each run gets a fresh trainer data folder, so every arm of an experiment starts from the same
weights (version 0) and an empty annotation store.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from common.process import ServerProcess, start_server


@contextmanager
def running_services(model: str, trainer_flags: list[str], *, data: Path | None = None, log=print):
    """Start the policy server, then the trainer publishing to it; yield (policy, trainer) server
    processes; stop both (trainer first) however the block ends."""
    own = data is None
    data = Path(tempfile.mkdtemp(prefix="tokenfeedback-demo-")) if own else data
    policy: ServerProcess | None = None
    trainer: ServerProcess | None = None
    try:
        policy = start_server("policy_server", ["--model", model, "--port", "0"], name="policy")
        log(f"policy server on {policy.address}")
        trainer = start_server(
            "trainer_server",
            ["--model", model, "--data", str(data), "--port", "0", "--policy", policy.address, *trainer_flags],
            name="trainer",
        )
        log(f"trainer server on {trainer.address} (data in {data})")
        yield policy, trainer
    finally:
        codes = {}
        for server in (trainer, policy):
            if server is not None:
                codes[server.name] = server.stop()
        if own:
            shutil.rmtree(data, ignore_errors=True)
        bad = {name: code for name, code in codes.items() if code not in (0, None)}
        if bad:
            log(f"warning: servers exited uncleanly: {bad}")
