"""One precision vocabulary for every lethe command: Lightning's (``32``, ``bf16-mixed``, ``bf16-true``).

- ``lethe fit`` and ``lethe edit`` are Lightning jobs: ``--trainer.precision`` sets it, and Lightning wraps each
  step (an edit runs in ``test_step``) in autocast.
- ``lethe attribute``, ``lethe trace`` and ``lethe evaluate`` take ``--precision`` and use :func:`autocast`.

``bf16-mixed`` runs matrix products in bfloat16 (this CPU's AMX units, a GPU's tensor cores) and keeps weights,
optimiser state and reductions in float32. What stays in full precision whatever the setting, inside
:func:`full_precision`:

- the covariance statistics C = E[k kᵀ] (cached on disk and shared by every run, so they do not depend on it);
- the keys k* and the unedited model's outputs that ROME / MEMIT / AlphaEdit solve with;
- every closed-form solve (C⁻¹, MEMIT's normal equations, AlphaEdit's projection), in float64.

Only the value optimisation (the many forward/backward passes for δ) and read-only scoring passes run in bf16.
``bf16-true`` (weights cast to bfloat16) is refused by ``lethe edit``: bfloat16 keeps 8 significant bits, so a
rank-one update smaller than ~0.4 % of a weight would be rounded away.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("32", "bf16-mixed", "bf16-true")
_ALIASES = {"32-true": "32", "32": "32", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true", "bf16": "bf16-mixed"}


def check(precision: str | int, where: str = "--precision") -> str:
    """The canonical name of ``precision``, or one clear error listing the choices."""
    name = _ALIASES.get(str(precision))
    if name is None:
        raise ValueError(f"{where} {precision!r}: use one of {', '.join(PRECISIONS)}")
    return name


def autocast(precision: str | int, device: torch.device | str = "cpu"):
    """The context a read-only or optimisation pass runs in: bf16 autocast for ``bf16-mixed``, nothing else.

    Autocast's weight cache is off: it keeps the bf16 copy of each weight made at its first use in the region,
    so a weight an edit changes in place would be read stale by every later pass in the same region.
    """
    device_type = torch.device(device).type
    if check(precision) == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def fresh_weights(device: torch.device | str = "cpu"):
    """Inside someone else's autocast region (Lightning's ``bf16-mixed`` step), read weights afresh at every use:
    the same autocast, with its weight cache off (see :func:`autocast`). Nothing when autocast is off."""
    device_type = torch.device(device).type
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


@contextlib.contextmanager
def cast_frozen_weights(model: torch.nn.Module):
    """Inside an autocast region whose weights do not change (value optimisation, integrated gradients,
    scoring), cast each matrix weight to the autocast dtype once, instead of once per use.

    Autocast casts a weight at every matmul (its cache keeps only weights that require gradients, and is off
    in :func:`autocast`); on SmolLM2's value optimisation those casts were 22 % of the time. The copies hold
    the very values autocast would have made, so the results are bit-identical. Every 2-D floating weight of
    a module other than an embedding is swapped for its copy for the duration of the block and restored
    (the same ``Parameter`` objects, so tied weights stay tied). Nothing happens outside autocast.
    """
    device_type = next(model.parameters()).device.type
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    swapped = []
    try:
        for module in model.modules():
            w = module._parameters.get("weight") if not isinstance(module, torch.nn.Embedding) else None
            if w is None or w.dim() != 2 or not w.is_floating_point() or w.dtype == dtype or w.requires_grad:
                continue
            module._parameters["weight"] = torch.nn.Parameter(w.detach().to(dtype), requires_grad=False)
            swapped.append((module, w))
        yield
    finally:
        for module, w in swapped:
            module._parameters["weight"] = w


def full_precision(device: torch.device | str = "cpu"):
    """Switch any surrounding autocast off (statistics, keys and closed-form solves)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def prepare_model(model: torch.nn.Module, precision: str | int) -> torch.nn.Module:
    """``bf16-true`` casts the (read-only) model to bfloat16; the other settings leave it as it is."""
    if check(precision) == "bf16-true":
        return model.to(torch.bfloat16)
    return model


def full_precision_call(fn):
    """Decorator: ``fn`` runs in full precision whatever autocast surrounds it (statistics and keys)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with full_precision("cpu"), (full_precision("cuda") if torch.cuda.is_available() else contextlib.nullcontext()):
            return fn(*args, **kwargs)

    return wrapper
