"""Rule-aware ("optimal") ALIE and IPM: the scale (z for ALIE, epsilon for IPM) is
chosen each round against the actual defense rule, in the spirit of the
AGR-tailored attacks of Shejwalkar & Houmansadr (NDSS 2021) and the optimised
ALIE/IPM of Allouah et al. (AISTATS 2023).

The attacker simulates the server: it builds ``[benign reference rows; f copies of
the crafted row]``, runs the injected rule ``ctx.aggregate`` on it, and scores the
result against the benign mean ``mu``:

* ALIE maximises the deviation ``||aggregate - mu||``;
* IPM minimises the inner product ``<aggregate, mu>``.

Both use the one search routine :func:`search_scale`.

Without the omniscient view (knowledge ``colluders``), the attacker knows only its
group's ``k`` benign deltas, usually fewer than the round's ``n - f`` honest rows, and
``[k rows; f copies]`` is often a matrix the rule refuses (Krum: ``m >= 2f + 3``,
Bulyan: ``m >= 4f + 3``, trimmed mean: ``m > 2f``), which left the node with nothing to
upload. APPROXIMATION (:func:`attacks.base.simulated_honest`): the missing
``n - f - k`` honest rows are drawn as ``mu + sigma * N(0, 1)`` around the known rows'
mean ``mu`` with their per-coordinate spread ``sigma`` (one known row: its per-layer
coordinate std), seeded by the known rows and the round so colluders agree, and the
rule runs on a matrix of the real round's size ``n``. The crafted row itself is built
from the known rows' ``mu`` and ``sigma`` only. If the rule still refuses the matrix
(``n`` unknown to the node), the attack falls back to its plain scale (ALIE's default z,
IPM's epsilon = 0.1) and records why in ``last_fallback`` instead of failing.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from .base import AttackContext, UpdateAttackBase, check_number, simulated_honest, with_copies
from .statistical import alie_default_z

log = logging.getLogger(__name__)

_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def search_scale(objective: Callable[[float], float], lo: float, hi: float, *, grid: int = 11,
                 refine: int = 12, extra: Iterable[float] = ()) -> tuple[float, float]:
    """Maximise ``objective`` over the scale in ``[lo, hi]``.

    Evaluates a uniform grid of ``grid`` points plus the ``extra`` candidates, then
    runs ``refine`` golden-section steps inside the two grid cells around the best
    grid point. Non-finite objective values count as ``-inf``. Returns the best
    ``(scale, value)`` evaluated, so the result is never worse than any grid point
    or extra candidate. Cost: ``grid + len(extra) + refine + 2`` evaluations.
    """
    best = (lo, -math.inf)

    def ev(s: float) -> float:
        nonlocal best
        v = float(objective(s))
        if not math.isfinite(v):
            v = -math.inf
        if v > best[1]:
            best = (s, v)
        return v

    points = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)] if grid > 1 else [lo]
    values = [ev(s) for s in points]
    for s in extra:
        ev(float(s))
    if refine <= 0 or grid < 2:
        return best
    i = max(range(len(values)), key=values.__getitem__)
    a, b = points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = ev(c), ev(d)
    for _ in range(refine):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = ev(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = ev(d)
    return best


def _check_search(config, lo_key: str, hi_key: str) -> None:
    check_number(config, lo_key)
    check_number(config, hi_key)
    if getattr(config, hi_key) <= getattr(config, lo_key):
        raise ValueError(f"{hi_key}={getattr(config, hi_key)}: must be > {lo_key}={getattr(config, lo_key)}")
    check_number(config, "grid", lo=2, hi=40, integer=True)
    check_number(config, "refine", lo=0, hi=40, integer=True)


class _RuleAware(UpdateAttackBase):
    """Shared driver: simulate the rule on ``[honest rows; f copies of row(scale)]``, the
    honest rows completed to ``n - f`` when fewer are known (:func:`simulated_honest`)."""

    needs = "colluders"
    needs_defense = True
    last_scale: float | None = None  # scale chosen in the latest round, for diagnostics
    last_filled: int = 0  # synthetic honest rows added to the simulation in the latest round
    last_fallback: str | None = None  # why the latest round used the plain scale, or None

    def _row(self, mu: Tensor, sigma: Tensor, scale: float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _score(self, aggregate: Tensor, mu: Tensor) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _bounds(self, ctx: AttackContext) -> tuple[float, float, tuple[float, ...]]:  # pragma: no cover
        raise NotImplementedError

    def _plain_scale(self, ctx: AttackContext) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _craft(self, ctx: AttackContext) -> Tensor:
        sim = simulated_honest(ctx)
        mu, sigma = sim.mu, sim.sigma
        f = max(ctx.f, 1)
        self.last_filled, self.last_fallback = sim.filled, None

        def objective(scale: float) -> float:
            out = ctx.aggregate(with_copies(sim.rows, self._row(mu, sigma, scale), f))
            if tuple(out.shape) != tuple(mu.shape):
                raise RuntimeError(f"ctx.aggregate returned shape {tuple(out.shape)}, expected {tuple(mu.shape)}")
            return self._score(out.to(mu.device, torch.float32), mu)

        lo, hi, extra = self._bounds(ctx)
        try:
            scale, _ = search_scale(objective, lo, hi, grid=self.config.grid, refine=self.config.refine, extra=extra)
        except ValueError as exc:  # the rule refused the simulated matrix (e.g. n unknown)
            scale = self._plain_scale(ctx)
            self.last_fallback = str(exc)
            log.warning("%s: the defense refused the simulated matrix of %d rows (%s); using the plain scale %.4g",
                        self.name, sim.rows.shape[0] + f, exc, scale)
        self.last_scale = scale
        return self._row(mu, sigma, scale)


@dataclass(frozen=True, kw_only=True)
class AlieOptConfig:
    """z_min, z_max: search range of z; grid, refine: search budget (see search_scale)."""

    z_min: float = 0.0
    z_max: float = 10.0
    grid: int = 11
    refine: int = 12

    def __post_init__(self) -> None:
        _check_search(self, "z_min", "z_max")


class AlieOpt(_RuleAware):
    """ALIE with z chosen against ``ctx.aggregate`` to maximise ``||aggregate - mu||``.
    The default z of plain ALIE is always among the candidates, so against the
    simulated rule it does at least as well as plain ALIE. Needs colluders (or
    omniscience) and the defense rule."""

    name = "alie_opt"

    def __init__(self, config: AlieOptConfig) -> None:
        super().__init__(config)

    def _row(self, mu: Tensor, sigma: Tensor, scale: float) -> Tensor:
        return mu + scale * sigma  # alie_row of the known rows

    def _score(self, aggregate: Tensor, mu: Tensor) -> float:
        return float((aggregate - mu).norm())

    def _bounds(self, ctx: AttackContext) -> tuple[float, float, tuple[float, ...]]:
        return self.config.z_min, self.config.z_max, (alie_default_z(ctx.n, ctx.f),)

    def _plain_scale(self, ctx: AttackContext) -> float:
        return alie_default_z(ctx.n, ctx.f)


@dataclass(frozen=True, kw_only=True)
class IpmOptConfig:
    """eps_min, eps_max: search range of epsilon; grid, refine: search budget."""

    eps_min: float = 0.0
    eps_max: float = 10.0
    grid: int = 11
    refine: int = 12

    def __post_init__(self) -> None:
        _check_search(self, "eps_min", "eps_max")


class IpmOpt(_RuleAware):
    """IPM with epsilon chosen against ``ctx.aggregate`` to minimise
    ``<aggregate, mu>``. Needs colluders (or omniscience) and the defense rule."""

    name = "ipm_opt"

    def __init__(self, config: IpmOptConfig) -> None:
        super().__init__(config)

    def _row(self, mu: Tensor, sigma: Tensor, scale: float) -> Tensor:
        return -scale * mu  # ipm_row of the known rows

    def _score(self, aggregate: Tensor, mu: Tensor) -> float:
        return -float(aggregate.double().dot(mu.double()))

    def _bounds(self, ctx: AttackContext) -> tuple[float, float, tuple[float, ...]]:
        return self.config.eps_min, self.config.eps_max, ()

    def _plain_scale(self, ctx: AttackContext) -> float:
        return 0.1  # plain IPM's default epsilon
