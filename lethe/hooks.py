"""One small hook API: read and overwrite module inputs/outputs during a forward pass.

The pattern of ROME's ``nethook.Trace``/``TraceDict``: a context manager registers
forward hooks on named modules, keeps what they saw, optionally rewrites it, and
removes every hook on exit so the model is exactly as before. ROME, MEMIT,
causal tracing, Knowledge Neurons, MEND and RMU all read activations through it.

Modules that return tuples (transformer blocks) are handled: the first element
(the hidden state) is what is captured and what an edit function receives; the
rest of the tuple is passed through untouched.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from lethe.adapters import unwrap

EditFn = Callable[[torch.Tensor, str], torch.Tensor]


class StopForward(Exception):
    """Raised by a trace with ``stop=True`` to end the forward pass early."""


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot find a tensor in a module output of type {type(value).__name__}")


def _replace_first(value, tensor):
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    raise TypeError(f"cannot replace the tensor in a module output of type {type(value).__name__}")


def _keep(t: torch.Tensor, clone: bool, detach: bool) -> torch.Tensor:
    if detach:
        t = t.detach()
    if clone:
        t = t.clone()
    return t


class Trace(contextlib.AbstractContextManager):
    """Hook one named module.

    Args:
        model: the model (PEFT/DDP wrappers are looked through).
        layer: the module's name, e.g. ``adapter.mlp_out_name(3)``.
        retain_input / retain_output: keep the module's input / output tensor.
        edit_input / edit_output: ``fn(tensor, layer) -> tensor`` replacing it.
        clone / detach: how retained tensors are stored (clone protects against
            later in-place changes; detach drops the graph).
        stop: end the forward pass right after this module (raises StopForward,
            swallowed on exit).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_input: EditFn | None = None,
        edit_output: EditFn | None = None,
        clone: bool = False,
        detach: bool = False,
        stop: bool = False,
    ) -> None:
        self.layer = layer
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        try:
            module = unwrap(model).get_submodule(layer)
        except AttributeError as err:
            raise ValueError(f"no module named {layer!r} in {type(unwrap(model)).__name__}") from err
        self._handles = []

        def pre_hook(mod, args, kwargs):
            if args:
                x = args[0]
                key = None
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(
                    k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
                x = kwargs[key]
            if edit_input is not None:
                x = edit_input(x, layer)
                if key is None:
                    args = (x, *args[1:])
                else:
                    kwargs = {**kwargs, key: x}
            if retain_input:
                self.input = _keep(x, clone, detach)
            return args, kwargs

        def fwd_hook(mod, args, output):
            if edit_output is not None:
                output = _replace_first(output, edit_output(_first_tensor(output), layer))
            if retain_output:
                self.output = _keep(_first_tensor(output), clone, detach)
            if stop:
                raise StopForward()
            return output

        if retain_input or edit_input is not None:
            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(module.register_forward_hook(fwd_hook))
        self._stop = stop

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return self._stop and exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """Hook several modules at once; ``td[name]`` is that module's Trace."""

    def __init__(self, model: nn.Module, layers: Iterable[str], stop: bool = False, **options) -> None:
        """``options``: ``Trace``'s retain_input, retain_output, edit_input, edit_output, clone, detach."""
        super().__init__()
        layers = list(dict.fromkeys(layers))
        self._stop = stop
        try:
            for i, name in enumerate(layers):
                self[name] = Trace(model, name, stop=stop and i == len(layers) - 1, **options)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for trace in self.values():
            trace.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return self._stop and exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def restore_weights(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Snapshot parameters (all, or those whose names are given) and put them back bit-for-bit on exit.

    For trial edits: ``with restore_weights(model, [name + ".weight"]): apply; measure``.
    """
    params = dict(unwrap(model).named_parameters())
    chosen = list(params) if names is None else list(names)
    missing = [n for n in chosen if n not in params]
    if missing:
        raise ValueError(f"no parameters named {missing}")
    saved = {n: params[n].detach().clone() for n in chosen}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
