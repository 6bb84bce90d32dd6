"""Faults: processes killed at the worst moment, against real servers.

- The policy server is SIGKILLed while a weight update streams into it: the trainer's publish
  fails, it retries, and the restarted server (back at version 0) is brought to the trainer's
  version, with exactly the trainer's weights. A TCP proxy between trainer and policy server holds
  the update after its first bytes, so the kill lands mid-update every time, not by luck.
- The trainer is SIGKILLed in the middle of a Train call while annotations keep arriving: after
  a restart every acknowledged annotation is there, training resumes from the newest complete
  checkpoint (annotations the lost steps consumed are pending again), and trains on.

Covered elsewhere, not repeated here: the trainer killed during a checkpoint and SIGKILL right
after an acknowledgement (tests/trainer/test_durability.py), a cancelled or corrupted update that
changes nothing (tests/policy/test_update.py), a client that vanishes mid-stream
(tests/reliability/test_limits.py), late and restarted policy servers (tests/trainer/test_publish.py).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import grpc
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tokenfeedback.v1.policy_pb2 as ppb
import tokenfeedback.v1.policy_pb2_grpc as ppb_grpc
import tokenfeedback.v1.trainer_pb2 as tpb
import tokenfeedback.v1.trainer_pb2_grpc as tpb_grpc
from tests.reliability.conftest import start_policy, start_trainer
from trainer_server.checkpoint import Checkpoints

PROMPT, COMPLETION = [1, 2, 3], [4, 5, 6, 7, 8]


class HoldingProxy:
    """Forwards TCP connections on 127.0.0.1:port to an upstream port. While `hold_after` is set,
    client-to-upstream traffic stops (and `holding` is set) once that many bytes went through:
    the upstream server is then in the middle of whatever the client was sending."""

    def __init__(self, upstream_port: int, hold_after: int | None = None):
        self.upstream_port = upstream_port
        self.hold_after = hold_after
        self.forwarded = 0
        self.holding = threading.Event()
        self.released = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        """Stop holding: later connections (and bytes) pass freely."""
        self.hold_after = None
        self.released.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        for s in [self.listener, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                if self._closed:
                    return
                try:
                    client.close()
                except (OSError, UnboundLocalError):
                    pass
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, to_upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if to_upstream and self.hold_after is not None and self.forwarded + len(data) > self.hold_after:
                    self.holding.set()
                    self.released.wait()
                if to_upstream:
                    self.forwarded += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sequence(annotation_id: str, position: int = 1) -> tpb.AnnotatedSequence:
    return tpb.AnnotatedSequence(annotation_id=annotation_id, prompt_token_ids=PROMPT, completion_token_ids=COMPLETION,
                                 token_labels=[tpb.TokenLabel(position=position % len(COMPLETION), weight=-1.0)])


def submit(stub, ids: list[str]) -> list[str]:
    """Submit; the ids acknowledged ACCEPTED."""
    reply = stub.SubmitAnnotations(tpb.SubmitAnnotationsRequest(sequences=[sequence(i, n) for n, i in enumerate(ids)]),
                                   timeout=30)
    return [r.annotation_id for r in reply.results if r.status == tpb.SUBMIT_STATUS_ACCEPTED]


def policy_logprobs(address: str) -> list[float]:
    with grpc.insecure_channel(address) as channel:
        reply = ppb_grpc.PolicyServiceStub(channel).Score(
            ppb.ScoreRequest(prompt_token_ids=PROMPT, completion_token_ids=COMPLETION), timeout=30)
    return [t.logprob for t in reply.tokens]


def checkpoint_logprobs(model_dir: Path, checkpoint: Path) -> list[float]:
    """The same logprobs computed here from a trainer checkpoint's weights (the expected answer)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    missing, unexpected = model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + COMPLETION])).logits[0, len(PROMPT) - 1 : -1]  # (C, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (C, V)
    return logprobs.gather(1, torch.tensor(COMPLETION)[:, None])[:, 0].tolist()


def test_policy_killed_during_a_weight_update_is_brought_to_the_current_version(servers, tiny_model_dir, tmp_path):
    port = free_port()
    servers.append(policy := start_policy(tiny_model_dir, port=port))
    base = policy_logprobs(policy.address)
    proxy = HoldingProxy(port)
    try:
        data = tmp_path / "trainer"
        servers.append(trainer := start_trainer(tiny_model_dir, data, "--policy", f"127.0.0.1:{proxy.port}",
                                                "--lr", "1e-2", "--batch-size", "2"))
        with grpc.insecure_channel(trainer.address) as channel:
            stub = tpb_grpc.TrainerServiceStub(channel)
            assert submit(stub, ["kill-a", "kill-b"]) == ["kill-a", "kill-b"]
            address = f"127.0.0.1:{proxy.port}"
            wait_until(lambda: {p.address: p.reachable for p in stub.GetStatus(tpb.GetStatusRequest(), timeout=30)
                                .policies}.get(address), 60, "the trainer to reach the policy server")
            proxy.hold_after = proxy.forwarded + 200_000  # the update is ~0.76 MB: hold it a quarter in
            progress: list = []
            training = threading.Thread(target=lambda: progress.extend(stub.Train(tpb.TrainRequest(steps=2),
                                                                                    timeout=120)))
            training.start()
            assert proxy.holding.wait(60), "the update never started"
            policy.kill()  # SIGKILL with an update half received
            training.join(120)
            done = progress[-1]
            assert done.done and done.published_version == 1, done
            state = {p.address: p for p in stub.GetStatus(tpb.GetStatusRequest(), timeout=30).policies}[address]
            assert not state.reachable and state.model_version == -1 and state.last_error, state

            proxy.release()
            servers.append(restarted := start_policy(tiny_model_dir, port=port))  # back at version 0
            wait_until(lambda: {p.address: (p.model_version, p.reachable) for p in
                                stub.GetStatus(tpb.GetStatusRequest(), timeout=30).policies}[address] == (1, True),
                       60, "the restarted policy server to catch up")
        with grpc.insecure_channel(restarted.address) as channel:
            assert ppb_grpc.PolicyServiceStub(channel).GetModelInfo(ppb.GetModelInfoRequest(),
                                                                    timeout=30).model_version == 1
        caught_up = policy_logprobs(restarted.address)
        checkpoint = Checkpoints(data / "checkpoints").newest()
        assert checkpoint is not None and checkpoint[1].model_version == 1
        expected = checkpoint_logprobs(tiny_model_dir, checkpoint[0])
        assert caught_up != base
        assert max(abs(a - b) for a, b in zip(caught_up, expected, strict=True)) < 1e-4, (caught_up, expected)
    finally:
        proxy.close()


def test_trainer_killed_during_training_resumes_and_loses_nothing_acknowledged(servers, tiny_model_dir, tmp_path):
    data = tmp_path / "trainer"
    args = ["--batch-size", "2", "--checkpoint-every", "3", "--lr", "1e-3", "--keep-checkpoints", "2"]
    servers.append(trainer := start_trainer(tiny_model_dir, data, *args))
    acked: list[str] = []
    with grpc.insecure_channel(trainer.address) as channel:
        stub = tpb_grpc.TrainerServiceStub(channel)
        acked += submit(stub, [f"before-{i}" for i in range(30)])
        stream = stub.Train(tpb.TrainRequest(steps=200), timeout=300)
        reached = 0
        for progress in stream:  # annotations keep coming while it trains
            reached = progress.step
            acked += submit(stub, [f"during-{reached}"])
            if reached >= 8:
                break
        trainer.kill()  # SIGKILL mid-run: steps after the last checkpoint are lost, nothing acknowledged may be
    assert len(acked) >= 30 + 8
    newest = Checkpoints(data / "checkpoints").newest()
    # The stream's progress events can trail the training (it goes on while this client submits),
    # so the newest checkpoint may be past `reached`; it is a whole checkpoint of a run killed midway.
    assert newest is not None and newest[1].step % 3 == 0 and 6 <= newest[1].step < 200, newest

    servers.append(trainer := start_trainer(tiny_model_dir, data, *args))
    with grpc.insecure_channel(trainer.address) as channel:
        stub = tpb_grpc.TrainerServiceStub(channel)
        status = stub.GetStatus(tpb.GetStatusRequest(), timeout=30)
        assert status.annotations_total == len(acked)
        assert status.step == newest[1].step and status.model_version == newest[1].model_version
        assert status.annotations_pending + status.annotations_consumed == len(acked)
        # the resumed weights trained on exactly 2 sequences per step; the rest went back to pending
        assert status.annotations_consumed == min(2 * status.step, len(acked)), status
        for annotation_id in acked:
            stored = stub.GetAnnotation(tpb.GetAnnotationRequest(annotation_id=annotation_id), timeout=30)
            assert list(stored.completion_token_ids) == COMPLETION
        again = submit(stub, acked[:5])
        assert again == []  # resends are duplicates: nothing was forgotten
        progress = list(stub.Train(tpb.TrainRequest(steps=2), timeout=120))
        assert progress[-1].done and progress[-1].step == 2
        assert stub.GetStatus(tpb.GetStatusRequest(), timeout=30).step == newest[1].step + 2
