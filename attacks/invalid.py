"""Invalid uploads: non-finite values (caught by the ingest's finiteness check or
not, depending on the defense) and malformed wire messages (caught by the codec)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import AttackContext, UpdateAttackBase, check_choice, check_number

NONFINITE_MODES: tuple[str, ...] = ("nan", "inf", "-inf")
MALFORMED_MODES: tuple[str, ...] = (
    "bad_checksum", "wrong_size", "wrong_dtype", "wrong_round", "wrong_layout", "bad_token", "duplicate",
)


@dataclass(frozen=True, kw_only=True)
class NonFiniteConfig:
    """mode: 'nan', 'inf' or '-inf'; fraction: share of coordinates set to it (> 0)."""

    mode: str = "nan"
    fraction: float = 1.0

    def __post_init__(self) -> None:
        check_choice(self, "mode", NONFINITE_MODES)
        check_number(self, "fraction", lo=0.0, hi=1.0, lo_open=True)


class NonFinite(UpdateAttackBase):
    """Non-finite update: ``round(fraction * d)`` coordinates (at least one, chosen with
    the generator) of the own delta (zeros if unknown) become NaN, +inf or -inf.
    The output is non-finite by design."""

    name = "nonfinite"
    needs = "nothing"

    def __init__(self, config: NonFiniteConfig) -> None:
        super().__init__(config)

    def _craft(self, ctx: AttackContext) -> Tensor:
        d = ctx.dim
        out = ctx.own.float().clone() if ctx.own is not None else torch.zeros(d, device=ctx.device)
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[self.config.mode]
        k = max(1, int(round(self.config.fraction * d)))
        if k >= d:
            return out.fill_(value)
        idx = torch.randperm(d, generator=ctx.generator, device=ctx.generator.device)[:k]
        out[idx.to(out.device)] = value
        return out


@dataclass(frozen=True, kw_only=True)
class MalformedConfig:
    """mode: which corruption the node's uploader applies, one of MALFORMED_MODES."""

    mode: str = "bad_checksum"

    def __post_init__(self) -> None:
        check_choice(self, "mode", MALFORMED_MODES)


class Malformed(UpdateAttackBase):
    """Malformed upload (kind ``wire``): the node's uploader corrupts the message as
    ``mode`` says (bad checksum, wrong size/dtype/round/layout, bad session token,
    duplicate upload). There are no maths here; ``craft`` returns the own delta
    unchanged for the uploader to wrap."""

    name = "malformed"
    kind = "wire"
    needs = "own"

    def __init__(self, config: MalformedConfig) -> None:
        super().__init__(config)

    @property
    def mode(self) -> str:
        return self.config.mode

    def _craft(self, ctx: AttackContext) -> Tensor:
        return ctx.own
