"""The trainer's configuration: one frozen dataclass, filled from the command line, logged at start.

Nothing deeper in trainer_server/ reads the command line or the environment; everything a part
needs arrives through this object (torchrun's RANK/WORLD_SIZE are read once, in __main__).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from common.auth import (
    ENV_POLICY,
    AuthTokens,
    Secret,
    add_auth_arguments,
    check_token,
    loggable,
    read_token_file,
    tokens_from_args,
)
from common.tls import TlsFiles, add_tls_arguments, tls_from_args

VARIANTS = ("likelihood", "unlikelihood", "pg_clip")
STALE_POLICIES = ("downweight", "skip")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainerConfig:
    """Everything the trainer server runs with. Defaults are meant to work on the demo model."""

    model: str = "data/demo-model"  # a local model folder or a Hugging Face hub id
    data: Path = Path("data/trainer")  # annotation store, checkpoints (created if missing)
    host: str = "127.0.0.1"  # gRPC bind address
    port: int = 50052  # gRPC port; 0 picks a free one (announced on stdout)
    http_port: int | None = None  # Connect (browsers, curl) next to gRPC, common/connect.py; 0 free; None off
    policies: tuple[str, ...] = ()  # HOST:PORT of every policy server to publish to
    # ---- the loss (DESIGN.md, "The loss") ----
    variant: str = "unlikelihood"  # likelihood | unlikelihood | pg_clip
    beta: float = 0.1  # KL coefficient (the starting value when kl_target is set)
    kl_target: float | None = None  # set: adaptive beta holding the mean KL per position near this
    beta_rate: float = 0.1  # K_beta of Ziegler et al. (2019): beta *= 1 + K_beta * clip(err, +-0.2)
    clip_eps: float = 0.2  # pg_clip: importance-ratio clip range [1-eps, 1+eps]
    horizon: str = "1"  # credit-assignment horizon: a positive integer or "full" (DESIGN.md, "Horizon")
    gamma: float = 1.0  # discount over the horizon, in [0, 1]
    baseline: bool = False  # pg_clip: subtract the batch-mean return from the sampled rows' weights
    bad_span_share: float = 0.0  # weight share of a bad span's later tokens (DESIGN.md, "Spans")
    # ---- optimization ----
    optimizer: str = "adamw"  # adamw | sgd (plain SGD: the update is -lr * gradient, e.g. for exact comparisons)
    learning_rate: float = 5e-5  # optimizer step size
    weight_decay: float = 0.0  # AdamW decoupled decay (0: the KL term keeps the policy near the reference)
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    batch_size: int = 16  # sequences per optimizer step (over all processes)
    micro_batch_size: int = 0  # sequences per forward/backward within a process; 0: the whole shard
    max_seq_len: int = 1024  # prompt + completion tokens; longer sequences are rejected
    staleness_limit: int = -1  # K: annotations more than K versions old are stale; -1 disables
    stale_policy: str = "downweight"  # downweight | skip (skipped ones are marked consumed, untrained)
    stale_decay: float = 0.5  # downweight: weights times decay ** (age - K)
    seed: int = 0  # torch seed (the training itself is deterministic: dropout is off)
    # ---- when to train and publish ----
    publish_every: int = 0  # also publish every M steps within a Train call; 0: only at the end
    auto_train: int = 0  # train one pass when this many annotations are pending; 0 disables
    # ---- store and checkpoints ----
    sync: str = "full"  # SQLite synchronous mode: full (fsync every commit) | normal
    max_batch_sequences: int = 1024  # most sequences one SubmitAnnotations may carry
    checkpoint_every: int = 0  # also checkpoint every N steps; 0: at the end of each Train only
    keep_checkpoints: int = 3  # complete checkpoints kept on disk (the newest)
    checkpoint_pause: float = 0.0  # tests only: seconds to sleep before a checkpoint is renamed complete
    # ---- model and transport ----
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on cpu, bfloat16 on cuda) | float32 | bfloat16 | float16
    threads: int = 0  # torch intra-op threads per process; 0 keeps torch's default
    publish_timeout: float = 120.0  # seconds one UpdateWeights may take before it is retried
    publish_retry: float = 2.0  # seconds between retries to an unreachable policy server
    chunk_bytes: int = 4 * 1024 * 1024  # UpdateWeights chunk size (the proto's limit is 4 MiB)
    # ---- model size: precision, LoRA, FSDP (trainer_server/model.py; README, "Trainer") ----
    precision: str = "fp32"  # fp32 | bf16 (mixed: fp32 master weights and optimizer, bf16 autocast compute)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen base; publish only them
    lora_alpha: float = 16.0  # LoRA scaling numerator (the update is alpha / rank * B A)
    lora_targets: tuple[str, ...] = ()  # module name suffixes to adapt (--lora-targets a,b); empty: PEFT's default
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the torchrun processes (FSDP2)
    rank: int = 0  # torch.distributed rank (torchrun); rank 0 serves gRPC and owns the store
    world_size: int = 1  # number of data-parallel processes
    # ---- security and limits (issue 7; common/auth.py, common/tls.py, common/guard.py) ----
    max_message_bytes: int = 64 * 1024 * 1024  # largest gRPC / Connect message either way
    max_streams: int = 4  # Train streams open at once (gRPC + Connect); one more: RESOURCE_EXHAUSTED
    tls: TlsFiles = TlsFiles()  # --tls-cert/--tls-key[/--tls-client-ca]; none: plaintext
    auth: AuthTokens = AuthTokens()  # token digests per role, from files / environment; none: auth off
    policy_token: Secret | None = None  # admin token sent to the policy servers (UpdateWeights needs one)
    policy_tls: bool = False  # publish over TLS (implied by policy_tls_ca / policy_tls_cert)
    policy_tls_ca: Path | None = None  # roots the policy servers' certificates chain to; None: the system's
    policy_tls_cert: Path | None = None  # client certificate for policy servers with --tls-client-ca
    policy_tls_key: Path | None = None  # its key

    def __post_init__(self) -> None:
        checks = [
            (self.variant in VARIANTS, f"--variant: must be one of {VARIANTS}, got {self.variant!r}"),
            (math.isfinite(self.beta) and self.beta >= 0, f"--beta: must be finite and >= 0, got {self.beta}"),
            (self.kl_target is None or (math.isfinite(self.kl_target) and self.kl_target > 0),
             f"--kl-target: must be > 0, got {self.kl_target}"),
            (self.beta_rate >= 0, f"--beta-rate: must be >= 0, got {self.beta_rate}"),
            (0 < self.clip_eps < 1, f"--clip-eps: must be in (0, 1), got {self.clip_eps}"),
            (0 <= self.gamma <= 1, f"--gamma: must be in [0, 1], got {self.gamma}"),
            (0 <= self.bad_span_share <= 1, f"--bad-span-share: must be in [0, 1], got {self.bad_span_share}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer: must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.learning_rate > 0, f"--lr: must be > 0, got {self.learning_rate}"),
            (self.batch_size >= 1, f"--batch-size: must be >= 1, got {self.batch_size}"),
            (self.micro_batch_size >= 0, f"--micro-batch-size: must be >= 0, got {self.micro_batch_size}"),
            (self.max_seq_len >= 2, f"--max-seq-len: must be >= 2, got {self.max_seq_len}"),
            (self.staleness_limit >= -1, f"--staleness-limit: must be >= -1, got {self.staleness_limit}"),
            (self.stale_policy in STALE_POLICIES, f"--stale-policy: must be one of {STALE_POLICIES}"),
            (0 <= self.stale_decay <= 1, f"--stale-decay: must be in [0, 1], got {self.stale_decay}"),
            (self.publish_every >= 0, f"--publish-every: must be >= 0, got {self.publish_every}"),
            (self.auto_train >= 0, f"--auto-train: must be >= 0, got {self.auto_train}"),
            (self.sync in ("full", "normal"), f"--sync: must be full or normal, got {self.sync!r}"),
            (self.max_batch_sequences >= 1, "--max-batch-sequences: must be >= 1"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints: must be >= 1, got {self.keep_checkpoints}"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), f"--dtype: unknown {self.dtype!r}"),
            (0 < self.chunk_bytes <= 4 * 1024 * 1024, "--chunk-bytes: must be in (0, 4 MiB]"),
            (0 <= self.rank < self.world_size, f"rank {self.rank} not in [0, world size {self.world_size})"),
            (self.max_message_bytes >= 5 * 1024 * 1024, "--max-message-bytes: must hold a 4 MiB chunk (>= 5 MiB)"),
            (self.max_streams >= 1, f"--max-streams: must be >= 1, got {self.max_streams}"),
            ((self.policy_tls_cert is None) == (self.policy_tls_key is None),
             "--policy-tls-cert and --policy-tls-key: give both or neither"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_horizon(self.horizon)
        _ = self.model_mode  # builds the ModelMode, which checks --precision and --lora-*
        if self.fsdp and self.world_size < 2:
            raise ValueError("--fsdp: shards over torchrun's processes; run it under torchrun --nproc-per-node >= 2")

    @property
    def model_mode(self):
        """How the model trains (trainer_server/model.py), from --precision, --lora-*, --fsdp."""
        from trainer_server.model import ModelMode

        return ModelMode(self.precision, self.lora_rank, self.lora_alpha, self.lora_targets, self.fsdp)

    def to_log(self) -> dict:
        """The configuration as plain values, for the start-up log line."""
        values = asdict(self)
        values["data"] = str(self.data)
        return loggable(values)

    @property
    def publish_tls(self) -> bool:
        return self.policy_tls or self.policy_tls_ca is not None or self.policy_tls_cert is not None


def parse_horizon(value: str) -> int | None:
    """'full' -> None (the whole sequence); a positive integer string -> that integer."""
    text = str(value).strip().lower()
    if text == "full":
        return None
    try:
        horizon = int(text)
    except ValueError:
        raise ValueError(f"horizon: must be a positive integer or 'full', got {value!r}") from None
    if horizon < 1:
        raise ValueError(f"horizon: must be a positive integer or 'full', got {value!r}")
    return horizon


def build_parser() -> argparse.ArgumentParser:
    d = TrainerConfig()
    p = argparse.ArgumentParser(
        prog="python -m trainer_server",
        description="tokenfeedback trainer: stores token annotations durably, trains the policy with the "
        "fused per-token loss + KL to the reference, and publishes new weights to the policy servers. "
        "Run data-parallel with `torchrun --nproc-per-node K -m trainer_server ...`.",
    )
    a = p.add_argument
    a("--model", default=d.model, help="local model folder or hub id (default %(default)s)")
    a("--data", type=Path, default=d.data, help="folder for the annotation store and checkpoints")
    a("--host", default=d.host, help="bind address (default %(default)s)")
    a("--port", type=int, default=d.port, help="gRPC port, 0 for a free one (default %(default)s)")
    a("--http-port", type=int, default=d.http_port,
      help="also serve TrainerService over Connect (the labeling page, curl) on this port; 0 for a free one")
    a("--policy", default="", help="HOST:PORT[,HOST:PORT...] of the policy servers to publish to")
    a("--variant", default=d.variant, choices=VARIANTS, help="per-row loss (default %(default)s)")
    a("--beta", type=float, default=d.beta, help="KL coefficient; the start value if --kl-target is set")
    a("--kl-target", type=float, default=None, help="adaptive beta: hold the mean KL per position near this")
    a("--beta-rate", type=float, default=d.beta_rate, help="adaptive beta gain K_beta (default %(default)s)")
    a("--clip-eps", type=float, default=d.clip_eps, help="pg_clip ratio clip (default %(default)s)")
    a("--horizon", default=d.horizon, help="credit-assignment horizon: integer or 'full' (default 1)")
    a("--gamma", type=float, default=d.gamma, help="discount over the horizon (default %(default)s)")
    a("--baseline", action="store_true",
      help="pg_clip: subtract the batch-mean return G from the sampled rows' weights (DESIGN.md, Horizon)")
    a("--bad-span-share", type=float, default=d.bad_span_share,
      help="weight share of a bad span's tokens after its first (default %(default)s)")
    a("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="adamw (default) or sgd")
    a("--lr", "--learning-rate", dest="learning_rate", type=float, default=d.learning_rate,
      help="learning rate (default %(default)s)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clip, 0 off (default %(default)s)")
    a("--batch-size", type=int, default=d.batch_size, help="sequences per step (default %(default)s)")
    a("--micro-batch-size", type=int, default=d.micro_batch_size,
      help="sequences per forward/backward in one process, 0 = all (default %(default)s)")
    a("--max-seq-len", type=int, default=d.max_seq_len, help="prompt + completion tokens (default %(default)s)")
    a("--staleness-limit", type=int, default=d.staleness_limit,
      help="K: annotations more than K versions old are stale; -1 off (default %(default)s)")
    a("--stale-policy", default=d.stale_policy, choices=STALE_POLICIES, help="what to do with stale annotations")
    a("--stale-decay", type=float, default=d.stale_decay, help="downweight factor per version past K")
    a("--seed", type=int, default=d.seed, help="torch seed (default %(default)s)")
    a("--publish-every", type=int, default=d.publish_every, help="also publish every M steps (0: at the end)")
    a("--auto-train", type=int, default=d.auto_train,
      help="train one pass whenever this many annotations are pending (0: off)")
    a("--sync", default=d.sync, choices=("full", "normal"), help="SQLite synchronous mode (default full)")
    a("--max-batch-sequences", type=int, default=d.max_batch_sequences,
      help="most sequences per SubmitAnnotations (default %(default)s)")
    a("--checkpoint-every", type=int, default=d.checkpoint_every,
      help="also checkpoint every N steps (0: at the end of each Train)")
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (default %(default)s)")
    a("--checkpoint-pause", type=float, default=d.checkpoint_pause, help=argparse.SUPPRESS)
    a("--device", default=d.device, help="auto | cpu | cuda[:N] (default %(default)s)")
    a("--dtype", default=d.dtype, help="auto | float32 | bfloat16 | float16 (default %(default)s)")
    a("--threads", type=int, default=d.threads, help="torch threads per process, 0 = torch default")
    a("--precision", default=d.precision, choices=("fp32", "bf16"),
      help="fp32, or bf16: bfloat16 autocast with fp32 master weights and optimizer state (default %(default)s)")
    a("--lora-rank", type=int, default=d.lora_rank,
      help="train LoRA adapters of this rank on a frozen base and publish only them; 0: full weights")
    a("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha: the update is alpha/rank * B A (default %(default)s)")
    a("--lora-targets", default="",
      help="comma-separated module names to adapt (e.g. q_proj,v_proj); default: PEFT's choice for the model")
    a("--fsdp", action="store_true",
      help="under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2)")
    a("--publish-timeout", type=float, default=d.publish_timeout, help="seconds per UpdateWeights")
    a("--publish-retry", type=float, default=d.publish_retry, help="seconds between publish retries")
    a("--max-message-bytes", type=int, default=d.max_message_bytes, help="gRPC / Connect message size limit")
    a("--max-streams", type=int, default=d.max_streams,
      help="Train streams open at once; more get RESOURCE_EXHAUSTED (default %(default)s)")
    add_tls_arguments(p)
    add_auth_arguments(p)
    a("--policy-token-file", metavar="PATH", default=None,
      help=f"file with the admin token sent to the policy servers (also ${ENV_POLICY})")
    a("--policy-tls", action="store_true", help="publish to the policy servers over TLS (system roots)")
    a("--policy-tls-ca", type=Path, default=None, metavar="PEM", help="roots of the policy servers' certificates (implies TLS)")
    a("--policy-tls-cert", type=Path, default=None, metavar="PEM",
      help="client certificate for policy servers that require one")
    a("--policy-tls-key", type=Path, default=None, metavar="PEM", help="key of --policy-tls-cert")
    return p


def config_from_args(argv: list[str] | None = None, rank: int = 0, world_size: int = 1,
                     environ: Mapping[str, str] | None = None) -> TrainerConfig:
    """Parse argv into a TrainerConfig; argparse errors exit with status 2 and a usage line.
    Tokens also come from `environ` (__main__ passes os.environ; nothing else reads it)."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    environ = {} if environ is None else environ
    try:
        security = dict(tls=tls_from_args(namespace), auth=tokens_from_args(namespace, environ))
        security["tls"].check()
        token_file = namespace.policy_token_file
        if token_file:
            tokens = read_token_file(token_file, "--policy-token-file")
            if len(tokens) != 1:
                raise ValueError(f"--policy-token-file: {token_file} must hold exactly one token, got {len(tokens)}")
            security["policy_token"] = tokens[0]
        elif environ.get(ENV_POLICY, "").strip():
            security["policy_token"] = Secret(check_token(environ[ENV_POLICY], f"${ENV_POLICY}"))
    except ValueError as exc:
        parser.error(str(exc))
    args = vars(namespace)
    for name in ("tls_cert", "tls_key", "tls_client_ca", "annotator_token_file", "admin_token_file",
                 "policy_token_file"):
        args.pop(name)
    args.update(security)
    policies = tuple(a.strip() for a in args.pop("policy").split(",") if a.strip())
    args["lora_targets"] = tuple(t.strip() for t in args["lora_targets"].split(",") if t.strip())
    for address in policies:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--policy: expected HOST:PORT, got {address!r}")
    try:
        return TrainerConfig(**args, policies=policies, rank=rank, world_size=world_size)
    except ValueError as exc:
        parser.error(str(exc))
