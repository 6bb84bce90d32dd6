"""How a state dict travels in UpdateWeights, both ends, free of grpc and protobuf.

The sender (the trainer's publisher) walks `iter_chunks(state_dict)` and turns each `Chunk` into a
`TensorChunk` message; `UpdateSummary` gives the header's tensor_count / total_bytes and the
commit's SHA-256. The receiver (the policy server) feeds header, chunks and commit into a
`WeightAccumulator` that checks everything against its model's state dict and hands back the
complete new tensors only when all of it is consistent, so a failed or interrupted update changes
nothing (policy.proto: WeightUpdateHeader, TensorChunk, WeightUpdateCommit).

Wire format of one tensor: its raw bytes, little-endian, C order, cut into chunks of at most
CHUNK_BYTES that arrive in order (offset 0, then contiguous). Tensors follow each other one at a
time in the order of the state dict. Tied tensors (lm_head.weight sharing storage with
transformer.wte.weight) travel once, under the first name the state dict gives them.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import InvalidArgument, quote

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts would need a byte swap"

CHUNK_BYTES = 4 * 1024 * 1024  # largest TensorChunk.data (policy.proto: "At most 4 MiB per chunk")

# dtype names on the wire: torch's names without the "torch." prefix.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the TensorChunk.dtype string)."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} has no wire name; supported: {sorted(DTYPES)}")
    return DTYPE_NAMES[dtype]


def parse_dtype(name: str, field: str = "chunk.dtype") -> torch.dtype:
    """"bfloat16" -> torch.bfloat16; InvalidArgument naming `field` for an unknown name."""
    if name not in DTYPES:
        raise InvalidArgument(f"unknown dtype {quote(name)}; expected one of {sorted(DTYPES)}", field)
    return DTYPES[name]


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (C order, little-endian), without a copy when it is already
    a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # works for bfloat16 too


def unique_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without aliases: a tensor that shares its storage, offset, shape and dtype
    with an earlier one (tied weights) is dropped. This is the set a full update sends."""
    seen: set[tuple] = set()
    unique: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        key = _alias_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return unique


def aliases(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """name -> the canonical name it shares storage with (identity for unaliased names)."""
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, tensor in state_dict.items():
        out[name] = first.setdefault(_alias_key(tensor), name)
    return out


def _alias_key(tensor: torch.Tensor) -> tuple:
    if tensor.numel() == 0:
        return ("empty", id(tensor))  # empty tensors may share a null pointer without being tied
    return (tensor.device.type, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


# ---- sender ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One TensorChunk: a piece of one tensor's raw bytes."""

    name: str
    dtype: str  # wire name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # byte offset of data within the tensor's raw bytes
    data: memoryview | bytes


def iter_chunks(state_dict: Mapping[str, torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """The chunks of an update, in stream order: tensors in the state dict's order (aliases
    dropped), each cut into pieces of at most chunk_bytes. An empty tensor gives one empty chunk
    (so its name and shape still travel)."""
    if not 0 < chunk_bytes <= CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {CHUNK_BYTES}], got {chunk_bytes}")
    for name, tensor in unique_tensors(state_dict).items():
        data = tensor_bytes(tensor)
        dtype, shape = dtype_name(tensor.dtype), tuple(tensor.shape)
        if len(data) == 0:
            yield Chunk(name, dtype, shape, 0, b"")
        for offset in range(0, len(data), chunk_bytes):
            yield Chunk(name, dtype, shape, offset, data[offset : offset + chunk_bytes])


@dataclass(frozen=True)
class UpdateSummary:
    """What the header and the commit of an update carry."""

    tensor_count: int
    total_bytes: int
    sha256: str  # hex, over all chunks' data in stream order


def summarize(chunks: Iterable[Chunk]) -> UpdateSummary:
    """Header counts and commit checksum for a sequence of chunks (e.g. list(iter_chunks(sd)))."""
    digest = hashlib.sha256()
    names: set[str] = set()
    total = 0
    for chunk in chunks:
        names.add(chunk.name)
        digest.update(chunk.data)
        total += len(chunk.data)
    return UpdateSummary(len(names), total, digest.hexdigest())


def summarize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> UpdateSummary:
    """The header and commit of the update that sends this whole state dict, in one pass that
    holds no more than one chunk at a time."""
    return summarize(iter_chunks(state_dict))


# ---- receiver --------------------------------------------------------------------------------


class WeightAccumulator:
    """Collects one update and checks it against the model's state dict.

    Call header(), then chunk() for every TensorChunk, then commit(sha256) which returns the new
    tensors {canonical name: tensor} (on the CPU, the model's dtype and shape). Any violation
    raises InvalidArgument naming the field; nothing is applied by this class, so the caller
    applies only what commit() returned, and an update that is abandoned half-way changes nothing.
    Memory: one buffer per tensor received, allocated at its first chunk (bounded by the model).
    """

    def __init__(
        self,
        reference: Mapping[str, torch.Tensor],
        current_version: int,
        canonical: Mapping[str, str] | None = None,
        max_total_bytes: int | None = None,
    ):
        # reference: name -> tensor with the expected dtype and shape (meta tensors will do when
        # `canonical`, the alias map of the real state dict (see `aliases`), is given).
        self._reference = reference
        self._canonical = dict(canonical) if canonical is not None else aliases(reference)
        self._current_version = current_version
        self._max_total_bytes = max_total_bytes  # the receiver's --max-update-bytes; None: no limit
        self._max_tensor_count = len(set(self._canonical.values()))  # a subclass may accept more names
        self._target_version: int | None = None
        self._tensor_count = 0
        self._total_bytes = 0
        self._buffers: dict[str, torch.Tensor] = {}  # canonical name -> uint8 buffer (nbytes,)
        self._filled: dict[str, int] = {}  # canonical name -> bytes received so far
        self._specs: dict[str, torch.Tensor] = {}  # canonical name -> its expected dtype and shape
        self._open: str | None = None  # canonical name of the tensor being received
        self._received = 0
        self._digest = hashlib.sha256()
        self._committed = False

    @property
    def target_version(self) -> int | None:
        return self._target_version

    @property
    def bytes_received(self) -> int:
        return self._received

    def header(self, target_version: int, tensor_count: int, total_bytes: int) -> None:
        if self._target_version is not None:
            raise InvalidArgument("a second header; an update has exactly one, first", "header")
        if target_version <= self._current_version:
            raise InvalidArgument(
                f"must be greater than the current version {self._current_version}, got {target_version}",
                "header.target_version",
            )
        unique = self._max_tensor_count
        if not 1 <= tensor_count <= unique:
            raise InvalidArgument(f"must be in [1, {unique}] (the model's tensors), got {tensor_count}",
                                  "header.tensor_count")
        if total_bytes < 0:
            raise InvalidArgument(f"must be >= 0, got {total_bytes}", "header.total_bytes")
        if self._max_total_bytes is not None and total_bytes > self._max_total_bytes:
            raise InvalidArgument(f"{total_bytes} bytes; the server's limit is {self._max_total_bytes} "
                                  "(--max-update-bytes)", "header.total_bytes")
        self._target_version = target_version
        self._tensor_count = tensor_count
        self._total_bytes = total_bytes

    def chunk(self, name: str, dtype: str, shape: Iterable[int], offset: int, data: bytes | memoryview) -> None:
        if self._target_version is None:
            raise InvalidArgument("arrived before the header", "chunk")
        if self._committed:
            raise InvalidArgument("arrived after the commit", "chunk")
        shape = tuple(int(s) for s in shape)
        expected, key = self._expected(name, shape)
        if parse_dtype(dtype, "chunk.dtype") != expected.dtype:
            raise InvalidArgument(
                f"tensor {name!r} has dtype {dtype_name(expected.dtype)} in the model, got {dtype}", "chunk.dtype"
            )
        if shape != tuple(expected.shape):
            raise InvalidArgument(
                f"tensor {name!r} has shape {list(expected.shape)} in the model, got {list(shape)}", "chunk.shape"
            )
        if len(data) > CHUNK_BYTES:
            raise InvalidArgument(f"{len(data)} bytes, at most {CHUNK_BYTES} per chunk", "chunk.data")
        nbytes = tensor_nbytes(expected)
        if key != self._open:  # a new tensor starts: the previous one must be complete
            self._close_open()
            if key in self._buffers:
                raise InvalidArgument(f"tensor {name!r} sent twice (or its chunks not contiguous)", "chunk.name")
            if len(self._buffers) >= self._tensor_count:
                raise InvalidArgument(
                    f"more tensors than header.tensor_count = {self._tensor_count} (at {name!r})", "chunk.name"
                )
            self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
            self._specs[key] = expected
            self._filled[key] = 0
            self._open = key
        filled = self._filled[key]
        if offset != filled:
            raise InvalidArgument(
                f"tensor {name!r}: expected offset {filled} (chunks contiguous, in order), got {offset}", "chunk.offset"
            )
        if filled + len(data) > nbytes:
            raise InvalidArgument(
                f"tensor {name!r}: {filled + len(data)} bytes exceed its size {nbytes}", "chunk.data"
            )
        if self._received + len(data) > self._total_bytes:
            raise InvalidArgument(
                f"{self._received + len(data)} bytes exceed header.total_bytes = {self._total_bytes}", "chunk.data"
            )
        if len(data):
            self._buffers[key][filled : filled + len(data)].numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        self._filled[key] = filled + len(data)
        self._received += len(data)
        self._digest.update(data)

    def commit(self, sha256: str) -> dict[str, torch.Tensor]:
        """Check the totals, the checksum and that every floating-point value is finite; return
        {canonical name: new tensor}. A NaN or inf would make every later forward produce NaN, so
        such an update is refused whole (docs/design.md, "Weights wire format")."""
        if self._target_version is None:
            raise InvalidArgument("arrived before the header", "commit")
        if self._committed:
            raise InvalidArgument("a second commit", "commit")
        self._close_open()
        if len(self._buffers) != self._tensor_count:
            raise InvalidArgument(
                f"{len(self._buffers)} tensors received, header.tensor_count says {self._tensor_count}",
                "header.tensor_count",
            )
        if self._received != self._total_bytes:
            raise InvalidArgument(
                f"{self._received} bytes received, header.total_bytes says {self._total_bytes}", "header.total_bytes"
            )
        actual = self._digest.hexdigest()
        if sha256.strip().lower() != actual:
            raise InvalidArgument(f"checksum mismatch: got {quote(sha256)}, data hashes to {actual}", "commit.sha256")
        tensors = {}
        for key, buffer in self._buffers.items():
            expected = self._specs[key]
            tensor = buffer.view(expected.dtype).reshape(expected.shape)  # (shape of the model's tensor)
            if tensor.is_floating_point():
                finite = torch.isfinite(tensor)
                if not bool(finite.all()):
                    bad = tensor.numel() - int(finite.sum())
                    raise InvalidArgument(f"tensor {key} holds {bad} values that are not finite (NaN or inf) "
                                          f"of {tensor.numel()}; nothing was changed", "chunk.data")
            tensors[key] = tensor
        self._committed = True
        return tensors

    def _expected(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
        """(a tensor with the dtype and shape `name` must have, the name it is stored under);
        InvalidArgument for a name the model does not have. `shape` is what the chunk says (a
        subclass that accepts tensors of free shape, like LoRA factors, checks it here)."""
        if name not in self._reference:
            raise InvalidArgument(f"unknown tensor {quote(name)} (not in the model's state dict)", "chunk.name")
        return self._reference[name], self._canonical[name]

    def _close_open(self) -> None:
        if self._open is None:
            return
        nbytes = tensor_nbytes(self._specs[self._open])
        if self._filled[self._open] != nbytes:
            raise InvalidArgument(
                f"tensor {self._open!r} incomplete: {self._filled[self._open]} of {nbytes} bytes before the next part",
                "chunk.data",
            )
        self._open = None


def receive(
    reference: Mapping[str, torch.Tensor],
    current_version: int,
    target_version: int,
    chunks: Iterable[Chunk],
    sha256: str,
    tensor_count: int | None = None,
    total_bytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """One-call receiver for in-process use and tests: header, chunks, commit."""
    chunks = list(chunks)
    if tensor_count is None or total_bytes is None:
        summary = summarize(chunks)
        tensor_count = summary.tensor_count if tensor_count is None else tensor_count
        total_bytes = summary.total_bytes if total_bytes is None else total_bytes
    acc = WeightAccumulator(reference, current_version)
    acc.header(target_version, tensor_count, total_bytes)
    for c in chunks:
        acc.chunk(c.name, c.dtype, c.shape, c.offset, c.data)
    return acc.commit(sha256)
