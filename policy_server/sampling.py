"""Sampling one token per sequence from a batch of logits, with everything a TokenEvent reports.

Each sequence has its own parameters and its own torch.Generator, so the same seed and parameters
give the same tokens whatever else is decoded in the same batch. Two log-probabilities per token
(policy.proto, TokenEvent):
- logprob: log_softmax of the raw logits (temperature 1), what the trainer optimizes;
- sampling_logprob: under the distribution actually sampled from, after temperature, top-k and
  top-p; exactly logprob at temperature 1 without truncation, 0 for greedy decoding.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from common.errors import InvalidArgument, ServiceError, quote

MAX_ALTERNATIVES = 20  # policy.proto: num_alternatives in 0..20
# Temperature is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE] (policy.proto): logits / T is
# computed in float32, and below the minimum it overflows to inf for ordinary logits (the
# probabilities become NaN); above the maximum every distribution is uniform to float32 precision
# anyway (docs/design.md, "Errors and limits").
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256  # longest stop string, in code points


@dataclass(frozen=True)
class SamplingParams:
    """Engine-side SamplingParams (policy.proto), with the defaults resolved."""

    max_new_tokens: int = 32  # tokens to sample, 1..the server's limit
    temperature: float = 1.0  # 0 is greedy, else in [MIN_TEMPERATURE, MAX_TEMPERATURE]
    top_k: int = 0  # 0 keeps all tokens
    top_p: float = 1.0  # in (0, 1]; 1 keeps all tokens
    seed: int | None = None  # None draws a fresh seed
    stop: tuple[str, ...] = ()  # stop strings, at most 8, non-empty
    stop_on_eos: bool = True
    num_alternatives: int = 0  # 0..20

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def validate(self, max_new_tokens_limit: int, vocab_size: int, field: str = "params") -> None:
        """InvalidArgument naming the first bad field."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidArgument(f"must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}",
                                  f"{field}.max_new_tokens")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):  # also NaN
            raise InvalidArgument(f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                                  f"got {self.temperature:g}", f"{field}.temperature")
        if self.top_k < 0:
            raise InvalidArgument(f"must be >= 0, got {self.top_k}", f"{field}.top_k")
        if not 0.0 < self.top_p <= 1.0:  # also rejects NaN
            raise InvalidArgument(f"must be in (0, 1], got {self.top_p:g}", f"{field}.top_p")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"must be in [0, 2^64), got {self.seed}", f"{field}.seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}", f"{field}.stop")
        for i, stop in enumerate(self.stop):
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise InvalidArgument(f"must be 1..{MAX_STOP_CHARS} characters, got {len(stop)}", f"{field}.stop[{i}]")
        if not 0 <= self.num_alternatives <= MAX_ALTERNATIVES:
            raise InvalidArgument(f"must be in [0, {MAX_ALTERNATIVES}], got {self.num_alternatives}",
                                  f"{field}.num_alternatives")


@dataclass
class SamplerState:
    """Per-sequence sampling state: the parameters and the random stream."""

    params: SamplingParams
    device: torch.device
    seed: int = 0
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        if self.params.seed is None:
            self.seed = secrets.randbits(63)
        else:
            self.seed = self.params.seed
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)


@dataclass(frozen=True)
class Sample:
    """One sampled token and what its TokenEvent reports."""

    token_id: int
    logprob: float  # temperature 1, no truncation
    sampling_logprob: float  # under the sampling distribution; 0 when greedy
    rank: int  # 1-based rank of token_id by logprob
    alternatives: tuple[tuple[int, float], ...]  # (id, logprob) of the top num_alternatives, descending


def sampling_logprobs(logits: torch.Tensor, logprobs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log-probabilities of the distribution sampled from (temperature, top-k, top-p), -inf for
    truncated tokens. logits, logprobs: (V,) float32."""
    if params.temperature == 1.0 and not params.truncates:
        return logprobs  # exactly the same numbers (TokenEvent: sampling_logprob == logprob here)
    z = logits / params.temperature  # (V,)
    if 0 < params.top_k < z.numel():
        kth = torch.topk(z, params.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True)  # (V,), (V,)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        # Keep the smallest prefix whose mass reaches top_p: a token goes when the tokens before it
        # already reach top_p (the most likely token always stays).
        drop = before >= params.top_p
        drop[0] = False
        z = z.index_fill(0, order[drop], float("-inf"))
    return torch.log_softmax(z, dim=-1)


def _sample_one(logits: torch.Tensor, logprobs: torch.Tensor, state: SamplerState) -> tuple[int, float]:
    """(token, sampling logprob) for one row. logits, logprobs: (V,) float32, finite."""
    params = state.params
    if params.temperature == 0.0:
        return int(torch.argmax(logits)), 0.0
    slp = sampling_logprobs(logits, logprobs, params)  # (V,)
    probs = slp.exp()  # (V,)
    # logprobs were checked for the whole batch; a distribution of its own (temperature, top-k,
    # top-p) is checked here
    if slp is not logprobs and (bool(torch.isnan(probs).any()) or not bool(probs.sum() > 0)):
        raise ServiceError(f"the sampling distribution is not finite at temperature {params.temperature:g}, "
                           f"top_k {params.top_k}, top_p {params.top_p:g}")
    token = int(torch.multinomial(probs, 1, generator=state.generator))
    return token, float(slp[token])


def sample_rows(logits: torch.Tensor, states: list[SamplerState]) -> list[Sample | ServiceError]:
    """Sample one token per row. logits: (B, V) in any float dtype.

    Rows fail alone: a row whose logits are not finite (NaN, +inf, or nothing but -inf), or whose
    own sampling fails, gets a ServiceError (INTERNAL, saying what went wrong) in its place, and
    the other rows are sampled as if it were not there (docs/design.md, "Errors and limits")."""
    logits = logits.float()  # (B, V)
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    broken = torch.isnan(logprobs).any(dim=-1).tolist()  # (B,) NaN, +inf or all -inf logits
    want = max((s.params.num_alternatives for s in states), default=0)
    top = torch.topk(logprobs, want, dim=-1) if want else None  # (B, want), sorted descending
    chosen: list[int] = []
    behavior: list[float] = []
    failed: dict[int, ServiceError] = {}
    for row, state in enumerate(states):
        token, slp = 0, 0.0  # a placeholder where the row fails
        if broken[row]:
            failed[row] = ServiceError("the model's next-token logits are not finite (NaN or inf)")
        else:
            try:
                token, slp = _sample_one(logits[row], logprobs[row], state)
            except ServiceError as exc:
                failed[row] = exc
            except Exception as exc:  # noqa: BLE001 - this row fails, the others go on
                failed[row] = ServiceError(f"sampling failed: {type(exc).__name__}: {quote(str(exc), 200)}")
        chosen.append(token)
        behavior.append(slp)
    index = torch.tensor(chosen, device=logits.device)  # (B,)
    token_logprobs = logprobs.gather(1, index[:, None])  # (B, 1)
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1  # (B,)
    token_logprobs, ranks = token_logprobs[:, 0].tolist(), ranks.tolist()
    top_ids = top.indices.tolist() if top is not None else None
    top_lps = top.values.tolist() if top is not None else None
    out: list[Sample | ServiceError] = []
    for row, state in enumerate(states):
        if row in failed:
            out.append(failed[row])
            continue
        n = state.params.num_alternatives
        alternatives = tuple(zip(top_ids[row][:n], top_lps[row][:n], strict=True)) if n else ()
        out.append(Sample(chosen[row], token_logprobs[row], behavior[row], int(ranks[row]), alternatives))
    return out
