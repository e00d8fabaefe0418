"""Defense registry: ``{name: (ConfigClass, factory)}`` filled in one place.

``build_defense(name, params)`` builds a configured defense; an unknown name lists
the known ones and an unknown parameter is an error naming it (frozen
keyword-only config dataclasses). ``describe()`` is the listing printed by
``python -m orchestrator defenses``.

Composition: wrappers take a nested rule spec in ``inner``, either a registered
name or a table with a ``name`` key and that rule's parameters::

    {"name": "nnm", "inner": {"name": "krum", "distance": "cosine", "clip": "median"}}
    {"name": "vdc", "m": 3, "inner": "median"}            # plugin in front of any rule
    {"name": "layerwise", "inner": "rfa"}                 # layerwise around any rule
    {"name": "bucketing", "s": 2, "inner": {"name": "nnm", "inner": "trimmed_mean"}}

Wrappers: ``nnm``, ``bucketing``, ``norm_clipping`` (pre-aggregators), ``vdc``
(plugin), ``layerwise``, ``stpa`` (spatial rule on the kept cluster). The
distance-based rules (``krum``, ``multikrum``, ``bulyan``, ``geomed``) also take
``layerwise``, ``distance`` and ``clip`` directly (Layerwise Cosine Aggregation).

Adding a defense: one module with a frozen keyword-only config (deriving from
``_common.Config``) and a callable ``rule(updates, ctx) -> DefenseResult``, and
one entry below.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from proto.registry import Registry

from .base import DefenseError, DefenseResult, RoundContext
from .bucketing import Bucketing, BucketingConfig
from .bulyan import Bulyan, BulyanConfig
from .centered_clipping import CenteredClipping, CenteredClippingConfig
from .fedseca import FedSECA, FedSECAConfig
from .geomed import GeoMed, GeoMedConfig
from .krum import Krum, KrumConfig, MultiKrum, MultiKrumConfig
from .layerwise import Layerwise, LayerwiseConfig
from .mean import Mean, MeanConfig
from .median import Median, MedianConfig
from .nnm import NNM, NNMConfig
from .norm_clipping import NormClipping, NormClippingConfig
from .rfa import RFA, RFAConfig
from .stpa import STPA, STPAConfig
from .trimmed_mean import TrimmedMean, TrimmedMeanConfig
from .vdc import VDCConfig, VirtualDataConsistency

Defense = Callable[..., DefenseResult]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgConfig:
    """FedAvg has no parameters: it is the mean weighted by sample counts (``mean`` with
    ``weighted = true``); ``mean`` is the unweighted one."""


def _fedavg(config: FedAvgConfig) -> Mean:
    """FedAvg: the mean weighted by each client's sample count (no Byzantine tolerance)."""
    return Mean(MeanConfig(weighted=True))


REGISTRY: Registry = Registry("defense", error=DefenseError, entries={
    "mean": (MeanConfig, Mean),
    "fedavg": (FedAvgConfig, _fedavg),
    "median": (MedianConfig, Median),
    "trimmed_mean": (TrimmedMeanConfig, TrimmedMean),
    "krum": (KrumConfig, Krum),
    "multikrum": (MultiKrumConfig, MultiKrum),
    "bulyan": (BulyanConfig, Bulyan),
    "geomed": (GeoMedConfig, GeoMed),
    "rfa": (RFAConfig, RFA),
    "centered_clipping": (CenteredClippingConfig, CenteredClipping),
    "norm_clipping": (NormClippingConfig, NormClipping),
    "nnm": (NNMConfig, NNM),
    "bucketing": (BucketingConfig, Bucketing),
    "layerwise": (LayerwiseConfig, Layerwise),
    "vdc": (VDCConfig, VirtualDataConsistency),
    "fedseca": (FedSECAConfig, FedSECA),
    "stpa": (STPAConfig, STPA),
})


def config_fields(name: str) -> list[tuple[str, str, Any]]:
    """``(param, type, default)`` for each parameter of defense ``name``."""
    return REGISTRY.config_fields(name)


def _lookup(name: str):
    return REGISTRY.lookup(name)


def build_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    return REGISTRY.build(name, params)


def rule_for_attack(name: str, params: dict[str, Any] | None = None) -> Callable[..., Any]:
    """The ``byzfed.defenses`` entry point (``pyproject.toml``): defense ``name`` as the
    plain callable a rule-aware attack runs on its own rows,
    ``aggregate(rows, *, f, generator, layout, global_weights, round=0, state=None) -> Tensor[d]``
    (``fednode.rule_provider.RuleAggregate``), so that fednode needs no orchestrator type.
    ``state`` is the rule's persistent dict (kept by the caller between calls)."""
    rule = build_defense(name, params)

    def aggregate(rows, *, f: int, generator, layout, global_weights, round: int = 0, state=None):
        ctx = RoundContext(layout=layout, global_weights=global_weights, round=round, f=int(f),
                           generator=generator, state={} if state is None else state)
        return rule(rows, ctx).delta

    return aggregate


def _summary(name: str) -> str:
    config_cls, factory = REGISTRY[name]
    doc = factory.__doc__ or config_cls.__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def describe() -> str:
    """The registry as text: each defense, its one-line doc, and each parameter
    with its type, default and allowed values."""
    lines = ["Registered defenses. A nested rule spec (inner) is a name or a table {name = ..., <params>}.",
             "Layerwise Cosine Aggregation variants of krum, multikrum, bulyan, geomed: original {},",
             "layerwise {layerwise = true}, cosine {distance = \"cosine\", clip = \"median\"},",
             "layerwise cosine {layerwise = true, distance = \"cosine\", clip = \"median\"}.", ""]
    for name in REGISTRY:
        lines.append(f"{name}")
        lines.append(f"    {_summary(name)}")
        config_cls, _ = REGISTRY[name]
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        params = config_fields(name)
        if not params:
            lines.append("    (no parameters)")
        for pname, ptype, default in params:
            meta = fields[pname].metadata
            choices, rule, doc = meta.get("choices") or (), meta.get("rule"), meta.get("doc")
            extra = f"  one of {' | '.join(map(repr, choices))}" if choices else (f"  ({rule})" if rule else "")
            lines.append(f"    {pname}: {ptype} = {default!r}{extra}")
            if doc:
                lines.append(f"        {doc}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def min_clients(name: str, params: dict[str, Any] | None, f: int) -> int:
    """The fewest updates per round with which defense ``name`` (configured by
    ``params``) can run every round against ``f`` Byzantine clients: a scenario
    with fewer clients can never work (the rule would raise :class:`DefenseError`).
    E.g. krum ``2f + 3``, bulyan ``4f + 3``, trimmed_mean ``2f + 1`` (1 with
    ``beta``), nnm ``max(2f + 1, inner)``; wrappers compose: bucketing needs its
    inner rule's minimum in bucket means, vdc ``m`` more than its inner rule,
    stpa and layerwise what their inner rule needs. Rules without a requirement (mean, median,
    geomed, rfa, centered_clipping, fedseca) return 1: they run at any ``n``, but
    tolerate ``f`` only below their breakdown point (``f < n / 2``; the mean none).
    Bad names or parameters raise :class:`DefenseError` as :func:`build_defense` does."""
    if int(f) < 0:
        raise DefenseError(f"f must be >= 0, got {f}")
    rule = build_defense(name, params)
    fn = getattr(rule, "min_clients", None)
    return max(1, int(fn(int(f)))) if callable(fn) else 1


__all__ = ["REGISTRY", "build_defense", "config_fields", "describe", "min_clients", "DefenseError", "DefenseResult",
           "RoundContext"]
