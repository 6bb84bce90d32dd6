"""common/weights.py: the UpdateWeights wire format, both ends, in-process."""

from __future__ import annotations

import hashlib

import pytest
import torch

from common.errors import InvalidArgument
from common.weights import (
    CHUNK_BYTES,
    DTYPES,
    WeightAccumulator,
    aliases,
    dtype_name,
    iter_chunks,
    parse_dtype,
    receive,
    summarize,
    unique_tensors,
)


def tied_state_dict(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small state dict shaped like a GPT-2's: a tied embedding, odd sizes, a scalar."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(37, 8, generator=g).to(dtype)
    return {
        "wte.weight": emb,
        "h.0.weight": torch.randn(8, 24, generator=g).to(dtype),
        "h.0.bias": torch.randn(24, generator=g).to(dtype),
        "scale": torch.randn((), generator=g).to(dtype),
        "lm_head.weight": emb,  # tied: same storage
    }


def perturbed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {name: t.clone() + 1 for name, t in sd.items() if name != "lm_head.weight"}
    out["lm_head.weight"] = out["wte.weight"]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("chunk_bytes", [7, 64, CHUNK_BYTES])
def test_roundtrip(dtype, chunk_bytes):
    reference = tied_state_dict(dtype)
    new = perturbed(reference)
    chunks = list(iter_chunks(new, chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert {c.name for c in chunks} == {"wte.weight", "h.0.weight", "h.0.bias", "scale"}  # tied sent once
    summary = summarize(chunks)
    expected_bytes = sum(t.numel() * t.element_size() for n, t in new.items() if n != "lm_head.weight")
    assert summary.total_bytes == expected_bytes
    assert summary.sha256 == hashlib.sha256(b"".join(bytes(c.data) for c in chunks)).hexdigest()
    out = receive(reference, 0, 1, chunks, summary.sha256)
    assert set(out) == {"wte.weight", "h.0.weight", "h.0.bias", "scale"}
    for name, tensor in out.items():
        assert tensor.dtype == dtype and tensor.shape == reference[name].shape
        assert torch.equal(tensor, new[name])


def test_subset_and_alias_name():
    reference = tied_state_dict()
    new = {"lm_head.weight": reference["wte.weight"] * 2}  # the alias name lands on the canonical one
    chunks = list(iter_chunks(new, 100))
    out = receive(reference, 3, 4, chunks, summarize(chunks).sha256)
    assert list(out) == ["wte.weight"] and torch.equal(out["wte.weight"], reference["wte.weight"] * 2)
    assert aliases(reference)["lm_head.weight"] == "wte.weight"
    assert list(unique_tensors(reference)) == ["wte.weight", "h.0.weight", "h.0.bias", "scale"]


def test_dtype_names():
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name and parse_dtype(name) == dtype
    with pytest.raises(InvalidArgument, match="chunk.dtype"):
        parse_dtype("float8")


def send(acc: WeightAccumulator, chunks) -> None:
    for c in chunks:
        acc.chunk(c.name, c.dtype, c.shape, c.offset, c.data)


def corrupt(kind: str, chunks: list) -> tuple[list, str]:
    """Returns (chunks to send, field the error must name)."""
    c0 = chunks[0]
    if kind == "unknown_name":
        return [type(c0)("nope.weight", c0.dtype, c0.shape, 0, c0.data), *chunks[1:]], "chunk.name"
    if kind == "wrong_shape":
        return [type(c0)(c0.name, c0.dtype, (c0.shape[0] + 1, *c0.shape[1:]), 0, c0.data), *chunks[1:]], "chunk.shape"
    if kind == "wrong_dtype":
        return [type(c0)(c0.name, "float16", c0.shape, 0, c0.data), *chunks[1:]], "chunk.dtype"
    if kind == "gap":
        return [chunks[0], chunks[2], *chunks[3:]], "chunk.offset"
    if kind == "truncated_tensor":  # the next tensor starts before the first is complete
        first = [c for c in chunks if c.name == c0.name]
        rest = [c for c in chunks if c.name != c0.name]
        return [*first[:-1], *rest], "chunk.data"
    if kind == "duplicate":
        return [*chunks, chunks[0]], "chunk.name"
    if kind == "oversized":
        return [type(c0)(c0.name, c0.dtype, c0.shape, 0, bytes(CHUNK_BYTES + 1))], "chunk.data"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["unknown_name", "wrong_shape", "wrong_dtype", "gap", "truncated_tensor", "duplicate", "oversized"]
)
def test_bad_chunks_name_the_field(kind):
    reference = tied_state_dict()
    chunks = list(iter_chunks(perturbed(reference), 64))
    summary = summarize(chunks)
    bad, field = corrupt(kind, chunks)
    acc = WeightAccumulator(reference, 0)
    acc.header(1, summary.tensor_count, summary.total_bytes)
    with pytest.raises(InvalidArgument) as err:
        send(acc, bad)
        acc.commit(summary.sha256)
    assert err.value.field == field, str(err.value)


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(sha256="0" * 64), "commit.sha256"),
        (dict(tensor_count=3), "chunk.name"),  # the 4th tensor exceeds the header's count
        (dict(tensor_count=4, total_bytes=10), "chunk.data"),
        (dict(total_bytes=10**9), "header.total_bytes"),
        (dict(target_version=0), "header.target_version"),
        (dict(tensor_count=0), "header.tensor_count"),
        (dict(tensor_count=99), "header.tensor_count"),
    ],
)
def test_bad_header_or_commit(change, field):
    reference = tied_state_dict()
    chunks = list(iter_chunks(perturbed(reference), 64))
    s = summarize(chunks)
    args = dict(target_version=1, tensor_count=s.tensor_count, total_bytes=s.total_bytes, sha256=s.sha256) | change
    acc = WeightAccumulator(reference, 0)
    with pytest.raises(InvalidArgument) as err:
        acc.header(args["target_version"], args["tensor_count"], args["total_bytes"])
        send(acc, chunks)
        acc.commit(args["sha256"])
    assert err.value.field == field, str(err.value)


def test_checksum_covers_data_order():
    """Two chunks swapped between tensors of equal size keep the totals but change the hash."""
    reference = {"a": torch.zeros(4), "b": torch.zeros(4)}
    new = {"a": torch.arange(4.0), "b": torch.arange(4.0) + 10}
    chunks = list(iter_chunks(new))
    good = summarize(chunks).sha256
    swapped = [type(chunks[0])("a", "float32", (4,), 0, chunks[1].data),
               type(chunks[0])("b", "float32", (4,), 0, chunks[0].data)]
    with pytest.raises(InvalidArgument, match="commit.sha256"):
        receive(reference, 0, 1, swapped, good)


def test_incomplete_commit_and_order():
    reference = tied_state_dict()
    new = perturbed(reference)
    del new["scale"]  # the last tensor sent is then h.0.bias, two chunks of 64 bytes
    chunks = list(iter_chunks(new, 64))
    assert chunks[-1].name == chunks[-2].name == "h.0.bias"
    s = summarize(chunks)
    acc = WeightAccumulator(reference, 0)
    with pytest.raises(InvalidArgument, match="chunk"):
        send(acc, chunks[:1])  # before the header
    acc.header(1, s.tensor_count, s.total_bytes)
    send(acc, chunks[:-1])
    with pytest.raises(InvalidArgument, match="incomplete"):
        acc.commit(s.sha256)
