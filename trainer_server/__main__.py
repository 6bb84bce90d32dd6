"""`python -m trainer_server --model PATH --data DIR --port N --policy HOST:PORT[,...]`

Also under `torchrun --nproc-per-node K -m trainer_server ...`: rank 0 serves gRPC and owns the
store; the other ranks load the same model and follow rank 0's training steps (distributed.py).
torchrun's RANK / WORLD_SIZE / LOCAL_RANK are read here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

import torch

from common.hf import resolve_device
from common.rpc import install_signal_handlers
from trainer_server import distributed
from trainer_server.config import TrainerConfig, config_from_args
from trainer_server.connect import start_connect
from trainer_server.engine import TrainerEngine
from trainer_server.service import create_server

log = logging.getLogger("trainer_server")


async def serve(config: TrainerConfig, collective: distributed.Collective) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    app, _ = await create_server(config, TrainerEngine(config, collective))
    http = await start_connect(app, config.host, config.http_port) if config.http_port is not None else None
    try:
        load = asyncio.create_task(app.load())
        await asyncio.wait({load, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            load.result()  # a model that fails to load ends the process with its error
            await stop.wait()
    finally:
        log.info("shutting down")
        if http is not None:
            await http.stop()
        await app.stop()


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    config = config_from_args(argv, rank=rank, world_size=world_size, environ=os.environ)
    if world_size > 1 and config.device in ("auto", "cuda") and resolve_device(config.device).type == "cuda":
        config = TrainerConfig(**{**vars(config), "device": f"cuda:{local_rank}"})
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s trainer[{rank}] %(levelname)s %(name)s: %(message)s")
    log.info("config %s", json.dumps(config.to_log(), sort_keys=True))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    collective = distributed.init(rank, world_size, resolve_device(config.device))
    try:
        if collective.leader:
            asyncio.run(serve(config, collective))
        else:
            distributed.ignore_termination()
            engine = TrainerEngine(config, collective)
            engine.load()
            engine.follow()
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
