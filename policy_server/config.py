"""The policy server's configuration: one frozen dataclass, the one source of its flags.

`PolicyServerConfig` holds every setting; the engine's share of them is its base class
`EngineConfig` (the engine reads nothing else), so no field is written twice. Each field that is
a flag carries its help in the field's metadata (common/flags.py makes the flags from the fields);
values are checked once, in `__post_init__`, with a message naming the flag.

Importing this module brings in neither grpc nor the generated stubs (the engine imports it;
docs/design.md, "Servers").
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields

from common.auth import AuthTokens, add_auth_arguments, tokens_from_args
from common.flags import add_flags, flag, flag_values
from common.hf import DTYPE_CHOICES
from common.tls import TlsFiles, add_tls_arguments, tls_from_args

MIN_MESSAGE_BYTES = 5 * 1024 * 1024  # a 4 MiB update chunk plus framing
ENGINES = ("hf", "vllm")  # --engine
VLLM_INSTALL = "install it with `make vllm` (a venv, .cache/vllm-venv) and run the server with its python"


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass(frozen=True)
class EngineConfig:
    """What the engine runs with (the limits: docs/design.md, "Errors and limits")."""

    model: str = flag("data/demo-model", "local model folder or Hugging Face hub id")
    # hf: in-process Hugging Face (engine.py); vllm: vLLM's AsyncLLM (vllm_engine.py), from the
    # venv `make vllm` builds; only --engine vllm imports anything of vLLM.
    engine: str = flag("hf", "hf | vllm (install: make vllm; then run .cache/vllm-venv/bin/python -m policy_server)",
                       choices=ENGINES)
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = flag("auto", "parameter dtype: auto is float32 on CPU, bfloat16 on a GPU", choices=DTYPE_CHOICES)
    max_batch: int = flag(16, "streams decoded together in one forward")
    max_queue: int = flag(256, "requests waiting for a decoding slot before RESOURCE_EXHAUSTED")
    max_new_tokens_limit: int = flag(512, "largest max_new_tokens accepted")
    # 1 suits small models and shared machines (OpenMP threads that wait for a busy core stall
    # every op; the gRPC loop needs a core too).
    threads: int = flag(1, "torch intra-op threads, 0 = torch default")
    # Requests past these limits are refused with INVALID_ARGUMENT naming the field, before any
    # tokenizing or model work.
    max_prompt_tokens: int = flag(4096, "longest prompt in tokens (Generate, Score); the model's length caps it too")
    max_text_chars: int = flag(65536, "longest text field in characters, checked before tokenizing")
    max_update_bytes: int = flag(0, "largest weight update in bytes (header.total_bytes); 0: the model's size "
                                    "bounds it (each tensor at most once, at its size)")
    # ---- --engine vllm only ----
    tensor_parallel_size: int = flag(1, "vllm: GPUs one model is sharded over")
    gpu_memory_utilization: float = flag(0.9, "vllm: share of each GPU's memory for weights and KV cache")
    max_model_len: int = flag(0, "vllm: longest prompt + completion in tokens, 0 = the model's own length")

    def __post_init__(self) -> None:
        _check([
            (self.max_batch >= 1, f"--max-batch: must be >= 1, got {self.max_batch}"),
            (self.max_queue >= 0, f"--max-queue: must be >= 0, got {self.max_queue}"),
            (self.max_new_tokens_limit >= 1, f"--max-new-tokens-limit: must be >= 1, got {self.max_new_tokens_limit}"),
            (self.threads >= 0, f"--threads: must be >= 0, got {self.threads}"),
            (self.max_prompt_tokens >= 1, f"--max-prompt-tokens: must be >= 1, got {self.max_prompt_tokens}"),
            (self.max_text_chars >= 1, f"--max-text-chars: must be >= 1, got {self.max_text_chars}"),
            (self.max_update_bytes >= 0, f"--max-update-bytes: must be >= 0, got {self.max_update_bytes}"),
            (self.dtype in DTYPE_CHOICES, f"--dtype: must be one of {DTYPE_CHOICES}, got {self.dtype!r}"),
            (self.engine in ENGINES, f"--engine: must be one of {ENGINES}, got {self.engine!r}"),
            (self.tensor_parallel_size >= 1, f"--tensor-parallel-size: must be >= 1, got {self.tensor_parallel_size}"),
            (0 < self.gpu_memory_utilization <= 1,
             f"--gpu-memory-utilization: must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.max_model_len >= 0, f"--max-model-len: must be >= 0, got {self.max_model_len}"),
            (self.engine != "vllm" or importlib.util.find_spec("vllm") is not None,
             f"--engine vllm: vLLM is not installed in {sys.executable}; {VLLM_INSTALL}"),
        ])


@dataclass(frozen=True)
class PolicyServerConfig(EngineConfig):
    """Everything the policy server runs with: the engine's settings, then transport and security."""

    host: str = flag("127.0.0.1", "bind address; plaintext without auth: loopback unless you know better")
    port: int = flag(50051, "gRPC port; 0 picks a free one (announced on stdout)")
    http_port: int | None = flag(None, "also serve PolicyService over Connect (the labeling page, curl) on this "
                                       "port; 0: a free one", type=int)
    grace_s: float = flag(10.0, "seconds running streams get on SIGTERM before they are cancelled", name="--grace")
    # Above the 4 MiB update chunks plus framing, far below memory.
    max_message_bytes: int = flag(16 * 1024 * 1024, "largest gRPC / Connect message either way")
    # ---- security and limits (docs/design.md, "Security"; common/auth.py, common/tls.py, common/guard.py) ----
    max_streams: int = flag(64, "Generate streams open at once (gRPC + Connect); more get RESOURCE_EXHAUSTED")
    max_updates: int = flag(2, "UpdateWeights calls at once (each may buffer a whole model), 0 = no limit")
    tls: TlsFiles = TlsFiles()  # --tls-cert/--tls-key[/--tls-client-ca]; none: plaintext
    auth: AuthTokens = AuthTokens()  # token digests per role, from files / environment; none: auth off

    def __post_init__(self) -> None:
        super().__post_init__()
        _check([
            (self.grace_s >= 0, f"--grace: must be >= 0, got {self.grace_s}"),
            (self.max_message_bytes >= MIN_MESSAGE_BYTES,
             f"--max-message-bytes: must hold a 4 MiB update chunk (>= 5 MiB), got {self.max_message_bytes}"),
            (self.max_streams >= 1, f"--max-streams: must be >= 1, got {self.max_streams}"),
            (self.max_updates >= 0, f"--max-updates: must be >= 0, got {self.max_updates}"),
        ])

    def engine_config(self) -> EngineConfig:
        """The engine's share of the settings (EngineConfig's fields, taken over as they are)."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m policy_server", description="tokenfeedback PolicyService over gRPC")
    add_flags(p, PolicyServerConfig)
    add_tls_arguments(p)
    add_auth_arguments(p)
    return p


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> PolicyServerConfig:
    """The config from argv; tokens also from `environ` (main passes os.environ; nothing else reads
    it). A bad value exits with status 2 and a usage line naming the flag."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        tls = tls_from_args(namespace)
        tls.check()
        return PolicyServerConfig(**flag_values(namespace, PolicyServerConfig), tls=tls,
                                  auth=tokens_from_args(namespace, environ or {}))
    except ValueError as exc:
        parser.error(str(exc))
