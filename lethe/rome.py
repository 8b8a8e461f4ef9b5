"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection, in all three families.

Steps for a request "{subject} ... -> target_new":

1. key k* = mean, over the bare prompt and ~20 short random prefixes, of the MLP output
   projection's input at the edit position (``compute_keys``);
2. value: δ added to the MLP output there, optimised by the family's one value optimisation
   (:func:`lethe.locate_edit.optimise_values`, MEMIT's z for a single request);
3. closed form: ΔW = δ uᵀ / (uᵀ k*), u = C⁻¹ k*, C = E[k kᵀ] in float64 (``rome_update``),
   so W' k* = W k* + δ and every key C⁻¹-orthogonal to k* keeps its value.

The same averaged k* serves u and the residual (r-ROME's consistency fix); since the projection
is linear, the mean output over the prompts is W k* + b, so the residual to write is exactly δ.

Families: decoder and masked LM edit their (only) stack (the MLM scores the target at the
mask); the encoder-decoder edits its ENCODER MLPs and is scored on the decoder's output.
Every value of a preset is in ``configs/edit/rome_*.yaml``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lethe import lm
from lethe.adapters import ArchAdapter
from lethe.covariance import solve_psd
from lethe.edits import EditArtifact, resolve_hparams
from lethe.hooks import Trace
from lethe.locate import SubjectNotFoundError
from lethe.locate_edit import (
    LocateEditHyperParams,
    LocateEditor,
    as_btd,
    check_request,
    edit_positions,
    encode_at_subject,
    optimise_values,
)
from lethe.precision import full_precision_call
from lethe.progress import Progress
from lethe.records import EditRequest

__all__ = ["ROMEEditor", "ROMEHyperParams", "SubjectNotFoundError", "compute_keys", "hparams_from", "rome_update"]


@dataclass
class ROMEHyperParams(LocateEditHyperParams):
    """ROME's knobs: the shared ones plus the one edited layer."""

    layer: int = 0


def hparams_from(spec: ROMEHyperParams | dict | str | None = None, **overrides) -> ROMEHyperParams:
    """Hyperparameters from a dict, an instance or a preset name, with overrides on top."""
    return resolve_hparams(ROMEHyperParams, "rome", spec, **overrides)


@torch.no_grad()
@full_precision_call
def compute_keys(model: nn.Module, tok, adapter: ArchAdapter, family: str, requests: Sequence[EditRequest],
                 layer: int, stack: str | None = None, prefixes: Sequence[str] = ("",),
                 position: str = "subject_last") -> torch.Tensor:
    """k* per request: the mean input of layer ``layer``'s MLP output projection at the edit position
    over ``prefixes`` (shape: requests × FFN width, float32)."""
    layer = adapter.check_layer(model, layer, stack)
    name = adapter.mlp_out_name(layer, stack)
    device = next(model.parameters()).device
    out = []
    for req in requests:
        check_request(tok, family, req)
        rows = [(p, req.prompt, req.subject, req.target_new) for p in prefixes]
        batch, pos = encode_at_subject(tok, family, rows, req.case_id)
        pos = edit_positions(batch, pos, family, position)
        batch = lm.to_device(batch, device)
        with Trace(model, name, retain_input=True, retain_output=False, stop=True) as tr:
            model(**lm.model_inputs(batch, family))
        keys = as_btd(tr.input, batch)[torch.arange(len(pos), device=device), torch.tensor(pos, device=device)]
        out.append(keys.float().mean(0))
    return torch.stack(out)


def rome_direction(k_star: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """v = C⁻¹k* / (k*ᵀC⁻¹k*) (in), float64: ROME's ΔW is δ vᵀ (C⁻¹ is the pseudo-inverse where dead neurons
    make C singular: see ``solve_psd``)."""
    k = k_star.to(torch.float64).reshape(-1, 1)
    u = solve_psd(cov.to(k.device), k)
    denom = (u.T @ k).item()
    if abs(denom) < 1e-30:
        raise ValueError("k*ᵀ C⁻¹ k* is zero: the key is null; is the subject position right?")
    return u.reshape(-1) / denom


def rome_update(k_star: torch.Tensor, delta: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """ΔW (out × in) with ΔW k* = δ and ΔW k = 0 for every k with (C⁻¹k*)ᵀ k = 0; solved in float64."""
    v = rome_direction(k_star, cov)
    return delta.to(torch.float64).reshape(-1, 1).to(v.device) @ v.reshape(1, -1)


class ROMEEditor(LocateEditor):
    """``Editor`` for ``lethe edit``: requests are applied one after another (sequential ROME)."""

    name = "rome"
    hparams_class = ROMEHyperParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_stats: list[dict] = []
        self.last_vectors: list[dict[str, torch.Tensor]] = []  # k*, δ, v₀ of the last call (for inspection)

    def edit(self, loaded, requests: Sequence[EditRequest]) -> EditArtifact:
        model, tok, adapter, family, hp = loaded.model, loaded.tokenizer, loaded.adapter, loaded.family, self.hp
        layer = adapter.check_layer(model, hp.layer, hp.stack)
        self.check_requests(loaded, requests)  # bad requests fail before anything changes
        mod_name = adapter.mlp_out_name(layer, hp.stack)
        module = adapter.module(model, mod_name)
        pname = f"{mod_name}.weight"
        cov = self.covariance(loaded, layer)
        prefixes = self.prefixes(loaded)
        before = EditArtifact.snapshot(model, [pname])
        self.last_stats, self.last_vectors = [], []
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per request: δ, v, k* (ΔW = δ vᵀ)
        bar = Progress(len(requests), "ROME edits", enabled=self.progress and len(requests) > 1)
        for req in requests:
            t0 = time.perf_counter()
            k_star = compute_keys(model, tok, adapter, family, [req], layer, hp.stack, prefixes, hp.position)[0]
            out = optimise_values(model, tok, family, [req], mod_name, hp, prefixes)
            delta, v_init = out["delta"][0], out["v_init"][0]
            v = rome_direction(k_star, cov)
            dw = delta.to(torch.float64).reshape(-1, 1).to(v.device) @ v.reshape(1, -1)
            parts.append((delta.reshape(-1).double(), v, k_star.reshape(-1).double()))
            with torch.no_grad():
                w = adapter.weight_out_in(module)
                w.add_(dw.to(w.device, w.dtype))
            self.last_vectors.append({"k_star": k_star, "delta": delta, "v_init": v_init})
            self.last_stats.append({"case_id": req.case_id, "v_loss": [h[0] for h in out["history"]],
                                    "v_steps": out["steps"][0], "delta_norm": float(delta.norm()),
                                    "update_norm": float(dw.norm()), "seconds": time.perf_counter() - t0})
            bar.update()
        bar.close()
        meta = {"hparams": dataclasses.asdict(hp), "layer": layer, "module": mod_name, "stats": self.last_stats}
        art = EditArtifact.from_weights("rome", loaded.source, before, model, requests, meta)
        factors = {pname: {key: torch.stack([p[i].cpu() for p in parts]) for i, key in enumerate(("u", "v", "k"))}}
        return art.with_factors(factors, {pname: adapter.transposed})
