"""How a node gets the server's defense rule without importing the orchestrator.

A rule-aware attack (``needs_defense``, e.g. ``alie_opt``) runs the scenario's
defense on rows of its own making. fednode must not import ``orchestrator``
(see ARCHITECTURE.md), so the rule comes through the standard Python plugin
mechanism: an entry point of group :data:`ENTRY_POINT_GROUP` (``byzfed.defenses``)
names a :class:`RuleProvider`. The byzfed package declares one in its
``pyproject.toml``::

    [project.entry-points."byzfed.defenses"]
    rules = "orchestrator.defenses:rule_for_attack"

A provider is called as ``provider(name, params)`` and returns a
:class:`RuleAggregate`, a plain callable over tensors and the layout, so nothing
of the orchestrator's types reaches the node. When no provider is installed the
node refuses the behaviour with :class:`RuleProviderError` naming what is missing.
"""
from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol

if TYPE_CHECKING:
    import torch

    from proto.layout import Layout

ENTRY_POINT_GROUP = "byzfed.defenses"


class RuleAggregate(Protocol):
    """The server's rule on an attacker's rows: ``[m, d] -> [d]``.

    ``f`` is the number of Byzantine rows the rule tolerates, ``generator`` the
    seeded generator of this call, ``state`` the rule's persistent dict, kept by
    the caller between calls of one round (temporal rules read and write it)."""

    def __call__(self, rows: "torch.Tensor", *, f: int, generator: Optional["torch.Generator"], layout: "Layout",
                 global_weights: "torch.Tensor", round: int = 0,
                 state: Optional[dict[str, Any]] = None) -> "torch.Tensor": ...


class RuleProvider(Protocol):
    """``provider(name, params) -> RuleAggregate``; raises ``ValueError`` on an unknown rule or parameter."""

    def __call__(self, name: str, params: Mapping[str, Any]) -> RuleAggregate: ...


class RuleProviderError(RuntimeError):
    """No usable provider of the ``byzfed.defenses`` entry point group."""


def load_rule_provider(group: str = ENTRY_POINT_GROUP) -> RuleProvider:
    """The one installed provider of entry point group ``group``.

    Raises :class:`RuleProviderError` when none is installed, when several
    different ones are (ambiguous), or when the one found fails to load."""
    eps = list(metadata.entry_points(group=group))
    distinct = {ep.value: ep for ep in eps}
    if not distinct:
        raise RuleProviderError(
            f"no provider of the entry point group {group!r} is installed: a rule-aware attack needs the "
            "server's defense rule, which the orchestrator package provides (install byzfed with "
            "`pip install -e .` so its pyproject.toml entry point "
            f"[project.entry-points.{group!r}] rules = \"orchestrator.defenses:rule_for_attack\" is registered)")
    if len(distinct) > 1:
        names = ", ".join(f"{ep.name} = {ep.value!r}" for ep in distinct.values())
        raise RuleProviderError(f"several providers of the entry point group {group!r} are installed ({names}); "
                                "uninstall all but one")
    ep = next(iter(distinct.values()))
    try:
        provider = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import failure of a plugin is reported the same way
        raise RuleProviderError(f"the provider {ep.name} = {ep.value!r} of entry point group {group!r} "
                                f"failed to load: {type(exc).__name__}: {exc}") from exc
    if not callable(provider):
        raise RuleProviderError(f"the provider {ep.name} = {ep.value!r} of entry point group {group!r} "
                                f"is not callable: {provider!r}")
    return provider


__all__ = ["ENTRY_POINT_GROUP", "RuleAggregate", "RuleProvider", "RuleProviderError", "load_rule_provider"]
