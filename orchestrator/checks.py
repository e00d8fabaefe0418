"""The scenario checks that need more than the scenario's own fields: Byzantine
roles (attack names and parameters, schedules, knowledge against ``[adversary]``)
and churn / cross-device / async keys.

Pure functions over a :class:`~orchestrator.scenario.Scenario`, called by
``scenario._validate`` with its ``need(cond, key, msg)``. This module imports
neither gRPC nor anything that starts or supervises processes (no collusion
server, no restarter, no runner), so loading and validating a scenario stays
cheap and side-effect free; ``orchestrator.adversary`` re-exports what it used to
define here.
"""
from __future__ import annotations

import ipaddress
from typing import Callable

# Annotations name ``scenario.Scenario`` / ``scenario.RoleSection`` as text only: scenario
# imports this module to validate, so this one does not import it back.

Need = Callable[[bool, str, str], None]


# --------------------------------------------------------------------------- Byzantine roles

def _attack_classes(name: str):
    """``(ConfigClass, AttackClass)`` of attack ``name`` (``KeyError`` when unknown)."""
    from attacks import ATTACKS
    return ATTACKS[name]


def effective_knowledge(role: "RoleSection") -> str:
    """What the role's attack may read: its ``knowledge`` key, else what the attack needs."""
    if not role.byzantine or not role.attack:
        return "nothing"
    if role.knowledge:
        return role.knowledge
    _, attack_cls = _attack_classes(role.attack)
    return attack_cls.needs


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_roles(s: "Scenario", need: Need) -> None:
    """Byzantine roles: attack and schedule build, knowledge is known and enough for
    the attack, and an omniscient role has the (loopback-only) adversary view."""
    from attacks import KNOWLEDGE_LEVELS, build_attack, build_schedule

    adv = s.adversary
    need(adv.view_timeout > 0, "adversary.view_timeout", "must be > 0 seconds")
    need(adv.collusion_timeout > 0, "adversary.collusion_timeout", "must be > 0 seconds")
    if adv.omniscient:
        need(adv.view_timeout < s.federation.round_timeout, "adversary.view_timeout",
             "must be shorter than federation.round_timeout")
        need(_is_loopback(s.federation.host) or adv.allow_non_loopback, "adversary.omniscient",
             f"is simulation-only and federation.host = {s.federation.host!r} is not a loopback address; "
             "set adversary.allow_non_loopback = true if you really mean it")
    for i, r in enumerate(s.roles):
        key = f"roles[{i}]"
        need(r.byzantine or not (r.schedule or r.knowledge or r.attack_params), key,
             "has schedule/knowledge/attack_params but byzantine = false")
        if not r.byzantine or not r.attack:
            continue
        try:
            attack = build_attack(r.attack, r.attack_params)
        except ValueError as exc:
            need(False, f"{key}.attack", str(exc))
        try:
            build_schedule(r.schedule)
        except (TypeError, ValueError) as exc:
            need(False, f"{key}.schedule", str(exc))
        need(r.knowledge in ("",) + KNOWLEDGE_LEVELS, f"{key}.knowledge",
             f"= {r.knowledge!r} is not allowed; allowed values: '', {', '.join(map(repr, KNOWLEDGE_LEVELS))}")
        if r.knowledge:
            need(KNOWLEDGE_LEVELS.index(r.knowledge) >= KNOWLEDGE_LEVELS.index(attack.needs), f"{key}.knowledge",
                 f"= {r.knowledge!r} is less than attack {r.attack!r} needs ({attack.needs!r})")
        need(effective_knowledge(r) != "omniscient" or adv.omniscient, f"{key}.attack",
             f"{r.attack!r} with knowledge 'omniscient' needs the adversary view: set [adversary] omniscient = true "
             "(simulation only)")


# --------------------------------------------------------------------------- churn, cross-device, async

def idle_mode(s: "Scenario") -> str:
    """``light`` or ``warm`` (``auto``: light for synchronous sample selection)."""
    mode = s.federation.idle_nodes
    if mode == "auto":
        return "light" if s.federation.mode == "sync" and s.federation.selection == "sample" else "warm"
    return mode


def check_churn(s: "Scenario", need: Need) -> None:
    """Values of the churn, cross-device and async keys (called by ``scenario._validate``)."""
    fed = s.federation
    need(fed.over_selection >= 1.0, "federation.over_selection", "must be >= 1")
    need(fed.buffer_size >= 1, "federation.buffer_size", "must be >= 1")
    need(fed.max_staleness >= 0, "federation.max_staleness", "must be >= 0")
    need(fed.staleness_exponent >= 0, "federation.staleness_exponent", "must be >= 0")
    need(fed.train_slots >= 0, "federation.train_slots", "must be >= 0 (0: the machine's cores)")
    need(fed.mode != "async" or not s.adversary.omniscient, "adversary.omniscient",
         "serves a synchronous round's honest updates; it does not exist in async mode")
    if idle_mode(s) == "light":
        from fednode.strategies import lookup

        _, strategy = lookup(s.training.algorithm)
        need(not strategy.stateful, "federation.idle_nodes",
             f"is 'light' (auto: sample selection) but {s.training.algorithm!r} keeps per-node state across rounds, "
             "which a light node sheds; set idle_nodes = 'warm'")
    for i, r in enumerate(s.roles):
        key = f"roles[{i}]"
        need(0.0 <= r.crash_probability <= 1.0, f"{key}.crash_probability", "must be in [0, 1]")
        need(bool(r.crash_phase) or (r.crash_probability == 0 and r.crash_at_round < 0), f"{key}.crash_phase",
             "is needed with crash_probability or crash_at_round: 'download', 'train' or 'upload'")
        need(r.latency_ms >= 0, f"{key}.latency_ms", "must be >= 0")
        need(r.slowdown >= 1.0, f"{key}.slowdown", "must be >= 1")
        need(r.train_delay_s >= 0, f"{key}.train_delay_s", "must be >= 0")
        need(r.restart_after_seconds == -1 or r.restart_after_seconds >= 0, f"{key}.restart_after_seconds",
             "must be >= 0 (or -1: never)")


# --------------------------------------------------------------------------- defense against the round's size

def max_rows(s: "Scenario") -> int:
    """The most updates one aggregation can hold: every node (selection ``all``), the
    over-selected draw (``sample``) or the buffer (async)."""
    fed = s.federation
    if fed.mode == "async":
        return fed.buffer_size
    if fed.selection == "sample":
        return min(s.num_trainers, -(-int(fed.sample_size * fed.over_selection * 1_000_000) // 1_000_000))
    return s.num_trainers


MAX_NODES = 100_000
"""The most nodes one scenario may describe (the roster is held in memory by every part)."""


def check_sizes_and_training(s: "Scenario", need: Need) -> None:
    """Counts that fit in memory, a quorum that can be met, and the local algorithm's
    parameters as the nodes will build them (``training.params``)."""
    from fednode.strategies import build_config

    for i, r in enumerate(s.roles):
        need(r.count <= MAX_NODES, f"roles[{i}].count", f"= {r.count} is more than {MAX_NODES} nodes")
    need(s.num_nodes <= MAX_NODES, "roles", f"describe {s.num_nodes} nodes; at most {MAX_NODES} are allowed")
    q = s.federation.quorum
    need(q <= 1 or (float(q).is_integer() and q <= s.num_trainers), "federation.quorum",
         f"= {q!r} must be a fraction in (0, 1] or a whole count of at most the {s.num_trainers} nodes")
    try:
        build_config(s.training.algorithm, s.training.params)
    except ValueError as exc:
        need(False, "training.params", f"is refused: {exc}")


def check_defense(s: "Scenario", need: Need) -> None:
    """The defense builds with its parameters, and it can run with the rows a round can
    ever hold: ``(n, f)`` pairs that can never work (Krum with ``n < 2f + 3``, Bulyan with
    ``n < 4f + 3``, ...) are refused here instead of skipping every round."""
    from .defenses import DefenseError, min_clients  # torch, but neither gRPC nor process control

    d = s.defense
    try:
        need_n = min_clients(d.name, d.params, d.f)
    except DefenseError as exc:
        need(False, "defense.name" if str(exc).startswith("unknown defense") else "defense.params", f"is refused: {exc}")
        return
    n = max_rows(s)
    need(n >= need_n, "defense.f",
         f"= {d.f}: defense {d.name!r} needs at least {need_n} updates per aggregation, but this scenario's "
         f"aggregations hold at most {n} (nodes, sample size or buffer size); lower f or add nodes")


__all__ = ["check_roles", "check_churn", "check_defense", "check_sizes_and_training", "MAX_NODES", "effective_knowledge", "idle_mode", "max_rows"]
