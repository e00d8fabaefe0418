"""Byzantine attacks: data poisoning, update crafting, wire corruption, schedules.

``ATTACKS`` maps each name to ``(ConfigClass, AttackClass)``, filled in this one
place. ``build_attack(name, params)`` returns ``AttackClass(ConfigClass(**params))``;
an unknown name, an unknown parameter or a bad value raises ``ValueError`` naming
it. ``describe()`` (also ``python -m attacks``) lists every attack.

This package imports nothing from ``fednode`` or ``orchestrator``, and from
``proto`` only the two dependency-free helpers ``proto.registry`` (the registry
shape shared by every layer) and ``proto.seeding`` (the one seed derivation).
"""
from __future__ import annotations

from typing import Any

from proto.registry import Registry

from .base import (KNOWLEDGE_LEVELS, AttackContext, DataAttack, Kind, Knowledge, UpdateAttack,
                   SimulatedHonest, benign_mean_spread, check_requirements, config_params, mean_std,
                   missing_requirements, reference_stats, simulated_honest)
from .boosting import Boost, BoostConfig, ModelReplacement, ModelReplacementConfig
from .data_poisoning import LabelFlip, LabelFlipConfig, TargetedFlip, TargetedFlipConfig
from .fang import FangKrum, FangKrumConfig, FangTrmean, FangTrmeanConfig
from .invalid import MALFORMED_MODES, NONFINITE_MODES, Malformed, MalformedConfig, NonFinite, NonFiniteConfig
from .mimic import Mimic, MimicConfig
from .minmax import MinMax, MinMaxConfig, MinSum
from .noise import Gaussian, GaussianConfig, LayerGaussian, LayerGaussianConfig, Untargeted, UntargetedConfig
from .optimal import AlieOpt, AlieOptConfig, IpmOpt, IpmOptConfig, search_scale
from .schedule import Schedule, build_schedule
from .simple import Scaling, ScalingConfig, SignFlip, SignFlipConfig
from .statistical import Alie, AlieConfig, Ipm, IpmConfig, alie_default_z

ATTACKS: Registry = Registry("attack", error=ValueError, entries={
    "label_flip": (LabelFlipConfig, LabelFlip),
    "targeted_flip": (TargetedFlipConfig, TargetedFlip),
    "boost": (BoostConfig, Boost),
    "model_replacement": (ModelReplacementConfig, ModelReplacement),
    "untargeted": (UntargetedConfig, Untargeted),
    "gaussian": (GaussianConfig, Gaussian),
    "layer_gaussian": (LayerGaussianConfig, LayerGaussian),
    "sign_flip": (SignFlipConfig, SignFlip),
    "scaling": (ScalingConfig, Scaling),
    "alie": (AlieConfig, Alie),
    "ipm": (IpmConfig, Ipm),
    "fang_krum": (FangKrumConfig, FangKrum),
    "fang_trmean": (FangTrmeanConfig, FangTrmean),
    "min_max": (MinMaxConfig, MinMax),
    "min_sum": (MinMaxConfig, MinSum),
    "mimic": (MimicConfig, Mimic),
    "alie_opt": (AlieOptConfig, AlieOpt),
    "ipm_opt": (IpmOptConfig, IpmOpt),
    "nonfinite": (NonFiniteConfig, NonFinite),
    "malformed": (MalformedConfig, Malformed),
})


def _lookup(name: str) -> tuple[type, type]:
    return ATTACKS.lookup(name)


def build_attack(name: str, params: dict[str, Any] | None = None) -> Any:
    """The configured attack ``name``; ``ValueError`` names an unknown attack, an
    unknown parameter (listing the allowed ones) or a bad value (naming its key)."""
    return ATTACKS.build(name, params)


def describe() -> str:
    """One block per attack: kind, needs, needs_defense, summary and params with defaults."""
    lines = []
    for name, (config_cls, attack_cls) in ATTACKS.items():
        doc = (attack_cls.__doc__ or "").strip().split("\n\n")[0]
        summary = " ".join(doc.split())
        lines.append(f"{name}  kind={attack_cls.kind} needs={attack_cls.needs} "
                     f"needs_defense={attack_cls.needs_defense}"
                     + (f" requires={','.join(attack_cls.requires)}" if attack_cls.requires else ""))
        lines.append(f"    {summary}")
        params = ", ".join(f"{p}={d!r}" for p, _, d in config_params(config_cls)) or "(none)"
        lines.append(f"    params: {params}")
    return "\n".join(lines)


__all__ = [
    "ATTACKS", "build_attack", "describe", "AttackContext", "Knowledge", "KNOWLEDGE_LEVELS", "Kind",
    "DataAttack", "UpdateAttack", "reference_stats", "mean_std", "simulated_honest", "SimulatedHonest",
    "benign_mean_spread", "check_requirements", "missing_requirements",
    "Schedule", "build_schedule", "search_scale", "alie_default_z", "MALFORMED_MODES", "NONFINITE_MODES",
]
