"""Publishing: new weights to every policy server with UpdateWeights, and catching up late ones.

Each configured policy server has a keeper task that knows the version the server holds (asked
with GetModelInfo, which also gives the server's parameter dtype) and brings it to the newest
published snapshot: header, the tensors in chunks (common/weights.py), commit with the SHA-256.
A server that is down or fails an update is marked unreachable and retried every `retry`
seconds; a server that starts late, or restarts (back at version 0 with its base weights), is
found by the same loop and sent the newest snapshot under the trainer's current version.
`publish()` hands a new snapshot to the keepers and waits (bounded) until every server has it or
has failed once, so a Train stream can report what each server holds.

This is the trainer's only gRPC client. server.py hands it to the engine, which sees only the
api.WeightPublisher protocol and calls `publish_blocking` from its training thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

import tokenfeedback.v1.policy_pb2 as policy_pb2
import tokenfeedback.v1.policy_pb2_grpc as policy_pb2_grpc
from common.auth import Secret
from common.metrics import trainer_meter
from common.weights import iter_chunks
from trainer_server.api import PolicyState, Snapshot

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class Publisher:
    """Keeps every policy server at the newest published snapshot. Runs on the event loop; the
    engine sees it as an api.WeightPublisher."""

    def __init__(self, addresses: tuple[str, ...], chunk_bytes: int, timeout: float, retry: float,
                 poll: float | None = None, credentials: grpc.ChannelCredentials | None = None,
                 token: Secret | None = None):
        # credentials: TLS to the policy servers (None: plaintext); token: the admin token their
        # UpdateWeights needs when their auth is on, sent on every call
        self.credentials = credentials
        self.metadata = (("authorization", f"Bearer {token.reveal()}"),) if token is not None else None
        self.states = {a: PolicyState(a) for a in addresses}
        self.chunk_bytes = chunk_bytes
        self.timeout = timeout
        self.retry = retry
        # seconds between version checks of a server that is up to date (finds restarted servers)
        self.poll = 5 * retry if poll is None else poll
        self._latest: Snapshot | None = None
        self._wake = {a: asyncio.Event() for a in addresses}
        self._attempted: dict[str, int] = {a: -1 for a in addresses}  # newest version tried per server
        self._changed = asyncio.Condition()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for address in self.states:
            self._channels[address] = (
                grpc.aio.secure_channel(address, self.credentials, options=CHANNEL_OPTIONS) if self.credentials
                else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
            self._tasks.append(asyncio.create_task(self._keep(address), name=f"publish {address}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    def max_version(self) -> int:
        """The highest version any server is known to hold (-1 when none is known)."""
        return max((s.model_version for s in self.states.values()), default=-1)

    def policy_states(self) -> list[PolicyState]:
        return list(self.states.values())

    def set_current(self, snapshot: Snapshot) -> None:
        """The snapshot late servers are brought to (at start: the resumed weights, if any)."""
        self._latest = snapshot
        for event in self._wake.values():
            event.set()

    async def publish(self, snapshot: Snapshot) -> dict[str, PolicyState]:
        """Send `snapshot` to every server; wait until each has it or has failed once (bounded by
        the timeout). Late servers keep being retried in the background."""
        self.set_current(snapshot)
        deadline = time.monotonic() + self.timeout

        def settled() -> bool:
            return all(s.model_version >= snapshot.version or self._attempted[a] >= snapshot.version
                       for a, s in self.states.items())

        async with self._changed:
            while not settled():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
        return {a: PolicyState(**{k: v for k, v in vars(s).items()}) for a, s in self.states.items()}

    def publish_blocking(self, snapshot: Snapshot) -> dict[str, PolicyState]:
        """publish() from a worker thread (the training loop)."""
        assert self.loop is not None, "Publisher.start() was not called"
        return asyncio.run_coroutine_threadsafe(self.publish(snapshot), self.loop).result()

    # ---- one server ----

    async def _keep(self, address: str) -> None:
        state = self.states[address]
        stub = policy_pb2_grpc.PolicyServiceStub(self._channels[address])
        while True:
            wait = self.poll
            try:
                info = await stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=10, metadata=self.metadata)
                state.model_version, state.dtype, state.reachable = info.model_version, info.dtype, True
                target = self._latest
                if target is not None and state.model_version < target.version:
                    await self._send(stub, state, target)
                    state.last_error = ""
                elif target is not None and state.model_version > target.version:
                    state.last_error = (f"server holds version {state.model_version}, newer than the trainer's "
                                        f"{target.version}; it will be replaced at the next publish")
                    self._attempted[address] = max(self._attempted[address], target.version)
                else:
                    state.last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a server being down is normal; retry
                state.reachable = False
                state.model_version = -1
                state.last_error = _describe(exc)
                if self._latest is not None:
                    self._attempted[address] = max(self._attempted[address], self._latest.version)
                wait = self.retry
                log.warning("policy %s: %s (retrying in %.0fs)", address, state.last_error, wait)
            async with self._changed:
                self._changed.notify_all()
            try:
                await asyncio.wait_for(self._wake[address].wait(), wait)
            except TimeoutError:
                pass
            self._wake[address].clear()

    async def _send(self, stub, state: PolicyState, snapshot: Snapshot) -> None:
        tensors, summary = await asyncio.to_thread(snapshot.for_dtype, state.dtype)
        start = time.perf_counter()

        async def messages() -> AsyncIterator[policy_pb2.WeightUpdateMessage]:
            yield policy_pb2.WeightUpdateMessage(header=policy_pb2.WeightUpdateHeader(
                target_version=snapshot.version, tensor_count=summary.tensor_count, total_bytes=summary.total_bytes))
            for chunk in iter_chunks(tensors, self.chunk_bytes):
                yield policy_pb2.WeightUpdateMessage(chunk=policy_pb2.TensorChunk(
                    name=chunk.name, dtype=chunk.dtype, shape=chunk.shape, offset=chunk.offset,
                    data=bytes(chunk.data)))
            yield policy_pb2.WeightUpdateMessage(commit=policy_pb2.WeightUpdateCommit(sha256=summary.sha256))

        reply = await stub.UpdateWeights(messages(), timeout=self.timeout, metadata=self.metadata)
        state.model_version = reply.model_version
        self._attempted[state.address] = max(self._attempted[state.address], snapshot.version)
        state.last_publish_seconds = time.perf_counter() - start
        state.last_publish_bytes = summary.total_bytes
        trainer_meter().publish.labels(state.address).observe(state.last_publish_seconds)
        trainer_meter().published_bytes.labels(state.address).inc(summary.total_bytes)
        log.info("policy %s now holds version %d (%.1f MB in %.2fs)", state.address, reply.model_version,
                 summary.total_bytes / 1e6, state.last_publish_seconds)


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
