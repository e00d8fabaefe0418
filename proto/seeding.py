"""One way to turn ``(seed, round, role, ...)`` into randomness.

Every seeded draw of a run (the coordinator's selection and defense, a node's
local training, a Byzantine node's schedule, drop-out, poisoning and attack, an
attack schedule's per-round coin) comes from :func:`derive_seed` over a tuple
of parts that names what the draw is for: ``derive_seed(seed, "train", round,
node_name)``. The seed is the first 63 bits of the SHA-256 of the parts'
canonical JSON, so it is stable across processes, machines and Python versions
(no ``hash()`` randomisation), nearby inputs give unrelated seeds, and two
purposes never share a stream as long as their parts differ.

torch is imported only by :func:`generator`, so an idle node can derive seeds
without loading it.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_MASK63 = (1 << 63) - 1


def canonical(parts: tuple[Any, ...]) -> bytes:
    """The canonical JSON bytes of ``parts`` (ints, strings, floats, bools, None and lists/tables of them)."""
    try:
        return json.dumps(parts, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"derive_seed: parts must be JSON values (int, str, float, bool, None, list, dict), "
                        f"got {parts!r}: {exc}") from None


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed (``0 <= seed < 2**63``) from any tuple of JSON values, stable across processes."""
    digest = hashlib.sha256(canonical(parts)).digest()
    return (int.from_bytes(digest[:8], "little") >> 1) & _MASK63


def generator(*parts: Any, device: Any = "cpu") -> "torch.Generator":
    """A fresh ``torch.Generator`` on ``device`` seeded with ``derive_seed(*parts)``."""
    import torch

    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


__all__ = ["derive_seed", "generator", "canonical"]
