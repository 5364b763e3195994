"""A tiny name -> factory registry that names the valid choices when a lookup fails."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Generic, TypeVar

from sparsebench.errors import ScenarioError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes. Entries register themselves with the ``register`` decorator in
    their own module; ``load_package`` imports every module of a package once, so adding a
    pattern or a backend is adding one file."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name")
        if name in self._entries and self._entries[name] is not cls:
            raise RuntimeError(f"duplicate {self.kind} {name!r}")
        self._entries[name] = cls
        return cls

    def _load(self) -> None:
        if self._loaded:
            return
        pkg = importlib.import_module(self.package)
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not mod.name.startswith("_") and mod.name not in ("base", "geometry"):  # shared code, no entries
                importlib.import_module(f"{self.package}.{mod.name}")
        self._loaded = True

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def items(self) -> list[tuple[str, type[T]]]:
        self._load()
        return list(self._entries.items())

    def get(self, name: str) -> type[T]:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ScenarioError(unknown_choice(self.kind, name, self._entries)) from None


def unknown_choice(kind: str, value: object, choices) -> str:
    """ "unknown pattern 'x' (did you mean 'y'?); expected one of: a, b, c"."""
    choices = list(choices)
    hint = difflib.get_close_matches(str(value), choices, n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {kind} {value!r}{did}; expected one of: {', '.join(choices)}"
