"""Shared plumbing: validated configs, nested rule specs, sub-contexts, result mapping.

Configs are frozen keyword-only dataclasses deriving from :class:`Config`, whose
``__post_init__`` checks every value against its annotation and, where a field
was declared with :func:`option`, against its allowed choices or its check.

A *rule spec* (the ``inner`` of a wrapper) is a registered name (``"median"``) or
a table ``{"name": "krum", "distance": "cosine", ...}``; it is built through the
registry, so the inner rule's parameters are validated the same way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .base import DefenseError, DefenseResult, RoundContext

_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "None": (type(None),),
    "dict": (dict,), "tuple[int, ...]": (tuple, list),
}


def option(default: Any, *choices: Any, check: Optional[Callable[[Any], bool]] = None, rule: str = "",
           doc: str = "") -> Any:
    """A config field with allowed ``choices`` or a ``check`` (``rule`` words the
    check) and a one-line ``doc`` for the listing."""
    return field(default=default, metadata={"choices": choices, "check": check, "rule": rule, "doc": doc})


def _type_ok(value: Any, annotation: str) -> bool:
    allowed: list[type] = []
    for alt in annotation.split("|"):
        if alt.strip() not in _TYPES:
            return True  # Any / nested specs: checked where they are used
        allowed.extend(_TYPES[alt.strip()])
    if isinstance(value, bool) and bool not in allowed:
        return False
    return isinstance(value, tuple(allowed))


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every defense config: validates the values of its fields."""

    def __post_init__(self) -> None:
        for fld in dataclasses.fields(self):
            value = getattr(self, fld.name)
            if not _type_ok(value, str(fld.type)):
                raise ValueError(f"parameter {fld.name!r} must be {fld.type}, got {value!r}")
            if isinstance(value, list):
                object.__setattr__(self, fld.name, tuple(value))
            choices = fld.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"parameter {fld.name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            check = fld.metadata.get("check")
            if check is not None and value is not None and not check(value):
                raise ValueError(f"parameter {fld.name!r} {fld.metadata.get('rule') or 'is invalid'}, got {value!r}")


def build_spec(spec: Any, where: str) -> Callable[..., DefenseResult]:
    """Build a nested rule from ``"name"`` or ``{"name": ..., **params}``."""
    from . import build_defense  # the registry imports every rule module

    if isinstance(spec, str):
        return build_defense(spec, {})
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            return build_defense(spec["name"], params)
        except DefenseError as exc:
            raise DefenseError(f"{where}: {exc}") from None
    raise DefenseError(f"{where} must be a defense name or a table with a 'name' key, got {spec!r}")


def child_state(ctx: RoundContext, key: str) -> dict[str, Any]:
    """This rule's namespace for a nested rule's persistent state (a dict of tensors/numbers)."""
    sub = ctx.state.get(key)
    if not isinstance(sub, dict):
        sub = ctx.state[key] = {}
    return sub


def sub_context(ctx: RoundContext, *, state_key: str, rows: Optional[torch.Tensor] = None,
                mixed: bool = False, **changes: Any) -> RoundContext:
    """Context for a nested rule: its own state namespace; ``rows`` (indices into
    this round's updates) keeps the matching sample counts and client ids;
    ``mixed=True`` (rows that are combinations of clients) drops them."""
    counts, ids = ctx.sample_counts, ctx.client_ids
    if mixed:
        counts, ids = None, None
    elif rows is not None:
        idx = rows.tolist()
        counts = counts[rows.to(counts.device)] if counts is not None else None
        ids = [ids[i] for i in idx] if ids is not None else None
    return dataclasses.replace(ctx, state=child_state(ctx, state_key), sample_counts=counts, client_ids=ids, **changes)


def need(condition: bool, rule: str, requirement: str, n: int, f: int) -> None:
    """Raise the uniform requirement error, e.g. ``krum needs n >= 2f + 3 (n = 5, f = 2)``."""
    if not condition:
        raise DefenseError(f"{rule} needs {requirement} (n = {n}, f = {f})")


def mask_of(indices: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[indices.to(device)] = True
    return mask


def through_mixing(inner: DefenseResult, mix: torch.Tensor, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Client-level accepted mask and weights when the inner rule saw rows ``mix @ X``.

    ``mix`` is ``[rows, n]`` (CPU). A client is accepted when an accepted row draws
    on it; its weight is ``mix^T w`` (the share of the output it carries)."""
    acc = inner.accepted.to("cpu", torch.bool)
    accepted = (mix[acc].abs().sum(0) > 0) if acc.any() else torch.zeros(n, dtype=torch.bool)
    weights = None
    if inner.weights is not None:
        weights = mix.T.to(torch.float64) @ inner.weights.to("cpu", torch.float64)
    return accepted, weights


def stable_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``scores`` ascending, ties by lowest index (the documented tie-break)."""
    return torch.sort(scores, stable=True).indices


# ------------------------------------------------- updates holding NaN or Inf

def restrict_context(ctx: RoundContext, keep: torch.Tensor, f: int) -> RoundContext:
    """``ctx`` for the rows ``keep`` of this round's updates, with Byzantine count
    ``f``; the same state namespace (the rule itself runs again on fewer rows)."""
    counts, ids = ctx.sample_counts, ctx.client_ids
    if counts is not None:
        counts = counts[keep.to(counts.device)]
    if ids is not None:
        ids = [ids[i] for i in keep.tolist()]
    return dataclasses.replace(ctx, f=f, sample_counts=counts, client_ids=ids)


def excluded_f(f: int, excluded: int) -> int:
    """Byzantine rows left to tolerate once ``excluded`` rows (NaN/Inf, hence
    Byzantine) are out: ``max(f - excluded, 0)``. Requirements such as
    ``n >= 2f + 3`` that hold for ``(n, f)`` hold for ``(n - b, f - b)``."""
    return max(int(f) - int(excluded), 0)


def no_finite_rows(rule: str, n: int) -> DefenseError:
    return DefenseError(f"{rule}: every one of the n = {n} updates holds NaN or Inf; nothing to aggregate")


def expand_result(res: DefenseResult, keep: torch.Tensor, n: int, excluded: torch.Tensor) -> DefenseResult:
    """A result over the rows ``keep`` as a result over all ``n`` rows: the others
    (``excluded``, rows holding NaN or Inf) are not accepted and weigh 0."""
    dev = res.accepted.device
    k = keep.to(dev)
    accepted = torch.zeros(n, dtype=torch.bool, device=dev)
    accepted[k] = res.accepted.to(torch.bool)
    weights = None
    if res.weights is not None:
        weights = torch.zeros(n, dtype=res.weights.dtype, device=res.weights.device)
        weights[keep.to(res.weights.device)] = res.weights
    diag = dict(res.diagnostics)
    diag["nonfinite"] = excluded.cpu()
    diag["n_accepted"] = int(accepted.sum())
    return DefenseResult(delta=res.delta, accepted=accepted, weights=weights, diagnostics=diag)


def without_rows(rule: str, updates: torch.Tensor, ctx: RoundContext, bad: torch.Tensor,
                 run: Callable[[torch.Tensor, RoundContext], DefenseResult]) -> DefenseResult:
    """``run`` on the updates not flagged in ``bad`` (``[n]`` bool: rows holding NaN
    or Inf), with ``f`` lowered by their number, mapped back to all ``n`` rows;
    a :class:`DefenseError` when no row is left."""
    n = updates.shape[0]
    bad = bad.to("cpu", torch.bool)
    keep = torch.nonzero(~bad).flatten()
    if keep.numel() == 0:
        raise no_finite_rows(rule, n)
    excluded = torch.nonzero(bad).flatten()
    sub = restrict_context(ctx, keep, excluded_f(ctx.f, excluded.numel()))
    try:
        res = run(updates.index_select(0, keep.to(updates.device)), sub)
    except DefenseError as exc:
        raise DefenseError(f"{exc} (after leaving out {excluded.numel()} update(s) holding NaN or Inf)") from None
    return expand_result(res, keep, n, excluded)


def _inner_min(rule: Any, f: int) -> int:
    """``rule.min_clients(f)`` (1 for a callable without it)."""
    fn = getattr(rule, "min_clients", None)
    return int(fn(f)) if callable(fn) else 1
