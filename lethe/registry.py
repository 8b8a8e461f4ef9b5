"""Names to things, one way: editors, unlearning objectives, subcommands, default callbacks.

A registry maps a short name to an object or to an import path (``"module:attr"`` or
``"module.attr"``), imported on first use. lethe's core refers to classes of the outer packages
(``lightning_modules``, ``datamodules``, ``callbacks``) only this way, by path, exactly as a YAML
preset's ``class_path`` does, so no arrow in the import graph points out of ``lethe/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any


def import_object(target: str) -> Any:
    """The object at ``"module:attr"`` or ``"module.attr"``."""
    if ":" in target:
        module, attr = target.split(":", 1)
    elif "." in target:
        module, attr = target.rsplit(".", 1)
    else:
        raise ValueError(f"{target!r} is not an import path (module:name or module.name)")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ValueError(f"cannot import {target!r}: no module {err.name!r}") from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise ValueError(f"cannot import {target!r}: {module} has no {attr!r}") from err
    return obj


class Registry:
    """A named table of objects (or import paths to them). ``what`` names the kind in error messages."""

    def __init__(self, what: str, entries: dict[str, Any] | None = None) -> None:
        self.what = what
        self._entries: dict[str, Any] = dict(entries or {})

    def register(self, name: str, obj: Any = None) -> Callable:
        """``registry.register("npo", NPO)``, or as a decorator: ``@registry.register("npo")``."""
        def add(o: Any) -> Any:
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> Any:
        """The entry ``name`` (imported on first use); an import path that is not registered works too."""
        if name in self._entries:
            obj = self._entries[name]
            if isinstance(obj, str):
                obj = self._entries[name] = import_object(obj)
            return obj
        if ":" in name or "." in name:
            return import_object(name)
        raise ValueError(f"unknown {self.what} {name!r}; registered: {sorted(self._entries)} "
                         "(or give an import path, module:name)")

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)
