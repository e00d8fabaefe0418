"""The one update type: a layout over a contiguous float32 vector.

A :class:`Layout` names every tensor of a model's ``state_dict`` that travels
(floating-point parameters and floating-point buffers such as BatchNorm running
statistics), with its shape and its offset in one flat ``float32`` vector of
length ``d``. Updates are that vector; a round's updates are an ``[n, d]`` matrix
whose column slices are the layers (zero-copy views).

Integer buffers (``num_batches_tracked``) never travel: they carry no learned
information and cannot be averaged.

torch is imported only by the methods that touch tensors, so that an idle node
can parse its layout (``from_json``, ``hash``) without loading torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerSpec:
    """One named tensor of the model inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    is_buffer: bool = False

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


@dataclass(frozen=True)
class Layout:
    """Ordered layers of a flat float32 update vector of length ``d``."""

    layers: tuple[LayerSpec, ...]

    @property
    def d(self) -> int:
        return self.layers[-1].offset + self.layers[-1].numel if self.layers else 0

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerSpec]:
        return iter(self.layers)

    def slices(self) -> list[slice]:
        """Column slices of each layer, in order."""
        return [layer.slice for layer in self.layers]

    @classmethod
    def from_shapes(cls, named_shapes: list[tuple[str, tuple[int, ...]]], buffers: frozenset[str] = frozenset()) -> "Layout":
        layers, offset = [], 0
        for name, shape in named_shapes:
            numel = 1
            for s in shape:
                numel *= int(s)
            layers.append(LayerSpec(name, tuple(int(s) for s in shape), offset, numel, name in buffers))
            offset += numel
        return cls(tuple(layers))

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "Layout":
        """Layout of every floating-point tensor in ``module.state_dict()``."""
        buffer_names = frozenset(name for name, _ in module.named_buffers())
        named = [
            (name, tuple(t.shape))
            for name, t in module.state_dict().items()
            if t.is_floating_point()
        ]
        return cls.from_shapes(named, buffer_names)

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the layout's tensors of ``state`` into one float32 vector."""
        import torch

        return torch.cat([state[layer.name].detach().reshape(-1).to(torch.float32) for layer in self.layers]) if self.layers else torch.zeros(0)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``vector`` shaped as the layout's tensors."""
        if vector.numel() != self.d:
            raise ValueError(f"vector has {vector.numel()} elements, layout needs {self.d}")
        return {layer.name: vector[layer.slice].view(layer.shape) for layer in self.layers}

    def load_into(self, module: torch.nn.Module, vector: torch.Tensor) -> None:
        """Copy ``vector`` into the module's parameters and float buffers in place."""
        import torch

        state = module.state_dict()
        with torch.no_grad():
            for name, value in self.unflatten(vector).items():
                state[name].copy_(value.to(state[name].dtype))

    def to_json(self) -> str:
        return json.dumps([[l.name, list(l.shape), l.is_buffer] for l in self.layers], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        rows = json.loads(text)
        return cls.from_shapes([(r[0], tuple(r[1])) for r in rows], frozenset(r[0] for r in rows if r[2]))

    def hash(self) -> str:
        """Stable digest of names, shapes and order: both sides must agree on it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
