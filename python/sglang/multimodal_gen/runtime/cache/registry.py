"""Classes by name: the strategies ``--cache`` selects (and the estimators, with their own
registry), so that a new one is one file plus a decorator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Sequence, TypeVar

from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError

if TYPE_CHECKING:
    from sglang.multimodal_gen.runtime.cache.strategy import TimestepCache

_Registered = TypeVar("_Registered")


class NameRegistry(Generic[_Registered]):
    """Classes by their ``name``, so a strategy or an estimator is one file plus a decorator.

    Args:
        kind: What the classes are, for messages ("cache strategy", "cache estimator").
        also_accepted: Names the user may give that mean "no class" (``none`` for strategies),
            listed in the unknown-name message.
    """

    def __init__(self, kind: str, also_accepted: Sequence[str] = ()) -> None:
        self.kind = kind
        self.also_accepted = tuple(also_accepted)
        self._classes: dict[str, type[_Registered]] = {}

    def register(self, cls: type[_Registered]) -> type[_Registered]:
        """Class decorator: make ``cls`` available by its ``name`` to the CLI, server and configs."""
        if not cls.name:
            raise TypeError(f"{cls.__qualname__} needs a non-empty `name` to be registered")
        if cls.name in self._classes and self._classes[cls.name] is not cls:
            raise TypeError(f"a {self.kind} named {cls.name!r} is already registered")
        self._classes[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests that register a class for their own use undo it with this)."""
        self._classes.pop(name, None)

    def get(self, name: Any) -> type[_Registered]:
        """The class registered as ``name``, or one line listing the choices."""
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            known = ", ".join([*self.also_accepted, *self.names()])
            raise CacheConfigError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)


_REGISTRY: NameRegistry[TimestepCache] = NameRegistry("cache strategy", also_accepted=("none",))


def register_cache(cls: type[TimestepCache]) -> type[TimestepCache]:
    """Class decorator: make a strategy available by its ``name`` to the CLI, server and registry."""
    return _REGISTRY.register(cls)


def get_cache_class(name: str) -> type[TimestepCache]:
    return _REGISTRY.get(name)


def registered_caches() -> list[str]:
    return _REGISTRY.names()
