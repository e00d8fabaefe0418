"""Shared types of the attack library: knowledge levels, the attack context, the
two attack protocols, config validation helpers and the benign-statistics helpers.

Rows are **deltas** (local weights minus global weights; the model moves by
``+delta``), never gradients: the honest direction is the mean delta, and every
attack here is written in those terms.

This package is pure torch/numpy. It imports nothing of ``fednode`` or
``orchestrator`` and, of ``proto``, only the dependency-free ``proto.registry`` and
``proto.seeding``; callers inject what an attack needs (the layout's column slices,
the defense rule as a callable) through :class:`AttackContext`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Protocol, get_args, runtime_checkable

import torch
from torch import Tensor

from proto.registry import fields_of

Knowledge = Literal["nothing", "own", "colluders", "omniscient"]
"""What an attacker may read in a round.

``nothing``: no benign update at all; ``own``: its own benign delta;
``colluders``: the benign deltas of its collusion group, its own included;
``omniscient``: the round's honest updates.
"""
KNOWLEDGE_LEVELS: tuple[str, ...] = get_args(Knowledge)

Kind = Literal["data", "update", "wire"]
"""``data``: poisons the training set before local training; ``update``: crafts
the delta after local training; ``wire``: corrupts the upload itself (the node's
uploader implements the corruption; the attack only names it)."""


@dataclass(kw_only=True)
class AttackContext:
    """Everything an update attack may read in one round.

    The caller fills only what the node's knowledge level allows; an attack whose
    requirements are not met raises a ``ValueError`` naming the missing field.

    Fields:
        n: participants this round (honest and Byzantine).
        f: Byzantine participants among them.
        generator: the node's seeded generator (seeded from ``(seed, round, role)``).
        own: ``[d]`` the node's own benign delta.
        colluders: ``[k, d]`` benign deltas of its collusion group, its own included.
        honest: ``[h, d]`` the round's honest updates (omniscient attacker).
        slices: column slices of the layers in the flat vector.
        round: the round number.
        global_weights: ``[d]`` the global weights the round started from.
        aggregate: the defense rule, ``[m, d] -> [d]``, for rule-aware attacks.
    """

    n: int
    f: int
    generator: torch.Generator
    own: Tensor | None = None
    colluders: Tensor | None = None
    honest: Tensor | None = None
    slices: list[slice] | None = None
    round: int = 0
    global_weights: Tensor | None = None
    aggregate: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"AttackContext.n={self.n}: must be >= 1")
        if not 0 <= self.f <= self.n:
            raise ValueError(f"AttackContext.f={self.f}: must be in [0, n={self.n}]")
        dims = {}
        for name, ndim in (("own", 1), ("global_weights", 1), ("colluders", 2), ("honest", 2)):
            t = getattr(self, name)
            if t is None:
                continue
            if t.dim() != ndim:
                raise ValueError(f"AttackContext.{name}: expected {ndim}-D, got shape {tuple(t.shape)}")
            if ndim == 2 and t.shape[0] == 0:
                raise ValueError(f"AttackContext.{name}: needs at least one row")
            dims[name] = t.shape[-1]
        if len(set(dims.values())) > 1:
            raise ValueError(f"AttackContext: inconsistent d across fields: {dims}")
        if self.slices is not None and dims:
            d = next(iter(dims.values()))
            for i, sl in enumerate(self.slices):
                ok = (isinstance(sl, slice) and sl.step in (None, 1) and isinstance(sl.start, int)
                      and isinstance(sl.stop, int) and 0 <= sl.start <= sl.stop <= d)
                if not ok:
                    raise ValueError(f"AttackContext.slices[{i}]={sl}: not a column range of d={d}")

    @property
    def dim(self) -> int:
        """The parameter count ``d``, read from whichever tensor field is set."""
        for name in ("own", "global_weights", "colluders", "honest"):
            t = getattr(self, name)
            if t is not None:
                return int(t.shape[-1])
        raise ValueError("AttackContext: the model size d is unknown: own, global_weights, colluders and honest are all None")

    @property
    def device(self) -> torch.device:
        for name in ("own", "global_weights", "colluders", "honest"):
            t = getattr(self, name)
            if t is not None:
                return t.device
        return self.generator.device


@runtime_checkable
class DataAttack(Protocol):
    """Poisons a node's training data before local training."""

    kind: ClassVar[Kind]
    needs: ClassVar[Knowledge]
    needs_defense: ClassVar[bool]

    def poison(self, x: Tensor, y: Tensor, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class UpdateAttack(Protocol):
    """Crafts the delta a Byzantine node uploads."""

    kind: ClassVar[Kind]
    needs: ClassVar[Knowledge]
    needs_defense: ClassVar[bool]

    def craft(self, ctx: AttackContext) -> Tensor: ...


# --------------------------------------------------------------------------- requirements

_KNOWLEDGE_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "nothing": ((), ""),
    "own": (("own",), "ctx.own (its own benign delta)"),
    "colluders": (("colluders", "honest"), "ctx.colluders (benign deltas of its collusion group) or ctx.honest"),
    "omniscient": (("honest",), "ctx.honest (the round's honest updates)"),
}


def missing_requirements(attack: Any, ctx: AttackContext) -> list[str]:
    """What ``ctx`` lacks for ``attack`` (its ``needs``, ``needs_defense``, ``requires``)."""
    missing = []
    fields_, text = _KNOWLEDGE_FIELDS[attack.needs]
    if fields_ and all(getattr(ctx, name) is None for name in fields_):
        missing.append(text)
    if getattr(attack, "needs_defense", False) and ctx.aggregate is None:
        missing.append("ctx.aggregate (the defense rule)")
    for name in getattr(attack, "requires", ()):
        if getattr(ctx, name) is None:
            missing.append(f"ctx.{name}")
    return missing


def check_requirements(attack: Any, ctx: AttackContext) -> None:
    """Raise ``ValueError`` naming every missing input of ``attack``."""
    missing = missing_requirements(attack, ctx)
    if missing:
        name = getattr(attack, "name", type(attack).__name__)
        raise ValueError(f"attack {name!r} (needs {attack.needs!r}) is missing: {'; '.join(missing)}")


# --------------------------------------------------------------------------- benign statistics

def reference_stats(ctx: AttackContext) -> Tensor:
    """The benign updates ``[m, d]`` the attacker may use to estimate honest statistics.

    ``ctx.honest`` when set (omniscient), else ``ctx.colluders``, else ``ctx.own[None]``.
    A non-omniscient attacker thus estimates the honest mean/std from its colluders.
    """
    for rows in (ctx.honest, ctx.colluders):
        if rows is not None:
            return rows
    if ctx.own is not None:
        return ctx.own[None]
    raise ValueError("reference_stats: no benign update available (honest, colluders and own are None)")


def mean_std(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-coordinate mean and (unbiased) std of ``rows``; std is 0 for a single row."""
    mu = rows.mean(dim=0)
    if rows.shape[0] < 2:
        return mu, torch.zeros_like(mu)
    return mu, rows.std(dim=0, correction=1)


def layer_spread(row: Tensor, slices: list[slice] | None) -> Tensor:
    """A per-coordinate spread guessed from ONE benign row: in each layer (``slices``;
    the whole vector when None), the std of that layer's coordinates around the layer
    mean, broadcast to the layer's coordinates. A crude stand-in for the client-to-client
    std that one row cannot show (used only when fewer than two benign rows are known)."""
    row = row.float()
    out = torch.zeros_like(row)
    for sl in (slices or [slice(0, row.shape[0])]):
        part = row[sl]
        if part.numel() > 1:
            out[sl] = part.std(correction=1)
    return out


def benign_mean_spread(rows: Tensor, slices: list[slice] | None = None) -> tuple[Tensor, Tensor]:
    """``(mu, sigma)`` of the known benign rows: :func:`mean_std` with two rows or more;
    with one row, the row and its :func:`layer_spread` (so that sigma is never all zero)."""
    rows = rows.float()
    if rows.shape[0] >= 2:
        return mean_std(rows)
    return rows[0].clone(), layer_spread(rows[0], slices)


def _fill_generator(reference: Tensor, round_: int) -> torch.Generator:
    """A generator seeded from the known rows' bytes and the round: every colluder that
    holds the same rows draws the same fill (so the group still crafts one row)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(round_).to_bytes(8, "little", signed=True))
    h.update(reference.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class SimulatedHonest:
    """The honest part of the matrix a rule-aware attacker simulates (see :func:`simulated_honest`).

    rows: ``[max(k, n - f), d]``, the ``k`` known benign rows first (none when ``k = 1`` and
    rows are missing: see :func:`simulated_honest`), then ``filled`` synthetic ones; mu,
    sigma: the known rows' mean and spread (:func:`benign_mean_spread`)."""

    rows: Tensor
    mu: Tensor
    sigma: Tensor
    filled: int


def simulated_honest(ctx: AttackContext) -> SimulatedHonest:
    """The honest rows of the round as the attacker can best reconstruct them.

    The real server sees ``n - f`` honest rows next to the ``f`` Byzantine ones. An
    omniscient attacker knows them all (``ctx.honest``); colluders know only their own
    ``k`` benign deltas, often fewer than ``n - f`` (and, with one node, ``k = 1``), so a
    rule simulated on ``[k rows; f copies]`` may refuse the matrix (Krum needs
    ``m >= 2f + 3``, Bulyan ``m >= 4f + 3``, trimmed mean ``m > 2f``) or decide on a
    matrix unlike the real one. APPROXIMATION: when fewer than ``n - f`` rows are known,
    the missing ``n - f - k`` rows are drawn as ``mu + sigma * N(0, 1)`` per coordinate
    (Gaussian around the known rows' mean with their spread; with one known row the
    spread is its :func:`layer_spread`), from a generator seeded by the known rows and
    the round, so the simulated matrix has the real round's size ``n``. With one known
    row that row IS the mean estimate, the centre of the draws, not a sample like them (a
    distance rule such as Krum would always pick it), so then all ``n - f`` rows are drawn."""
    reference = reference_stats(ctx).float()
    mu, sigma = benign_mean_spread(reference, ctx.slices)
    need = int(ctx.n) - int(ctx.f)
    k = reference.shape[0]
    if k >= need:
        return SimulatedHonest(reference, mu, sigma, 0)
    keep = reference if k >= 2 else reference[:0]
    draws = need - keep.shape[0]
    g = _fill_generator(reference, ctx.round)
    noise = torch.randn((draws, reference.shape[1]), generator=g, dtype=torch.float32).to(reference.device)
    rows = torch.cat([keep, mu[None] + sigma[None] * noise], dim=0)
    return SimulatedHonest(rows, mu, sigma, draws)


def with_copies(reference: Tensor, row: Tensor, f: int) -> Tensor:
    """The matrix a rule would see: ``[reference rows; f copies of row]`` (f >= 1)."""
    f = max(int(f), 1)
    return torch.cat([reference.to(row.dtype), row[None].expand(f, -1)], dim=0)


def randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal float32 drawn on the generator's device, then moved."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 drawn on the generator's device, then moved."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


# --------------------------------------------------------------------------- base classes

class UpdateAttackBase:
    """Template for update attacks: checks requirements, runs ``_craft``, checks the result.

    Subclasses set ``name``, ``needs`` (and ``needs_defense``/``requires``) and
    implement ``_craft(ctx) -> Tensor[d]``.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind] = "update"
    needs: ClassVar[Knowledge]
    needs_defense: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    def craft(self, ctx: AttackContext) -> Tensor:
        check_requirements(self, ctx)
        out = self._craft(ctx)
        d = ctx.dim
        if tuple(out.shape) != (d,):
            raise RuntimeError(f"attack {self.name!r} produced shape {tuple(out.shape)}, expected ({d},)")
        return out.to(torch.float32).contiguous()

    def _craft(self, ctx: AttackContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class DataAttackBase:
    """Template for data poisoning attacks (``poison`` is the whole interface)."""

    name: ClassVar[str]
    kind: ClassVar[Kind] = "data"
    needs: ClassVar[Knowledge] = "nothing"
    needs_defense: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


# --------------------------------------------------------------------------- config validation

def check_number(config: Any, key: str, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False, integer: bool = False,
                 optional: bool = False) -> None:
    """Validate numeric field ``key`` of a frozen config; coerce ints to float for float fields.

    Raises ``ValueError`` naming the key. Call from ``__post_init__``.
    """
    value = getattr(config, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}={value!r}: must be {'an integer' if integer else 'a number'}")
    if integer and not isinstance(value, int):
        if not float(value).is_integer():
            raise ValueError(f"{key}={value!r}: must be an integer")
        value = int(value)
    if not integer:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{key}={value!r}: must be finite")
    object.__setattr__(config, key, value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{key}={value!r}: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{key}={value!r}: must be {'<' if hi_open else '<='} {hi}")


def check_choice(config: Any, key: str, choices: tuple[str, ...]) -> None:
    """Validate that field ``key`` is one of ``choices``; raises ``ValueError`` naming the key."""
    value = getattr(config, key)
    if value not in choices:
        raise ValueError(f"{key}={value!r}: must be one of {', '.join(map(repr, choices))}")


def config_params(config_cls: type) -> list[tuple[str, str, Any]]:
    """``(name, type, default)`` of each field of a config dataclass (``dataclasses.MISSING`` when required)."""
    return fields_of(config_cls, missing=dataclasses.MISSING)
