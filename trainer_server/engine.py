"""The trainer engine: store, validation, training loop, versions, checkpoints. No gRPC here,
directly or through what it imports: it works on api.py's dataclasses, raises common.errors
exceptions, and publishes through the api.WeightPublisher that server.py injects
(docs/design.md, "Servers").

The handler (handler.py, behind the gRPC and Connect ports) and the benchmarks drive this class. Blocking methods (submit, train, save_checkpoint) are called from worker
threads; one training run at a time (a second Train waits for the first).

Versions: 0 is the weights --model names. Each publish raises the version: the new weights go out
under max(own version, highest version any policy server holds) + 1, so a trainer that restarted
behind a server never sends a version the server must refuse. Publishing happens every
`publish_every` steps and at the end of a Train call, also when no policy server is configured
(the version then just names the weights).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, quote
from common.hf import load_causal_lm
from trainer_server.api import (
    Progress,
    SequenceInput,
    Snapshot,
    Status,
    SubmitOutcome,
    TrainSettings,
    WeightPublisher,
)
from trainer_server.checkpoint import CheckpointMeta, Checkpoints
from trainer_server.checkpoint import read as read_checkpoint
from trainer_server.config import TrainerConfig, check_training, parse_horizon
from trainer_server.distributed import Collective
from trainer_server.model import prepare
from trainer_server.rows import BatchRules, Example, KLController, horizon_rows
from trainer_server.store import AnnotationStore, StoredAnnotation
from trainer_server.training import PolicyTrainer, StepParams, StepResult
from trainer_server.validate import MAX_ID_CHARS, Validator, sequence_field

log = logging.getLogger(__name__)

MAX_TRAIN_STEPS = 1_000_000


@dataclass(frozen=True)
class TrainPlan:
    """A Train request resolved against the configuration: what every step of the call uses."""

    steps: int  # 0: one pass over the pending annotations
    params: StepParams  # variant, beta (the start value), learning rate, clip range, gradient clip
    batch_size: int
    rules: BatchRules  # horizon, gamma, staleness, baseline
    horizon_text: str  # the horizon as the request / flag said it ("1", "full")
    publish: bool
    beta_overridden: bool  # a per-call beta: the KL controller's state does not carry over


class TrainerEngine:
    """Owns the policy, the reference, the optimizer, the store (rank 0) and the checkpoints."""

    def __init__(self, config: TrainerConfig, collective: Collective | None = None,
                 publisher: WeightPublisher | None = None):
        self.config = config
        self.collective = collective or Collective(config.rank, config.world_size)
        self.publisher = publisher  # server.py injects publish.Publisher; None: versions only name the weights
        self.store: AnnotationStore | None = None
        self.checkpoints: Checkpoints | None = None
        self.trainer: PolicyTrainer | None = None
        self.validator: Validator | None = None
        self.version = 0
        self.step = 0
        self.beta = config.beta
        self.replay_cursor = 0
        self.vocab_size: int | None = None  # known once loaded
        self.max_seq_len: int | None = None
        self.quarantined = 0  # annotations quarantined by the running (or last) Train call
        self.last: StepResult | None = None
        self.training = False
        self.loaded = False
        self._train_lock = threading.Lock()
        self._state_lock = threading.Lock()  # version / step / beta read by status while training
        self._dirty = False  # weights changed since the last publish
        self._collective_lock = threading.RLock()  # one broadcast + its collectives at a time (steps, FSDP gathers)

    # ---- start-up ----

    def load(self) -> None:
        """Load the model (policy = reference = --model), open the store, resume the newest
        checkpoint. Collective: every rank calls it."""
        c = self.config
        torch.manual_seed(c.seed)
        loaded = load_causal_lm(c.model, device=c.device, dtype="float32" if c.dtype == "auto" else c.dtype)
        self.device = loaded.device
        self.tokenizer = loaded.tokenizer
        # the reference is the weights training starts from, frozen: a copy, or under LoRA the base
        # with the adapters off (trainer_server/model.py)
        prepared = prepare(loaded.model, c.model_mode)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.trainer = PolicyTrainer(prepared, None, self.collective, learning_rate=c.learning_rate,
                                     weight_decay=c.weight_decay, optimizer=c.optimizer,
                                     micro_batch_size=c.micro_batch_size,
                                     pad_id=int(pad_id))
        self.max_seq_len = min(c.max_seq_len, loaded.max_length)
        self.vocab_size = loaded.vocab_size
        self.validator = Validator(self.tokenizer, self.vocab_size, self.max_seq_len, c.bad_span_share)
        self.checkpoints = Checkpoints(c.data / "checkpoints", keep=c.keep_checkpoints, pause=c.checkpoint_pause)
        found = None
        if self.collective.leader:
            c.data.mkdir(parents=True, exist_ok=True)
            for path in self.checkpoints.clean_partial():
                log.warning("removed a partial checkpoint %s", path)
            self.store = AnnotationStore(c.data / "annotations.sqlite", sync=c.sync)
            found = self.checkpoints.newest()
        found = self.collective.broadcast(found)
        if found is not None:
            path, meta = found
            if meta.model != c.model:
                log.warning("checkpoint %s was trained from %s, --model is %s", path, meta.model, c.model)
            if meta.mode != c.model_mode.name:
                raise ValueError(f"checkpoint {path} was written in mode {meta.mode}, the trainer runs in "
                                 f"{c.model_mode.name} (--precision, --lora-*, --fsdp); start with the same flags")
            state, optimizer_state = read_checkpoint(path, self.device)
            self.trainer.prepared.load_checkpoint_state(state)
            self.trainer.prepared.load_optimizer_state(self.trainer.optimizer, optimizer_state)
            self.step, self.version, self.beta, self.replay_cursor = meta.step, meta.model_version, meta.beta, meta.replay_cursor
            if self.store is not None:
                restored = self.store.restore_consumed(meta.step)
                log.info("resumed %s: step %d, version %d (%d annotations back to pending)",
                         path, meta.step, meta.model_version, restored)
        elif self.store is not None:
            self.store.restore_consumed(0)
        self.loaded = True

    def close(self) -> None:
        if self.collective.active and self.collective.leader:
            try:
                self.collective.broadcast(("stop",))
            except Exception as exc:  # noqa: BLE001 - a follower that died already; nothing to stop
                log.warning("could not tell the followers to stop: %s", exc)
        if self.store is not None:
            self.store.close()

    # ---- annotations ----

    def submit(self, sequences: list[SequenceInput], partial_ok: bool = False) -> list[SubmitOutcome]:
        """Validate the whole request, then store the valid sequences in one transaction.
        Without partial_ok any invalid sequence fails the call and nothing is stored."""
        self._require_loaded()
        limit = self.config.max_batch_sequences
        if not 1 <= len(sequences) <= limit:
            raise InvalidArgument(f"must hold 1..{limit} sequences, got {len(sequences)}", "sequences")
        horizon, gamma = parse_horizon(self.config.horizon), self.config.gamma
        known = self.store.existing([s.annotation_id for s in sequences if s.annotation_id])
        version = self.version
        outcomes: list[SubmitOutcome | None] = []
        valid = []  # (index in request, Annotation)
        for i, seq in enumerate(sequences):
            if seq.annotation_id in known:  # a resend: nothing changes, whatever it holds now
                outcomes.append(SubmitOutcome(seq.annotation_id, "duplicate"))
                continue
            try:
                annotation = self.validator.sequence(seq, version, sequence_field(i, seq.annotation_id))
            except InvalidArgument as exc:
                if not partial_ok:
                    raise
                outcomes.append(SubmitOutcome(seq.annotation_id, "rejected", reason=str(exc)))
                continue
            outcomes.append(None)
            valid.append((i, annotation))
        stored = self.store.insert([a for _, a in valid]) if valid else []
        for (i, annotation), new in zip(valid, stored, strict=True):
            rows = len(horizon_rows(annotation, horizon, gamma))
            outcomes[i] = SubmitOutcome(annotation.annotation_id, "accepted" if new else "duplicate", rows=rows)
        return outcomes

    def withdraw(self, annotation_ids: list[str]) -> tuple[int, list[str]]:
        self._require_loaded()
        limit = self.config.max_batch_sequences
        if len(annotation_ids) > limit:
            raise InvalidArgument(f"at most {limit} ids per call (--max-batch-sequences), got {len(annotation_ids)}",
                                  "annotation_ids")
        for i, annotation_id in enumerate(annotation_ids):
            if not 1 <= len(annotation_id) <= MAX_ID_CHARS:
                raise InvalidArgument(f"must be 1..{MAX_ID_CHARS} characters, got {len(annotation_id)}",
                                      f"annotation_ids[{i}]")
        return self.store.withdraw(annotation_ids)

    def get(self, annotation_id: str) -> StoredAnnotation:
        self._require_loaded()
        if not 1 <= len(annotation_id) <= MAX_ID_CHARS:
            raise InvalidArgument(f"must be 1..{MAX_ID_CHARS} characters, got {len(annotation_id)}", "annotation_id")
        found = self.store.get(annotation_id)
        if found is None:
            raise NotFound(f"no annotation {quote(annotation_id)} is stored", "annotation_id")
        return found

    def pending_count(self) -> int:
        return self.store.counts()["pending"] if self.store is not None else 0

    def counts(self) -> dict[str, int]:
        """Annotations by state, their total and rows (AnnotationStore.counts)."""
        return self.store.counts()

    # ---- training ----

    def resolve(self, settings: TrainSettings) -> TrainPlan:
        """Check a Train request's overrides (config.check_training, as for the flags) and resolve
        them against the configuration."""
        c = self.config
        if not 0 <= settings.steps <= MAX_TRAIN_STEPS:
            raise InvalidArgument(f"must be in [0, {MAX_TRAIN_STEPS}], got {settings.steps}", "steps")
        chosen = {}
        for name in ("variant", "beta", "learning_rate", "batch_size", "horizon", "gamma"):
            value = getattr(settings, name)
            if value is None:
                value = self.beta if name == "beta" else getattr(c, name)
            else:
                check_training(name, value)
            chosen[name] = value
        params = StepParams(variant=chosen["variant"], beta=chosen["beta"], learning_rate=chosen["learning_rate"],
                            clip_eps=c.clip_eps, max_grad_norm=c.max_grad_norm)
        rules = BatchRules(horizon=parse_horizon(chosen["horizon"]), gamma=chosen["gamma"],
                           staleness_limit=c.staleness_limit, stale_policy=c.stale_policy, stale_decay=c.stale_decay,
                           baseline=c.baseline and chosen["variant"] == "pg_clip", vocab_size=self.vocab_size,
                           max_seq_len=self.max_seq_len)
        return TrainPlan(steps=settings.steps, params=params, batch_size=chosen["batch_size"], rules=rules,
                         horizon_text=str(chosen["horizon"]).lower(), publish=settings.publish,
                         beta_overridden=settings.beta is not None)

    def train(self, settings: TrainSettings, report: Callable[[Progress], None],
              cancel: threading.Event | None = None) -> None:
        """Run a Train request, calling `report` after every step and once more with done=True.
        Blocking; one run at a time (waits for a running one)."""
        self._require_loaded()
        self.resolve(settings)  # bad overrides fail before waiting for a running call
        cancel = cancel or threading.Event()
        with self._train_lock:
            self.training = True
            try:
                self._train(self.resolve(settings), report, cancel)  # beta: the controller may have moved it
            finally:
                self.training = False

    def wait_idle(self) -> None:
        """Block until no Train call runs (its step, publish and checkpoint finished)."""
        with self._train_lock:
            pass

    def _train(self, plan: TrainPlan, report: Callable[[Progress], None], cancel: threading.Event) -> None:
        c = self.config
        counts = self.store.counts()
        one_pass = plan.steps == 0
        if one_pass:
            total = math.ceil(counts["pending"] / plan.batch_size)
            if total == 0:
                raise FailedPrecondition("no pending annotations to train on (steps > 0 replays consumed ones)")
        else:
            total = plan.steps
            if counts["pending"] + counts["consumed"] == 0:
                raise FailedPrecondition("no annotations stored to train on")
        params = plan.params
        kl = KLController(params.beta, c.kl_target, c.beta_rate)
        common = dict(total_steps=total, horizon=plan.horizon_text, gamma=plan.rules.gamma)
        published = 0
        done_steps = 0
        messages = []
        self.quarantined = 0
        for index in range(total):
            if cancel.is_set():
                messages.append("cancelled")
                break
            examples, pending_seqs, stale_skipped = self._next_batch(plan, one_pass)
            if stale_skipped:
                messages.append(f"{stale_skipped} stale annotations skipped")
            if not examples:
                messages.append("no more annotations")
                break
            step_params = StepParams(params.variant, kl.beta, params.learning_rate, params.clip_eps,
                                     params.max_grad_norm)
            result = self._collective_step(examples, step_params)
            if result.skipped:
                log.warning("step skipped: loss %s, gradient norm %s (not finite)", result.loss, result.grad_norm)
            else:
                with self._state_lock:
                    self.step += 1
                    self._dirty = True
                    self.last = result
                self.store.mark_consumed(pending_seqs, self.step)
                done_steps += 1
                kl.update(result.kl)
            published_version = 0
            if plan.publish and c.publish_every and self.step % c.publish_every == 0 and not result.skipped:
                published_version = self.publish()
                published = published_version
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 and not result.skipped:
                self.save_checkpoint()
            report(Progress(
                step=index + 1, loss=result.loss, token_loss=result.token_loss, kl=result.kl, beta=step_params.beta,
                mean_abs_weight=result.mean_abs_weight, tokens_per_second=result.tokens / max(result.seconds, 1e-9),
                rows=result.rows, sequences=result.sequences, model_version=self.version,
                published_version=published_version, skipped=result.skipped,
                message="skipped: loss or gradient not finite; nothing applied" if result.skipped else "",
                **common,
            ))
        if self.quarantined:
            messages.append(f"{self.quarantined} annotations quarantined (GetAnnotation says why)")
        if kl.target is not None and not plan.beta_overridden:
            self.beta = kl.beta  # the controller's state carries over (not for a per-call beta override)
        if plan.publish and self._dirty:
            published = self.publish()
        if done_steps:
            self.save_checkpoint()
        last = self.last
        report(Progress(
            step=done_steps, loss=last.loss if last else 0.0, token_loss=last.token_loss if last else 0.0,
            kl=last.kl if last else 0.0, beta=kl.beta, model_version=self.version, published_version=published,
            done=True, message="; ".join(dict.fromkeys(messages)), **common,
        ))

    def _next_batch(self, plan: TrainPlan, one_pass: bool) -> tuple[list[Example], list[int], int]:
        """The next batch, made by plan.rules (rows.py). Annotations it finds untrainable are
        quarantined (stored state, a log line naming each) and the batch is chosen again without
        them, so one poisoned annotation never stops training (docs/design.md, "Errors and
        limits"). Returns (examples, seqs of the pending ones, number skipped as stale)."""
        stale_skipped = 0
        while True:
            chosen, pending_seqs, skipped = self._choose(plan, one_pass)
            stale_skipped += skipped
            batch = plan.rules.batch([(item.annotation, factor) for item, factor in chosen])
            if not batch.untrainable:
                return batch.examples, pending_seqs, stale_skipped
            for index, reason in batch.untrainable:
                log.warning("quarantined annotation %s: %s", quote(chosen[index][0].annotation.annotation_id), reason)
            self.store.quarantine([(chosen[i][0].seq, reason) for i, reason in batch.untrainable])
            self.quarantined += len(batch.untrainable)

    def _choose(self, plan: TrainPlan, one_pass: bool) -> tuple[list[tuple[StoredAnnotation, float]], list[int], int]:
        """Up to `plan.batch_size` sequences: pending ones first (oldest first); unless this is a
        one-pass run, the rest replayed from consumed ones, cycling. Stale annotations are
        down-weighted or skipped (skipped pending ones are marked consumed untrained). Returns
        ((annotation, staleness factor) pairs, seqs of the pending ones, number skipped as stale)."""
        size, rules = plan.batch_size, plan.rules
        chosen: list[tuple[StoredAnnotation, float]] = []
        pending_seqs: list[int] = []
        skipped = 0
        after = 0  # pending annotations are read in arrival order, past the ones looked at
        while len(chosen) < size:
            batch = self.store.pending(size - len(chosen), after_seq=after)
            if not batch:
                break
            after = batch[-1].seq
            stale = []
            for item in batch:
                factor = rules.factor(item.annotation, self.version)
                if factor is None:
                    stale.append(item.seq)
                else:
                    chosen.append((item, factor))
                    pending_seqs.append(item.seq)
            if stale:
                self.store.mark_consumed(stale, self.step)
                skipped += len(stale)
        if not one_pass and len(chosen) < size:
            taken = {item.seq for item, _ in chosen}
            for wrapped in (False, True):
                cursor = 0 if wrapped else self.replay_cursor
                for item in self.store.replay(cursor, size - len(chosen)):
                    if item.seq in taken:
                        continue
                    self.replay_cursor = item.seq
                    factor = rules.factor(item.annotation, self.version)
                    if factor is None:
                        skipped += 1
                    else:
                        chosen.append((item, factor))
                        taken.add(item.seq)
                if len(chosen) >= size:
                    break
        return chosen, pending_seqs, skipped

    def _collective_step(self, examples: list[Example], params: StepParams) -> StepResult:
        """Rank 0 sends the batch to the followers, then every rank steps on its shard."""
        with self._collective_lock:
            if self.collective.active:
                self.collective.broadcast(("step", examples, params))
            return self.trainer.step(examples, params)

    def follow(self) -> None:
        """Followers (rank > 0): run rank 0's commands until it says stop."""
        assert not self.collective.leader, "rank 0 leads; it does not follow"
        while True:
            command = self.collective.broadcast()
            if command[0] == "step":
                self.trainer.step(command[1], command[2])
            elif command[0] == "gather":  # FSDP: rank 0 publishes; the shards come together there
                self.trainer.prepared.published(leader=False)
            elif command[0] == "checkpoint":  # FSDP: rank 0 saves the gathered weights and optimizer state
                self.trainer.prepared.checkpoint_state(leader=False)
                self.trainer.prepared.optimizer_state(self.trainer.optimizer)
            elif command[0] == "stop":
                return
            else:
                raise RuntimeError(f"unknown command from rank 0: {command[0]!r}")

    # ---- publishing and checkpoints ----

    def weights(self) -> dict[str, torch.Tensor]:
        """What a publish sends, as CPU tensors: the policy's weights (aliases dropped), or under LoRA
        the adapter factors (common/adapters.py). Under FSDP gathered on rank 0 with the followers."""
        with self._collective_lock:
            if self.trainer.prepared.mode.fsdp:
                self.collective.broadcast(("gather",))
            return self.trainer.prepared.published(leader=True)

    def publish(self) -> int:
        """Give the current weights the next version and send them to the policy servers."""
        floor = self.publisher.max_version() if self.publisher is not None else -1
        with self._state_lock:
            self.version = max(self.version, floor) + 1
            self._dirty = False
        if self.publisher is not None:
            states = self.publisher.publish_blocking(Snapshot(self.version, self.weights()))
            for state in states.values():
                if state.model_version != self.version:
                    log.warning("policy %s did not take version %d yet: %s", state.address, self.version,
                                state.last_error or "pending")
        return self.version

    def save_checkpoint(self) -> tuple[Path, int, int]:
        """Write a checkpoint now (between steps). Returns (path, step, version)."""
        self._require_loaded()
        meta = CheckpointMeta(step=self.step, model_version=self.version, beta=self.beta,
                              replay_cursor=self.replay_cursor, model=self.config.model, created_at=time.time(),
                              mode=self.config.model_mode.name)
        prepared = self.trainer.prepared
        with self._collective_lock:
            if prepared.mode.fsdp:
                self.collective.broadcast(("checkpoint",))
            state, optimizer_state = prepared.checkpoint_state(), prepared.optimizer_state(self.trainer.optimizer)
        path = self.checkpoints.save(state, optimizer_state, meta)
        log.info("checkpoint %s (step %d, version %d)", path, self.step, self.version)
        return path, self.step, self.version

    def save_checkpoint_now(self) -> tuple[Path, int, int]:
        """SaveCheckpoint: waits for a running Train to finish its call, then saves."""
        with self._train_lock:
            return self.save_checkpoint()

    def status(self) -> Status:
        self._require_loaded()
        last = self.last
        policies = self.publisher.policy_states() if self.publisher is not None else []
        return Status(
            counts=self.store.counts(), model_version=self.version, step=self.step,
            last_loss=last.loss if last else 0.0, last_token_loss=last.token_loss if last else 0.0,
            last_kl=last.kl if last else 0.0, beta=self.beta, variant=self.config.variant,
            horizon=str(self.config.horizon).lower(), gamma=self.config.gamma, training=self.training,
            policies=policies, model_name=self.config.model,
        )

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise Unavailable("the trainer is still loading its model")
