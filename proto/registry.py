"""One small registry shape for every "choose it by name" table of the project.

Defenses, attacks, local-training strategies and server steps are all
``name -> (ConfigClass, factory)`` with a frozen keyword-only config dataclass.
:class:`Registry` holds such a table and does, in one place, what each of them
needs: lookup with an error listing the known names, unknown-parameter checks
listing the allowed ones (the config's field names plus its ``ALIASES``, if it
declares any), config construction with errors that name the entry, and the
``(param, type, default)`` listing.

It is a read-only :class:`~collections.abc.Mapping` of ``name -> (ConfigClass,
factory)``, so ``REGISTRY[name]``, ``sorted(REGISTRY)``, ``REGISTRY.items()``
keep working where the tables used to be plain dicts.

This module is pure standard library and imports nothing of the project, so
every layer (``proto``, ``attacks``, ``fednode``, ``orchestrator``) may use it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")

Entry = tuple[type, Callable[[Any], Any]]


def fields_of(config_cls: type, missing: Any = None) -> list[tuple[str, str, Any]]:
    """``(name, type, default)`` of each field of dataclass ``config_cls``; a field
    without a default gets ``missing``."""
    out = []
    for fld in dataclasses.fields(config_cls):
        if fld.default is not dataclasses.MISSING:
            default = fld.default
        elif fld.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = fld.default_factory()  # type: ignore[misc]
        else:
            default = missing
        out.append((fld.name, str(fld.type), default))
    return out


class Registry(Mapping[str, Entry], Generic[T]):
    """``name -> (ConfigClass, factory)``; ``build(name, params)`` is ``factory(ConfigClass(**params))``.

    ``kind`` is the word the errors use (``"defense"``, ``"attack"``, ...);
    ``error`` the exception class they raise (``ValueError`` or a subclass).

    Errors, all of class ``error``:

    * ``unknown <kind> 'name'; known: a, b, c``
    * ``<kind> 'name' has no parameter 'p'; allowed: x, y`` (``(none)`` when empty)
    * ``<kind> 'name': parameter 'p' given twice (as 'alias' and an alias)``
    * ``<kind> 'name': <message>`` for a ``TypeError``/``ValueError`` the config
      raised. A config error that already is of a *specific* ``error`` class
      (a subclass of ``ValueError``, such as the defenses' ``DefenseError``) passes
      through unchanged: it names its own context.
    """

    def __init__(self, kind: str, *, error: type[Exception] = ValueError,
                 entries: Optional[Mapping[str, Entry]] = None) -> None:
        if not (isinstance(error, type) and issubclass(error, Exception)):
            raise TypeError(f"Registry({kind!r}): error must be an exception class, got {error!r}")
        self.kind = kind
        self.error = error
        self._entries: dict[str, Entry] = {}
        for name, (config_cls, factory) in (entries or {}).items():
            self.register(name, config_cls, factory)

    # ----- filling ----------------------------------------------------------------
    def register(self, name: str, config_cls: type, factory: Callable[[Any], T]) -> None:
        """Add ``name``; a name registered twice or a config that is not a dataclass is a ``TypeError``/``ValueError``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
            raise TypeError(f"{self.kind} {name!r}: config {config_cls!r} is not a dataclass")
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r}: factory {factory!r} is not callable")
        self._entries[name] = (config_cls, factory)

    # ----- Mapping --------------------------------------------------------------------
    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    # ----- use ------------------------------------------------------------------------
    def lookup(self, name: str) -> Entry:
        """``(ConfigClass, factory)`` of ``name``, or ``error('unknown <kind> ...; known: ...')``."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}") from None

    def allowed(self, name: str) -> list[str]:
        """The parameter names ``name`` accepts (fields and aliases), sorted."""
        config_cls, _ = self.lookup(name)
        aliases: Mapping[str, str] = getattr(config_cls, "ALIASES", None) or {}
        return sorted({f.name for f in dataclasses.fields(config_cls)} | set(aliases))

    def build_config(self, name: str, params: Optional[Mapping[str, Any]] = None) -> Any:
        """The validated config of ``name`` from ``params`` (the config's ``ALIASES`` accepted)."""
        config_cls, _ = self.lookup(name)
        if params is not None and not isinstance(params, Mapping):
            raise self.error(f"{self.kind} {name!r}: parameters must be a table, got {type(params).__name__}")
        aliases: Mapping[str, str] = getattr(config_cls, "ALIASES", None) or {}
        fields = {f.name for f in dataclasses.fields(config_cls)}
        kwargs: dict[str, Any] = {}
        for key, value in dict(params or {}).items():
            field_name = aliases.get(key, key)
            if field_name not in fields:
                allowed = ", ".join(sorted(fields | set(aliases))) or "(none)"
                raise self.error(f"{self.kind} {name!r} has no parameter {key!r}; allowed: {allowed}")
            if field_name in kwargs:
                raise self.error(f"{self.kind} {name!r}: parameter {field_name!r} given twice "
                                 f"(as {key!r} and an alias)")
            kwargs[field_name] = value
        try:
            return config_cls(**kwargs)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, self.error) and self.error not in (TypeError, ValueError):
                raise
            raise self.error(f"{self.kind} {name!r}: {exc}") from None

    def build(self, name: str, params: Optional[Mapping[str, Any]] = None) -> T:
        """``factory(config)`` for ``name`` configured from ``params``."""
        _, factory = self.lookup(name)
        return factory(self.build_config(name, params))

    def config_fields(self, name: str, missing: Any = None) -> list[tuple[str, str, Any]]:
        """``(param, type, default)`` for each parameter of ``name`` (``missing`` for required ones)."""
        config_cls, _ = self.lookup(name)
        return fields_of(config_cls, missing)


__all__ = ["Registry", "fields_of"]
