"""Argument checks shared by lethe's LightningModules: one error naming the preset field."""

from __future__ import annotations


class ModuleConfigError(ValueError):
    """A LightningModule argument out of its range; the message names the preset field."""


def check_range(positive: dict | None = None, non_negative: dict | None = None) -> None:
    """Refuse out-of-range numeric arguments before anything is loaded, naming ``model.init_args.<field>``:
    ``positive`` values must be finite and > 0 (sizes), ``non_negative`` finite and >= 0 (learning rates, weights)."""
    import math

    for names, ok, what in ((positive or {}, lambda v: v > 0, "> 0"), (non_negative or {}, lambda v: v >= 0, ">= 0")):
        for name, value in names.items():
            if value is None:
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
                raise ModuleConfigError(f"model.init_args.{name}={value!r}: must be a finite number {what}")
