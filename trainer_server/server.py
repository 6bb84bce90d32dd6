"""The trainer process: bind, announce, load the model, serve, stop on SIGTERM.

    python -m trainer_server --model data/demo-model --data data/trainer --port 50052 --policy HOST:PORT
    torchrun --nproc-per-node K -m trainer_server ...

Rank 0 binds the gRPC port (and the Connect port with --http-port) before the model loads, so
health checks answer NOT_SERVING meanwhile; it prints `tokenfeedback: trainer listening on
HOST:PORT` once bound (common.process waits for that line) and turns SERVING when the model is
loaded. The other ranks load the same model and follow rank 0's training steps (distributed.py).
SIGTERM / SIGINT: a running Train call stops after its step (it still publishes and checkpoints
what it did), then the ports close; exit code 0. torchrun's RANK / WORLD_SIZE / LOCAL_RANK are read
here and nowhere else.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common.auth import log_auth_summary
from common.guard import GrpcGuard, StreamSlots
from common.hf import resolve_device
from common.metrics import watch_trainer
from common.process import announce
from common.rpc import ServerOptions, create_grpc_server, install_signal_handlers, set_serving
from common.tls import channel_credentials, server_credentials
from trainer_server import distributed
from trainer_server.api import Progress, Snapshot, TrainSettings
from trainer_server.config import TrainerConfig, config_from_args
from trainer_server.connect import start_connect
from trainer_server.convert import SERVICE_NAME, TrainerHandler
from trainer_server.engine import TrainerEngine
from trainer_server.publish import Publisher
from trainer_server.service import register

log = logging.getLogger("trainer_server")

WORKER_THREADS = 64  # engine calls running at once (most of them waiting for a commit)
LOCK_FILE = "trainer.lock"  # in the data folder: held by the trainer using it, holds its pid


class DataFolderBusy(RuntimeError):
    pass


def hold_data_folder(folder: Path) -> int:
    """Hold `folder` for this process's life: an exclusive flock on folder/trainer.lock, which the
    kernel releases when the process ends however it ends (SIGKILL too, so it never stays stuck).
    A second trainer on the same folder is refused instead of training and checkpointing beside
    the first (docs/design.md, "State"). Returns the lock's descriptor, to be kept open; raises
    DataFolderBusy naming the folder and the holder's pid."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataFolderBusy(f"data folder {folder.resolve()} is in use by another trainer (pid {holder}); "
                             f"stop that one, or give this one another --data") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def make_publisher(config: TrainerConfig) -> Publisher:
    """The gRPC publisher to the configured policy servers (the engine sees an api.WeightPublisher)."""
    return Publisher(
        config.policies, config.chunk_bytes, config.publish_timeout, config.publish_retry,
        credentials=channel_credentials(config.policy_tls_ca, config.policy_tls_cert, config.policy_tls_key)
        if config.publish_tls else None,
        token=config.policy_token)


class TrainerApp:
    """The serving process of rank 0: gRPC server, engine, publisher, auto-training."""

    def __init__(self, config: TrainerConfig, engine: TrainerEngine, publisher: Publisher):
        self.config = config
        self.engine = engine
        self.publisher = publisher
        self.server = None  # grpc.aio.Server, once started
        self.health = None
        # Train streams open at once, counted across the gRPC and Connect ports (common/guard.py)
        self.slots = StreamSlots({f"/{SERVICE_NAME}/Train": config.max_streams})
        self.handler = TrainerHandler(self)
        self._cancels: set[threading.Event] = set()
        self._auto_task: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> int:
        """Bind and serve (health NOT_SERVING until `load` finishes). Returns the bound port."""
        c = self.config
        options = ServerOptions(host=c.host, port=c.port, max_message_bytes=c.max_message_bytes)
        self.server, port, self.health = await create_grpc_server(
            options, [register(self.handler)], [SERVICE_NAME], [GrpcGuard(c.auth, self.slots)],
            server_credentials(c.tls),
        )
        log_auth_summary(log, c.host, c.tls.enabled, c.auth, "trainer")
        if c.policies and not c.policy_token:
            log.info("publishing to %s without a token (policy servers with auth on will refuse UpdateWeights)",
                     ", ".join(c.policies))
        return port

    async def load(self) -> None:
        await asyncio.to_thread(self.engine.load)
        watch_trainer(self.engine)  # its status at every /metrics scrape (common/metrics.py)
        await self.publisher.start()
        if self.engine.version > 0:  # resumed: servers that start at version 0 catch up to these weights
            self.publisher.set_current(Snapshot(self.engine.version, await asyncio.to_thread(self.engine.weights)))
        await set_serving(self.health, [SERVICE_NAME], True)
        log.info("serving: version %d, step %d, %s", self.engine.version, self.engine.step,
                 await asyncio.to_thread(self.engine.counts))
        self.maybe_auto_train()

    async def run_training(self, settings: TrainSettings):
        """Run engine.train in a thread and yield its Progress as it comes. A client that goes away
        stops the run after the current step (it still publishes and checkpoints what it did)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Progress] = asyncio.Queue()
        cancel = threading.Event()
        self._cancels.add(cancel)

        def report(progress: Progress) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, progress)

        task = asyncio.ensure_future(asyncio.to_thread(self.engine.train, settings, report, cancel))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    while not queue.empty():
                        yield queue.get_nowait()
                    task.result()  # the engine's error, if it failed
                    return
                progress = getter.result()
                yield progress
                if progress.done:
                    await task
                    return
        finally:
            cancel.set()
            self._cancels.discard(cancel)

    def maybe_auto_train(self) -> None:
        """--auto-train N: start one pass over the pending annotations when N are waiting."""
        threshold = self.config.auto_train
        if not threshold or self._closing or (self._auto_task and not self._auto_task.done()):
            return
        self._auto_task = asyncio.create_task(self._auto_train(threshold))

    async def _auto_train(self, threshold: int) -> None:
        while not self._closing and await asyncio.to_thread(self.engine.pending_count) >= threshold:
            log.info("auto-train: %d annotations pending", await asyncio.to_thread(self.engine.pending_count))
            try:
                async for p in self.run_training(TrainSettings(steps=0)):
                    if p.done:
                        log.info("auto-train done: %d steps, loss %.4f, kl %.4f, version %d", p.step, p.loss, p.kl,
                                 p.model_version)
            except Exception:  # noqa: BLE001 - logged; the server keeps serving
                log.exception("auto-train failed")
                return
            if p.step == 0:  # nothing could be applied (skipped steps): wait for new annotations
                return

    async def stop(self, grace: float = 5.0) -> None:
        self._closing = True
        for cancel in list(self._cancels):
            cancel.set()
        if self.server is not None:
            await self.server.stop(grace)
        if self._auto_task is not None:
            await asyncio.gather(self._auto_task, return_exceptions=True)
        # wait for a running step to finish (it may publish through the loop, which keeps running)
        await asyncio.to_thread(self.engine.wait_idle)
        await self.publisher.stop()
        await asyncio.to_thread(self.engine.close)


async def create_server(config: TrainerConfig, collective: distributed.Collective | None = None
                        ) -> tuple[TrainerApp, int]:
    """Bind and announce the gRPC port (health NOT_SERVING). Returns (app, port); then
    `app.load()` to serve, `app.stop(grace)` at the end."""
    publisher = make_publisher(config)
    app = TrainerApp(config, TrainerEngine(config, collective, publisher), publisher)
    port = await app.start()
    announce("trainer", config.host, port)
    return app, port


async def serve(config: TrainerConfig, collective: distributed.Collective) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    # Worker threads for the engine's blocking calls: enough that concurrent SubmitAnnotations can
    # wait for the same group commit (store.py); asyncio's default (cores + 4) would cap a group
    # at 6 on a 2-core machine.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(WORKER_THREADS, "trainer-worker"))
    app, _ = await create_server(config, collective)
    http = None
    try:
        if config.http_port is not None:
            http = await start_connect(app.handler, config, app.slots)
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
    if rank == 0:
        try:
            held = hold_data_folder(config.data)  # noqa: F841 - open for the process's life
        except DataFolderBusy as exc:
            log.error("%s", exc)
            return 1
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
