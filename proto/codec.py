"""Wire codec: tensors <-> chunked raw bytes, with a CRC-32 and strict checks.

The only module besides the servicer and the node's client that touches the
generated message types. Tensors are float32, little-endian, flat; no pickle.

torch is imported inside the functions that return or take tensors: an idle
node decodes nothing and must not pay torch's ~200 MB for importing this module
(``decode_array`` is the torch-free path).
"""
from __future__ import annotations

import sys
import zlib
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from proto.byzfed.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    import torch

DEFAULT_CHUNK_BYTES = 1 << 20
FLOAT32 = "float32"
# gRPC's own message cap on both sides: a chunk plus its framing fits with room.
MAX_MESSAGE_BYTES = 8 << 20

assert sys.byteorder == "little", "byzfed's wire format is little-endian"


class CodecError(ValueError):
    """A tensor stream broke a rule of the wire format. ``reason`` names which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy little-endian float32 view of a CPU tensor's storage."""
    import torch

    t = t.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    return memoryview(t.numpy()).cast("B")


def crc32(buf) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


def tensor_header(buf: memoryview, shape: tuple[int, ...]) -> pb.TensorHeader:
    return pb.TensorHeader(dtype=FLOAT32, num_bytes=len(buf), crc32=crc32(buf), shape=list(shape))


def iter_chunks(buf: memoryview, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    for start in range(0, len(buf), chunk_bytes):
        yield bytes(buf[start:start + chunk_bytes])


class Assembler:
    """Collects chunks of one declared tensor into a preallocated buffer.

    Refuses (``CodecError``) a wrong dtype, a byte count that disagrees with the
    expectation, more bytes than declared, too few bytes, or a CRC mismatch —
    before anything is handed on.

    ``writer(offset, data)``: where the bytes go instead of the assembler's own
    buffer (the orchestrator decodes straight into the round's row store); then
    :meth:`check` verifies the stream and nothing is returned."""

    def __init__(self, header: pb.TensorHeader, expected_bytes: int | None = None,
                 writer: Callable[[int, bytes], None] | None = None) -> None:
        if header.dtype != FLOAT32:
            raise CodecError("dtype", f"dtype {header.dtype!r} is not allowed; expected 'float32'")
        if header.num_bytes <= 0 or header.num_bytes % 4:
            raise CodecError("size", f"declared byte count {header.num_bytes} is not a positive multiple of 4")
        if expected_bytes is not None and header.num_bytes != expected_bytes:
            raise CodecError("size", f"declared {header.num_bytes} bytes but the model layout needs {expected_bytes}")
        self.header = header
        self._writer = writer
        self.buffer = bytearray(header.num_bytes if writer is None else 0)
        self._view = memoryview(self.buffer)
        self.received = 0
        self._crc = 0  # running CRC: computed while later chunks are still on the wire

    def add(self, data: bytes) -> None:
        end = self.received + len(data)
        if end > self.header.num_bytes:
            raise CodecError("oversized", f"stream carries more than the declared {self.header.num_bytes} bytes")
        if self._writer is None:
            self._view[self.received:end] = data
        else:
            self._writer(self.received, data)
        self._crc = zlib.crc32(data, self._crc)
        self.received = end

    def check(self) -> None:
        """Refuse a short stream or a CRC mismatch."""
        if self.received != self.header.num_bytes:
            raise CodecError("truncated", f"stream ended after {self.received} of {self.header.num_bytes} declared bytes")
        if self._crc != self.header.crc32:
            raise CodecError("checksum", "CRC-32 of the received bytes does not match the header")

    def finish_array(self) -> np.ndarray:
        """The checked float32 vector as a numpy array (no torch needed)."""
        self.check()
        return np.frombuffer(self.buffer, dtype="<f4")

    def finish(self) -> torch.Tensor:
        import torch

        self.finish_array()  # the checks
        return torch.frombuffer(self.buffer, dtype=torch.float32)


def decode_stream(header: pb.TensorHeader, chunks: Iterable[bytes], expected_bytes: int | None = None) -> torch.Tensor:
    asm = Assembler(header, expected_bytes)
    for data in chunks:
        asm.add(data)
    return asm.finish()


def decode_array(header: pb.TensorHeader, chunks: Iterable[bytes], expected_bytes: int | None = None) -> np.ndarray:
    """As :func:`decode_stream`, into a numpy float32 array (torch-free)."""
    asm = Assembler(header, expected_bytes)
    for data in chunks:
        asm.add(data)
    return asm.finish_array()


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf entries (numpy's SIMD path: ~25x faster than torch.isfinite on CPU)."""
    if t.device.type != "cpu":
        import torch

        return int((~torch.isfinite(t)).sum())
    finite = np.isfinite(t.numpy())
    return 0 if finite.all() else int(finite.size - finite.sum())
