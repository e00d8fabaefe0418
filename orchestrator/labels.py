"""Short human labels for a run's defense and attacks, and which defenses select clients.

Used by ``metrics`` (``summary.json``'s ``defense_label``), ``sweep`` (``results.csv``) and
``report``. Pure functions over plain scenario tables (``scenario.json``), no torch.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

SELECTING = frozenset({"krum", "multikrum", "bulyan", "geomed", "vdc", "stpa"})
"""Rules whose accepted mask is a real choice of clients (a subset, by scores or clusters),
so detection precision/recall against the Byzantine ground truth means something."""

WRAPPER_INNER = {"nnm": "median", "bucketing": "median", "norm_clipping": "mean", "layerwise": "median"}
"""Wrappers that report a client accepted when their inner rule (default here) accepted a
row it contributed to: they select exactly when the inner rule does."""


def _spec(spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, Mapping):
        params = dict(spec)
        return str(params.pop("name", "")), params
    return str(spec), {}


def selects_clients(name: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether defense ``name`` with ``params`` selects clients. Coordinate-wise and
    averaging rules (mean, median, trimmed mean, centered clipping, RFA, FedSECA's
    weighting) accept everyone but non-finite rows, so "rejected nobody" is not a
    detection result for them."""
    params = dict(params or {})
    if name in SELECTING:
        return True
    if name in WRAPPER_INNER:
        inner, inner_params = _spec(params.get("inner", WRAPPER_INNER[name]))
        return selects_clients(inner, inner_params)
    return False


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, Mapping):
        name, params = _spec(v)
        return defense_label(name, params) if name else "{" + ", ".join(f"{k}={_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def defense_label(name: str, params: Mapping[str, Any] | None = None) -> str:
    """``krum``, ``krum(layerwise, cosine, clip=median)``, ``nnm(krum(cosine))``: the name
    and its parameters (a true flag by its name, the distance by its value, an inner rule
    nested), so variants of one rule stay apart in tables."""
    parts = []
    for key, v in (params or {}).items():
        if v is None:
            continue
        if v is True:
            parts.append(key)
        elif key == "distance" or key == "inner":
            parts.append(_value(v))
        else:
            parts.append(f"{key}={_value(v)}")
    return f"{name}({', '.join(parts)})" if parts else name


def attack_label(roles: list[Mapping[str, Any]]) -> str:
    """The attacks of the Byzantine roles that have nodes: ``alie``, ``alie(z=1.5)``,
    ``alie+sign_flip``; ``none`` when no Byzantine node attacks."""
    out = []
    for r in roles:
        if not r.get("byzantine") or not r.get("count", 1) or not r.get("attack"):
            continue
        label = defense_label(str(r["attack"]), r.get("attack_params") or {})
        if label not in out:
            out.append(label)
    return "+".join(out) if out else "none"


def byzantine_names(roles: list[Mapping[str, Any]]) -> set[str]:
    """Node names of the Byzantine roles (``<role>-<i:03d>``, as ``Scenario.node_roles``)."""
    return {f"{r.get('name', 'honest')}-{i:03d}" for r in roles if r.get("byzantine") for i in range(int(r.get("count", 1)))}


# ----- what the sweep writes and its report reads ---------------------------------------------------------------
RESULT_COLUMNS = ("cell", "status", "defense_label", "attack_label", "scenario_seed", "nodes", "byzantine",
                  "byzantine_fraction", "rounds_completed", "final_accuracy", "best_accuracy", "last5_accuracy",
                  "final_loss", "min_loss", "detection_precision", "detection_recall", "byzantine_share_accepted",
                  "t_aggregate_mean", "wall_seconds", "returncode", "run_dir", "log", "error")
"""``results.csv``'s columns besides the axes (which come after ``status``, one per axis)."""


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")



def safe_id(text: str, limit: int = 120) -> str:
    """A folder name: runs of other characters become ``-``; a long one is cut and gets a
    short hash of the whole, so two long ids never collide."""
    out = _UNSAFE.sub("-", text).strip("-.") or "cell"
    if len(out) > limit:
        out = f"{out[:limit - 9].rstrip('-.')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return out


def override_tag(overrides: Sequence[str], limit: int = 80) -> str:
    """The ``--set`` values of a run as a short folder-name part: ``rounds=5__name=median``.

    Each ``key=value`` keeps its key's last part (the full key when two overrides share
    that part), its value without TOML quotes; then :func:`safe_id` makes the whole
    filesystem-safe and cuts a long one (with a hash of the whole). ``""`` for none."""
    pairs = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key, value = key.strip(), value.strip()
        pairs.append((key, value.strip("\"'") if sep else ""))
    if not pairs:
        return ""
    last = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    parts = []
    for (key, value), short in zip(pairs, last):
        name = short if last.count(short) == 1 else key
        parts.append(f"{name}={value}" if value else name)
    return safe_id("__".join(parts), limit)


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # (a line cut by a killed run)
    return out
