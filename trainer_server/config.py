"""The trainer's configuration: one frozen dataclass, filled from the command line, logged at start.

The dataclass is the one source: each field that is a flag carries its help (and, where the flag
is not simply `--field-name`, its name) in the field's metadata, and common/flags.py makes the
flags from the fields. Values are checked once, in `__post_init__`; the training parameters that
a Train request may override per call are checked by `check_training`, the same function for the
flag and for the override (docs/design.md, "Errors and limits").

Nothing deeper in trainer_server/ reads the command line or the environment; everything a part
needs arrives through this object (torchrun's RANK/WORLD_SIZE are read once, in server.py).
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
from common.errors import InvalidArgument, quote
from common.flags import add_flags, flag, flag_values
from common.flags import flag_name as _flag_name
from common.tls import TlsFiles, add_tls_arguments, tls_from_args

VARIANTS = ("likelihood", "unlikelihood", "pg_clip")
STALE_POLICIES = ("downweight", "skip")
OPTIMIZERS = ("adamw", "sgd")
SYNC_MODES = ("full", "normal")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("fp32", "bf16")  # trainer_server/model.py
MAX_BATCH_SIZE = 65536  # sequences per optimizer step, flag or Train override
MAX_BETA = 1e4  # KL coefficient, flag or Train override: beta * KL stays far inside float32


def names(text: str) -> tuple[str, ...]:
    """"a, b" -> ("a", "b"): a comma-separated flag value."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass(frozen=True)
class TrainerConfig:
    """Everything the trainer server runs with. Defaults are meant to work on the demo model."""

    model: str = flag("data/demo-model", "local model folder or hub id")
    data: Path = flag(Path("data/trainer"), "folder for the annotation store and checkpoints (created if missing)")
    host: str = flag("127.0.0.1", "bind address")
    port: int = flag(50052, "gRPC port, 0 for a free one (announced on stdout)")
    http_port: int | None = flag(
        None, "also serve TrainerService over Connect (the labeling page, curl) on this port; 0 for a free one",
        type=int)
    # HOST:PORT of every policy server to publish to (--policy, comma-separated)
    policies: tuple[str, ...] = ()
    # ---- the loss (docs/design.md, "The loss") ----
    variant: str = flag("unlikelihood", "per-row loss", choices=VARIANTS)
    beta: float = flag(0.1, "KL coefficient; the start value if --kl-target is set")
    kl_target: float | None = flag(None, "adaptive beta: hold the mean KL per position near this", type=float)
    beta_rate: float = flag(0.1, "adaptive beta gain K_beta of Ziegler et al. (2019): "
                                 "beta *= 1 + K_beta * clip(err, +-0.2)")
    clip_eps: float = flag(0.2, "pg_clip: importance-ratio clip range [1-eps, 1+eps]")
    horizon: str = flag("1", "credit-assignment horizon: integer or 'full' (docs/design.md, \"Horizon\")")
    gamma: float = flag(1.0, "discount over the horizon, in [0, 1]")
    baseline: bool = flag(False, "pg_clip: subtract the batch-mean return G from the sampled rows' weights "
                                 "(docs/design.md, \"Horizon\")")
    bad_span_share: float = flag(0.0, "weight share of a bad span's tokens after its first (docs/design.md, \"Spans\")")
    # ---- optimization ----
    optimizer: str = flag("adamw", "adamw, or sgd (the update is -lr * gradient, e.g. for exact comparisons)",
                          choices=OPTIMIZERS)
    learning_rate: float = flag(5e-5, "learning rate", name="--lr", aliases=("--learning-rate",))
    weight_decay: float = flag(0.0, "AdamW decoupled decay (0: the KL term keeps the policy near the reference)")
    max_grad_norm: float = flag(1.0, "clip the global gradient norm; 0 disables")
    batch_size: int = flag(16, "sequences per optimizer step (over all processes)")
    micro_batch_size: int = flag(0, "sequences per forward/backward in one process; 0: the whole shard")
    max_seq_len: int = flag(1024, "prompt + completion tokens; longer sequences are rejected")
    staleness_limit: int = flag(-1, "K: annotations more than K versions old are stale; -1 off")
    stale_policy: str = flag("downweight", "what to do with stale annotations (skip: marked consumed, untrained)",
                             choices=STALE_POLICIES)
    stale_decay: float = flag(0.5, "downweight: weights times decay ** (age - K)")
    seed: int = flag(0, "torch seed (the training itself is deterministic: dropout is off)")
    # ---- when to train and publish ----
    publish_every: int = flag(0, "also publish every M steps within a Train call; 0: only at the end")
    auto_train: int = flag(0, "train one pass whenever this many annotations are pending; 0: off")
    # ---- store and checkpoints ----
    sync: str = flag("full", "SQLite synchronous mode: full (fsync every commit) | normal", choices=SYNC_MODES)
    max_batch_sequences: int = flag(1024, "most sequences per SubmitAnnotations")
    checkpoint_every: int = flag(0, "also checkpoint every N steps; 0: at the end of each Train only")
    keep_checkpoints: int = flag(3, "complete checkpoints kept on disk (the newest)")
    # tests only: seconds to sleep before a checkpoint is renamed complete
    checkpoint_pause: float = flag(0.0, argparse.SUPPRESS)
    # ---- model and transport ----
    device: str = flag("auto", "auto (cuda when present) | cpu | cuda | cuda:N")
    dtype: str = flag("auto", "auto (float32 on cpu, bfloat16 on cuda) | float32 | bfloat16 | float16")
    threads: int = flag(0, "torch intra-op threads per process; 0 keeps torch's default")
    publish_timeout: float = flag(120.0, "seconds one UpdateWeights may take before it is retried")
    publish_retry: float = flag(2.0, "seconds between retries to an unreachable policy server")
    chunk_bytes: int = 4 * 1024 * 1024  # UpdateWeights chunk size (the proto's limit is 4 MiB); no flag
    # ---- model size: precision, LoRA, FSDP (trainer_server/model.py; README, "The trainer on real model sizes") ----
    precision: str = flag("fp32", "fp32, or bf16: bfloat16 autocast with fp32 master weights and optimizer state",
                          choices=PRECISIONS)
    lora_rank: int = flag(0, "train LoRA adapters of this rank on a frozen base and publish only them; 0: full weights")
    lora_alpha: float = flag(16.0, "LoRA alpha: the adapters' update is alpha / rank * B A")
    lora_targets: tuple[str, ...] = flag((), "comma-separated module names to adapt (e.g. q_proj,v_proj); "
                                             "empty: PEFT's choice for the model", type=names, metavar="A,B")
    fsdp: bool = flag(False, "under torchrun: shard parameters, gradients and optimizer state over the "
                             "processes (FSDP2)")
    rank: int = 0  # torch.distributed rank (torchrun); rank 0 serves gRPC and owns the store
    world_size: int = 1  # number of data-parallel processes
    # ---- security and limits (docs/design.md, "Security"; common/auth.py, common/tls.py, common/guard.py) ----
    max_message_bytes: int = flag(64 * 1024 * 1024, "largest gRPC / Connect message either way")
    max_streams: int = flag(4, "Train streams open at once (gRPC + Connect); more get RESOURCE_EXHAUSTED")
    tls: TlsFiles = TlsFiles()  # --tls-cert/--tls-key[/--tls-client-ca]; none: plaintext
    auth: AuthTokens = AuthTokens()  # token digests per role, from files / environment; none: auth off
    # admin token sent to the policy servers (UpdateWeights needs one): --policy-token-file or $ENV_POLICY
    policy_token: Secret | None = None
    policy_tls: bool = flag(False, "publish to the policy servers over TLS (system roots)")
    policy_tls_ca: Path | None = flag(None, "roots of the policy servers' certificates (implies TLS)",
                                      type=Path, metavar="PEM")
    policy_tls_cert: Path | None = flag(None, "client certificate for policy servers that require one",
                                        type=Path, metavar="PEM")
    policy_tls_key: Path | None = flag(None, "key of --policy-tls-cert", type=Path, metavar="PEM")

    def __post_init__(self) -> None:
        for name in TRAINING_CHECKS:
            try:
                check_training(name, getattr(self, name))
            except InvalidArgument as exc:
                raise ValueError(f"{flag_name(name)}: {exc.detail}") from None
        checks = [
            (self.kl_target is None or (math.isfinite(self.kl_target) and self.kl_target > 0),
             f"--kl-target: must be > 0, got {self.kl_target}"),
            (self.beta_rate >= 0, f"--beta-rate: must be >= 0, got {self.beta_rate}"),
            (0 < self.clip_eps < 1, f"--clip-eps: must be in (0, 1), got {self.clip_eps}"),
            (0 <= self.bad_span_share <= 1, f"--bad-span-share: must be in [0, 1], got {self.bad_span_share}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer: must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.micro_batch_size >= 0, f"--micro-batch-size: must be >= 0, got {self.micro_batch_size}"),
            (self.max_seq_len >= 2, f"--max-seq-len: must be >= 2, got {self.max_seq_len}"),
            (self.staleness_limit >= -1, f"--staleness-limit: must be >= -1, got {self.staleness_limit}"),
            (self.stale_policy in STALE_POLICIES, f"--stale-policy: must be one of {STALE_POLICIES}"),
            (0 <= self.stale_decay <= 1, f"--stale-decay: must be in [0, 1], got {self.stale_decay}"),
            (self.publish_every >= 0, f"--publish-every: must be >= 0, got {self.publish_every}"),
            (self.auto_train >= 0, f"--auto-train: must be >= 0, got {self.auto_train}"),
            (self.sync in SYNC_MODES, f"--sync: must be full or normal, got {self.sync!r}"),
            (self.max_batch_sequences >= 1, "--max-batch-sequences: must be >= 1"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints: must be >= 1, got {self.keep_checkpoints}"),
            (self.dtype in DTYPES, f"--dtype: unknown {self.dtype!r}"),
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


# ---- the training parameters a Train request may override (one check for flag and override) ----


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


TRAINING_CHECKS = {  # field -> (holds, what it must be)
    "variant": (lambda v: v in VARIANTS, f"must be one of {VARIANTS}"),
    "beta": (lambda v: _finite(v) and 0 <= v <= MAX_BETA, f"must be finite and in [0, {MAX_BETA:g}]"),
    "learning_rate": (lambda v: _finite(v) and 0 < v <= 1, "must be in (0, 1]"),
    "batch_size": (lambda v: isinstance(v, int) and 1 <= v <= MAX_BATCH_SIZE, f"must be in [1, {MAX_BATCH_SIZE}]"),
    "horizon": (lambda v: _horizon_ok(v), "must be a positive integer or 'full'"),
    "gamma": (lambda v: _finite(v) and 0 <= v <= 1, "must be in [0, 1]"),
}


def check_training(name: str, value) -> None:
    """Raise InvalidArgument naming `name` unless `value` is a valid setting of that training
    parameter (TRAINING_CHECKS). The config's flags and Train's per-call overrides both pass here."""
    holds, must = TRAINING_CHECKS[name]
    if not holds(value):
        raise InvalidArgument(f"{must}, got {quote(value)}", name)


def _horizon_ok(value) -> bool:
    try:
        parse_horizon(value)
    except ValueError:
        return False
    return True


def parse_horizon(value: str) -> int | None:
    """'full' -> None (the whole sequence); a positive integer string -> that integer."""
    text = str(value).strip().lower()
    if text == "full":
        return None
    try:
        horizon = int(text)
    except ValueError:
        raise ValueError(f"horizon: must be a positive integer or 'full', got {quote(value)}") from None
    if horizon < 1:
        raise ValueError(f"horizon: must be a positive integer or 'full', got {quote(value)}")
    return horizon


# ---- the command line, made from the fields ----


def flag_name(name: str) -> str:
    """The command-line flag of a config field ("learning_rate" -> "--lr")."""
    return _flag_name(TrainerConfig, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer_server",
        description="tokenfeedback trainer: stores token annotations durably, trains the policy with the "
        "fused per-token loss + KL to the reference, and publishes new weights to the policy servers. "
        "Run data-parallel with `torchrun --nproc-per-node K -m trainer_server ...`.",
    )
    add_flags(p, TrainerConfig)
    p.add_argument("--policy", default="", help="HOST:PORT[,HOST:PORT...] of the policy servers to publish to")
    add_tls_arguments(p)
    add_auth_arguments(p)
    p.add_argument("--policy-token-file", metavar="PATH", default=None,
                   help=f"file with the admin token sent to the policy servers (also ${ENV_POLICY})")
    return p


def config_from_args(argv: list[str] | None = None, rank: int = 0, world_size: int = 1,
                     environ: Mapping[str, str] | None = None) -> TrainerConfig:
    """Parse argv into a TrainerConfig; argparse errors exit with status 2 and a usage line.
    Tokens also come from `environ` (the server passes os.environ; nothing else reads it)."""
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
    policies = tuple(a.strip() for a in namespace.policy.split(",") if a.strip())
    for address in policies:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--policy: expected HOST:PORT, got {address!r}")
    try:
        return TrainerConfig(**flag_values(namespace, TrainerConfig), **security, policies=policies, rank=rank, world_size=world_size)
    except ValueError as exc:
        parser.error(str(exc))
