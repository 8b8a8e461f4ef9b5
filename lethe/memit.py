"""MEMIT (Meng et al., 2023, "Mass-Editing Memory in a Transformer"): thousands of facts in one call.

For requests "{subject} ... -> target_new" and edited layers R = [l_1 < ... < l_m]:

1. target z_i per request at the residual stream (block output) of the LAST edited layer l_m, at
   the subject's last token: z_i = h_i + δ_i with δ_i from the same value optimisation as ROME's
   (:func:`lethe.locate_edit.optimise_values`), ``z_batch_size`` requests at a time;
2. for each edited layer l in order, on the CURRENT (already partly edited) model: keys K
   (the input of layer l's MLP output projection at the subject's last token, averaged over
   the prefixes) and the residual still missing at l_m, R = z - h(l_m); that layer takes its
   share R / (layers remaining) through the least-squares update

       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹        (float64; C = E[k kᵀ] from the covariance cache)

   which minimises ‖ΔW K - R‖² + λ tr(ΔW C ΔWᵀ): the new keys get their values while the
   keys the model usually sees (weighed by C) keep theirs.

Phrasings (``edit_prompts: n``): a request may carry further templates of the same fact
(``EditRequest.edit_prompts``; lethe's world fills them with the fact's other training phrasings,
never the held-out paraphrases it is scored on); each of up to n of them becomes one more row with
its own key and z, so the edit is written where those phrasings look the fact up. With the
prediction-position edits of lethe's world decoder this is what makes an edit reach its paraphrases.

Keys, residuals and z are averages over the same prefixed prompts everywhere (the r-ROME
consistency fix, which the reference code lacked). Memory stays bounded with thousands of
edits: requests pass in batches (``z_batch_size`` for δ, ``key_batch_size`` for K and R), and
the solve only ever holds FFN-width × FFN-width matrices.

The update of step 2 is one overridable method, ``MEMITEditor.update_step``: successors that keep
MEMIT's targets and keys but solve for ΔW differently (AlphaEdit's null-space projection, EMMET,
PMET) are small subclasses that override it. It returns the per-request input directions V
(n × in) with ΔW = Rᵀ V = Σ_j r_j v_jᵀ, so every layer's update is a sum of one rank-one part per
request; the artifact keeps those parts (r_j, v_j and the key k_j), which lets a stream take back
single edits (``EditArtifact.rollback``) and AlphaEdit carry its earlier edits' keys across calls.

Families: as ROME. Decoders and masked LMs edit their stack at the subject's last token (the
MLM is scored at the mask); encoder-decoders edit their ENCODER MLPs, scored on the decoder.
Every value of a preset is in ``configs/edit/memit_*.yaml``; for lethe's small models the layers
come from causal tracing (``lethe trace``; see ``lethe.tracing.suggest_layers``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lethe import lm
from lethe.adapters import ArchAdapter, LayerIndexError
from lethe.covariance import solve_psd
from lethe.edits import EditArtifact, resolve_hparams
from lethe.hooks import Trace
from lethe.locate_edit import (
    LocateEditHyperParams,
    LocateEditor,
    as_btd,
    edit_positions,
    encode_at_subject,
    group_mean,
    optimise_values,
    request_rows,
)
from lethe.memory import release as release_memory
from lethe.precision import full_precision_call
from lethe.progress import Progress
from lethe.records import EditRequest


@dataclass
class MEMITHyperParams(LocateEditHyperParams):
    """MEMIT's knobs: the shared ones (MEMIT's defaults for three of them) plus its layers and solve."""

    layers: list[int] = field(default_factory=lambda: [0, 1])
    v_steps: int = 25
    clamp_norm_factor: float = 0.75
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 10]])
    mom2_update_weight: float = 15000.0  # λ
    edit_prompts: int = 0  # also write each edit at up to this many of its request's edit_prompts (other phrasings)
    z_batch_size: int = 32  # requests whose δ are optimised together
    key_batch_size: int = 64  # requests per forward when computing K and R


def hparams_from(spec: MEMITHyperParams | dict | str | None = None, **overrides) -> MEMITHyperParams:
    """Hyperparameters from a dict, an instance or a preset name, with overrides on top."""
    return resolve_hparams(MEMITHyperParams, "memit", spec, **overrides)


def with_phrasings(requests: Sequence[EditRequest], n: int) -> list[EditRequest]:
    """Each request, followed by copies at up to ``n`` of its ``edit_prompts`` (same subject, target and case id):
    the edit is then written at several phrasings of the fact, each its own key and target z."""
    out: list[EditRequest] = []
    for r in requests:
        out.append(r)
        out += [dataclasses.replace(r, prompt=t) for t in r.edit_prompts[:n]]
    return out


def check_layers(model: nn.Module, adapter: ArchAdapter, layers: Sequence[int], stack: str | None) -> list[int]:
    """The edited layers, validated (each in range, no repeats) and in ascending order."""
    if not layers:
        raise LayerIndexError("MEMIT needs at least one layer to edit (hparams.layers is empty)")
    out = sorted(adapter.check_layer(model, int(i) if not isinstance(i, bool) else i, stack) for i in layers)
    if len(set(out)) != len(out):
        raise LayerIndexError(f"MEMIT layers {list(layers)} name a layer twice")
    return out


# --------------------------------------------------------------------------- the update
def memit_directions(keys: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """V (n × in) = K (λC + KᵀK)⁻¹ for keys K (n × in), in float64: MEMIT's ΔW is Rᵀ V."""
    k = keys.to(torch.float64)
    return solve_psd(lam * cov.to(torch.float64).to(k.device) + k.T @ k, k.T).T


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔW (out × in) = Rᵀ K (λC + KᵀK)⁻¹ for keys K (n × in) and residuals R (n × out), in float64.

    It solves the normal equations ΔW (λC + KᵀK) = Rᵀ K of min ‖K ΔWᵀ - R‖² + λ tr(ΔW C ΔWᵀ).
    """
    v = memit_directions(keys, cov, lam)
    return resid.to(torch.float64).to(v.device).T @ v


# --------------------------------------------------------------------------- batched passes
@torch.no_grad()
@full_precision_call
def keys_and_outputs(model: nn.Module, tok, adapter: ArchAdapter, family: str, requests: Sequence[EditRequest],
                     layer: int, out_layer: int, stack: str | None = None, prefixes: Sequence[str] = ("",),
                     batch_size: int = 64, position: str = "subject_last") -> tuple[torch.Tensor, torch.Tensor]:
    """Per request, averaged over ``prefixes`` at the subject's last token: the key at ``layer`` (input of its
    MLP output projection) and the residual stream (block output) at ``out_layer`` ≥ ``layer``; one forward
    per ``batch_size`` requests, stopped after ``out_layer``."""
    key_name = adapter.mlp_out_name(layer, stack)
    out_name = adapter.block_name(out_layer, stack)
    device = next(model.parameters()).device
    keys, outs = [], []
    was_training = model.training
    model.eval()
    for s in range(0, len(requests), batch_size):
        chunk = requests[s:s + batch_size]
        rows, owner, _ = request_rows(chunk, prefixes)
        batch, pos = encode_at_subject(tok, family, rows)
        pos = edit_positions(batch, pos, family, position)
        batch = lm.to_device(batch, device)
        idx = torch.arange(len(rows), device=device)
        pos_t = torch.tensor(pos, device=device)
        own = torch.tensor(owner, device=device)
        with Trace(model, key_name, retain_input=True, retain_output=False) as tk, \
                Trace(model, out_name, retain_output=True, stop=True) as to:
            model(**lm.model_inputs(batch, family))
        keys.append(group_mean(as_btd(tk.input, batch)[idx, pos_t].float(), own, len(chunk)))
        outs.append(group_mean(as_btd(to.output, batch)[idx, pos_t].float(), own, len(chunk)))
    model.train(was_training)
    return torch.cat(keys), torch.cat(outs)


# --------------------------------------------------------------------------- the editor
class MEMITEditor(LocateEditor):
    """``Editor`` for ``lethe edit`` and the benchmark: all requests of a call are written at once."""

    name = "memit"
    hparams_class = MEMITHyperParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_stats: dict = {}

    def validate(self, loaded, requests: Sequence[EditRequest]) -> list[int]:
        """Everything that can be wrong with the input, checked before any weight changes."""
        layers = check_layers(loaded.model, loaded.adapter, self.hp.layers, self.hp.stack)
        self.check_requests(loaded, requests)
        return layers

    def update_step(self, loaded, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """Per-request input directions V (n × in, float64) such that layer ``layer`` adds ΔW = Rᵀ V for keys K
        (n × in) and its share R of the residual (n × out). MEMIT's least-squares solve; subclasses (AlphaEdit,
        EMMET, PMET) override this alone."""
        return memit_directions(keys, self.covariance(loaded, layer), self.hp.mom2_update_weight)

    def edit(self, loaded, requests: Sequence[EditRequest]) -> EditArtifact:
        model, tok, adapter, family, hp = loaded.model, loaded.tokenizer, loaded.adapter, loaded.family, self.hp
        requests = with_phrasings(requests, hp.edit_prompts)
        layers = self.validate(loaded, requests)
        for layer in layers:  # computed (or read from the cache) before anything changes
            self.covariance(loaded, layer)
        prefixes = self.prefixes(loaded)
        last = layers[-1]
        z_module = adapter.block_name(last, hp.stack)
        names = {layer: adapter.mlp_out_name(layer, hp.stack) for layer in layers}
        before = EditArtifact.snapshot(model, [f"{names[layer]}.weight" for layer in layers])
        t0 = time.perf_counter()

        zs, losses, steps, batch_seconds = [], [], [], []
        bar = Progress(len(requests), "MEMIT targets z (requests)", enabled=self.progress)
        for s in range(0, len(requests), max(1, hp.z_batch_size)):
            tb = time.perf_counter()
            out = optimise_values(model, tok, family, requests[s:s + hp.z_batch_size], z_module, hp, prefixes)
            batch_seconds.append(time.perf_counter() - tb)
            zs.append(out["delta"])
            release_memory()  # each batch's graph is gone; do not let the heap keep its high-water mark
            losses += out["loss"]
            steps += out["steps"]
            bar.update(len(out["steps"]))
        bar.close()
        deltas = torch.cat(zs)
        t_z = time.perf_counter() - t0

        layer_stats = []
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for i, layer in enumerate(layers):
            keys, cur = keys_and_outputs(model, tok, adapter, family, requests, layer, last, hp.stack, prefixes,
                                         hp.key_batch_size, hp.position)
            release_memory()
            if i == 0:  # z = the unedited output, read in full precision (whatever the steps ran in), + δ
                z = cur + deltas.to(cur.device)
            resid = (z - cur).to(torch.float64) / (len(layers) - i)
            v = self.update_step(loaded, layer, keys, resid)
            dw = resid.to(v.device).T @ v
            factors[f"{names[layer]}.weight"] = {"u": resid, "v": v, "k": keys}
            module = adapter.module(model, names[layer])
            with torch.no_grad():
                w = adapter.weight_out_in(module)
                w.add_(dw.to(w.device, w.dtype))
            layer_stats.append({"layer": layer, "residual_norm": float((z - cur).norm(dim=-1).mean()),
                                "update_norm": float(dw.norm()), "key_norm": float(keys.norm(dim=-1).mean())})
        _, final = keys_and_outputs(model, tok, adapter, family, requests, layers[0], last, hp.stack, prefixes,
                                    hp.key_batch_size, hp.position)
        self.last_stats = {
            "layers": layers, "n_requests": len(requests), "z_seconds": t_z, "z_batch_seconds": batch_seconds,
            "seconds": time.perf_counter() - t0, "z_final_nll_mean": float(torch.tensor(losses).nanmean()),
            "z_steps_mean": sum(steps) / len(steps), "per_layer": layer_stats,
            # share of the residual z - h still missing after all layers (0 = every z reached exactly)
            "residual_left": float((z - final).norm(dim=-1).mean()) / max(layer_stats[0]["residual_norm"], 1e-12),
        }
        meta = {"hparams": dataclasses.asdict(hp), "layers": layers, "modules": list(names.values()),
                "stats": self.last_stats}
        art = EditArtifact.from_weights(self.name, loaded.source, before, model, requests, meta)
        return art.with_factors(factors, {n: adapter.transposed for n in factors})
