"""LoRA adapter updates (common/adapters.py) checked on arrival and merged (policy_server/adapters.py):
W = B + up @ down, each update the whole adapter, B the weight before any adapter."""

from __future__ import annotations

import pytest
import torch

from common.adapters import UpdateAccumulator, factor_names, pair_factors
from common.errors import InvalidArgument
from common.weights import iter_chunks, summarize
from policy_server.adapters import AdapterMerger

W = "layer.weight"


def model_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {W: torch.randn(6, 5, generator=g), "layer.bias": torch.randn(6, generator=g),
            "other.weight": torch.randn(4, 6, generator=g)}


def factors(rank: int, seed: int, weight: str = W, rows: int = 6, cols: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    up, down = factor_names(weight)
    return {up: torch.randn(rows, rank, generator=g), down: torch.randn(rank, cols, generator=g)}


def receive(tensors: dict[str, torch.Tensor], state=None) -> dict[str, torch.Tensor]:
    state = state or model_state()
    chunks = list(iter_chunks(tensors))
    summary = summarize(chunks)
    acc = UpdateAccumulator({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}, 0)
    acc.header(1, summary.tensor_count, summary.total_bytes)
    for c in chunks:
        acc.chunk(c.name, c.dtype, c.shape, c.offset, c.data)
    return acc.commit(summary.sha256)


def test_factors_of_any_rank_arrive_and_pair_up():
    for rank in (1, 3, 5):
        got = receive(factors(rank, 0))
        (weight, (up, down)), = pair_factors(got).items()
        assert weight == W and up.shape == (6, rank) and down.shape == (rank, 5)


@pytest.mark.parametrize("tensors, field", [
    ({"layer.weight.lora_up": torch.zeros(6, 2), "layer.weight.lora_down": torch.zeros(2, 4)}, "chunk.shape"),
    ({"layer.weight.lora_up": torch.zeros(5, 2), "layer.weight.lora_down": torch.zeros(2, 5)}, "chunk.shape"),
    ({"layer.weight.lora_up": torch.zeros(6, 7), "layer.weight.lora_down": torch.zeros(7, 5)}, "chunk.shape"),
    ({"layer.bias.lora_up": torch.zeros(6, 1), "layer.bias.lora_down": torch.zeros(1, 1)}, "chunk.name"),
    ({"missing.weight.lora_up": torch.zeros(6, 1)}, "chunk.name"),
    ({"layer.weight.lora_up": torch.zeros(6, 2, dtype=torch.float16),
      "layer.weight.lora_down": torch.zeros(2, 5, dtype=torch.float16)}, "chunk.dtype"),
])
def test_bad_factors_are_refused_naming_the_field(tensors, field):
    with pytest.raises(InvalidArgument) as raised:
        receive(tensors)
    assert raised.value.field == field


def test_unpaired_mixed_or_rank_mismatched_updates_are_refused():
    up, down = factor_names(W)
    with pytest.raises(InvalidArgument, match="lacks"):
        pair_factors({up: torch.zeros(6, 2)})
    with pytest.raises(InvalidArgument, match="not both"):
        pair_factors({up: torch.zeros(6, 2), down: torch.zeros(2, 5), "layer.bias": torch.zeros(6)})
    with pytest.raises(InvalidArgument, match="rank 2"):
        pair_factors({up: torch.zeros(6, 2), down: torch.zeros(3, 5)})


def test_each_adapter_update_replaces_the_last_on_top_of_the_base():
    state = model_state()
    base = state[W]
    merger = AdapterMerger()

    def apply(tensors):
        new, keep = merger.resolve(tensors, state)
        state.update(new)
        merger.applied(keep)
        return new

    first = factors(2, 1)
    apply(first)
    up, down = factor_names(W)
    torch.testing.assert_close(state[W], base + first[up] @ first[down])
    second = factors(3, 2)
    apply(second)  # replaces the first adapter: not base + first + second
    torch.testing.assert_close(state[W], base + second[up] @ second[down])

    other = factors(1, 3, "other.weight", 4, 6)
    apply(other)  # the whole adapter: layer.weight is no longer adapted, back to B
    assert state[W] is base  # the very tensor the model held, no copy kept or made


def test_a_full_update_becomes_the_base_of_later_adapters():
    state = model_state()
    merger = AdapterMerger()
    new, keep = merger.resolve(factors(2, 1), state)
    state.update(new)
    merger.applied(keep)
    replaced = torch.full((6, 5), 0.5)
    new, keep = merger.resolve({W: replaced}, state)
    assert new == {W: replaced} and keep == {}
    state.update(new)
    merger.applied(keep)
    later = factors(2, 4)
    new, _ = merger.resolve(later, state)
    up, down = factor_names(W)
    torch.testing.assert_close(new[W], replaced + later[up] @ later[down])


def test_bf16_weights_get_the_delta_rounded_once():
    state = {W: torch.randn(6, 5).to(torch.bfloat16)}
    update = {k: v.to(torch.bfloat16) for k, v in factors(2, 5).items()}
    new, _ = AdapterMerger().resolve(update, state)
    up, down = factor_names(W)
    exact = state[W].float() + update[up].float() @ update[down].float()
    assert new[W].dtype == torch.bfloat16
    assert torch.equal(new[W], exact.to(torch.bfloat16))
