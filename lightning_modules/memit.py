"""MEMIT (Meng et al., 2023, "Mass-Editing Memory in a Transformer"): thousands of facts in one call.

For requests "{subject} ... -> target_new" and edited layers R = [l_1 < ... < l_m]:

1. target z_i per request at the residual stream (block output) of the LAST edited layer l_m, at
   the subject's last token: z_i = h_i + δ_i with δ_i optimised exactly as ROME's value (target
   NLL over ~10 short prefixes + KL on "{subject} is a" + weight decay, ‖δ‖ ≤ clamp·‖h‖), but for
   a batch of requests at once (``z_batch_size``): each δ_i only meets its own rows' losses,
   and Adam is element-wise, so the batch equals optimising each request alone;
2. for each edited layer l in order, on the CURRENT (already partly edited) model: keys K
   (the input of layer l's MLP output projection at the subject's last token, averaged over
   the prefixes) and the residual still missing at l_m, R = z - h(l_m); that layer takes its
   share R / (layers remaining) through the least-squares update

       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹        (float64; C = E[k kᵀ] from the covariance cache)

   which minimises ‖ΔW K - R‖² + λ tr(ΔW C ΔWᵀ): the new keys get their values while the
   keys the model usually sees (weighed by C) keep theirs.

Keys, residuals and z are averages over the same prefixed prompts everywhere (the r-ROME
consistency fix, which the reference code lacked). Memory stays bounded with thousands of
edits: requests pass in batches (``z_batch_size`` for δ, ``key_batch_size`` for K and R), and
the solve only ever holds FFN-width × FFN-width matrices.

Families: as ROME. Decoders and masked LMs edit their stack at the subject's last token (the
MLM is scored at the mask); encoder-decoders edit their ENCODER MLPs, scored on the decoder.
Published defaults are in ``PRESETS``; for lethe's small models the layers come from causal
tracing (``lethe trace``; see ``lethe.tracing.suggest_layers``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lethe import lm
from lethe.adapters import ArchAdapter, LayerIndexError, unwrap
from lethe.covariance import layer_covariance, solve_psd
from lethe.edits import EditArtifact, resolve_hparams
from lethe.hooks import Trace
from lethe.records import EditRequest
from lightning_modules.rome import (
    _first_label_positions,
    as_btd,
    check_target,
    context_prefixes,
    edit_positions,
    encode_at_subject,
    fill,
    subject_last_index,
)


@dataclass
class MEMITHyperParams:
    """MEMIT's knobs; ``PRESETS`` holds the paper's values for GPT-2 XL and GPT-J."""

    layers: list[int] = field(default_factory=lambda: [0, 1])
    stack: str | None = None  # default: the decoder of a decoder-only model, the encoder otherwise
    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    kl_prompts: list[str] = field(default_factory=lambda: ["{} is a"])
    context_templates: list[list[int]] = field(default_factory=lambda: [[10, 10]])
    context_source: str = "auto"
    mom2_corpus: str | list[str] = "pydoc"
    mom2_n_samples: int = 100000
    mom2_max_length: int = 128
    mom2_batch_size: int = 8
    mom2_update_weight: float = 15000.0  # λ
    # where keys and z are read: "subject_last" (the papers) or "prompt_last" (the prediction position:
    # decoder's last prompt token, MLM's first mask, seq2seq's last source token) for models whose causal
    # trace shows the fact looked up there rather than at the subject (lethe's tiny world decoder)
    position: str = "subject_last"
    z_batch_size: int = 32  # requests whose δ are optimised together
    key_batch_size: int = 64  # requests per forward when computing K and R
    seed: int = 0


PRESETS: dict[str, dict] = {
    # Meng et al. 2023, hparams/MEMIT/gpt2-xl.json and EleutherAI_gpt-j-6B.json (C from Wikipedia there).
    "gpt2-xl": {"layers": [13, 14, 15, 16, 17], "clamp_norm_factor": 0.75, "mom2_update_weight": 20000.0,
                "v_lr": 0.5, "v_steps": 20, "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_n_samples": 100000},
    "gpt-j": {"layers": [3, 4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "mom2_update_weight": 15000.0,
              "v_lr": 0.5, "v_steps": 25, "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_n_samples": 100000},
    # lethe's small models: layers from causal tracing (benchmarks/results/trace_*), λ tuned on the world.
    # The world decoder looks facts up at the prediction position (its causal trace,
    # benchmarks/results/trace_world_decoder: MLP/attention of layer 0 at the last token; the subject's own
    # states matter little), so it is edited there, from the bare prompt (prefixes move that key). All four
    # blocks give the capacity 1,000 edits need; λ from a sweep (1, 3, 10, 30, 300) at 100 and 1,000 edits.
    "world-decoder": {"layers": [0, 1, 2, 3], "mom2_corpus": "world", "mom2_n_samples": 4000,
                      "position": "prompt_last", "context_templates": [], "clamp_norm_factor": 4.0,
                      "mom2_update_weight": 10.0},
    # The world MLM and the T5 encoder keep the fact at the subject's last token (their traces), as in the papers.
    "world-mlm": {"layers": [0, 1], "mom2_corpus": "world", "mom2_n_samples": 4000, "context_templates": [],
                  "clamp_norm_factor": 4.0, "mom2_update_weight": 10.0},
    "world-seq2seq": {"layers": [0, 1], "stack": "encoder", "mom2_corpus": "world", "mom2_n_samples": 4000,
                      "context_templates": [], "clamp_norm_factor": 4.0, "mom2_update_weight": 10.0},
    # SmolLM2 (30 blocks): its trace (benchmarks/results/trace_smollm2, 12 real facts) shows the subject's residual
    # carrying the fact through layer ~20, MLP 0 acting as an extended embedding (every window holding it restores
    # ~100%; excluded, as in the papers), and past it the windowed MLP effect at the subject's last token at
    # 0.15-0.25 for layers 4-8 (peak 5), falling below 0.06 from layer 10; five layers as for GPT-2 XL, 3-7.
    # λ from a sweep on 32 real facts (z computed once): 15000 (GPT-J's) efficacy 0.13, 5000 0.88 / neighbourhood
    # 0.89, 1500 1.0 / 0.79, 500 1.0 / 0.74; C here is a 1536-wide key space from 400 texts, not GPT-J's 16384 from
    # Wikipedia, so the paper's weight over-regularises. K^T K grows with the edit count, so 3000 is for batches of
    # ~100: 100 real facts in one call, efficacy 0.92 / paraphrase 0.77 / neighbourhood 0.92
    # (benchmarks/results/memit.json).
    "smollm2": {"layers": [3, 4, 5, 6, 7], "mom2_corpus": "tofu+pydoc", "mom2_n_samples": 400,
                "context_source": "generate", "context_templates": [[5, 10]], "v_steps": 20, "z_batch_size": 8,
                "mom2_update_weight": 3000.0},
}


def hparams_from(spec: MEMITHyperParams | dict | str | None = None, **overrides) -> MEMITHyperParams:
    """Hyperparameters from a preset name, a dict, or an instance, with overrides on top."""
    return resolve_hparams(MEMITHyperParams, PRESETS, "MEMIT", spec, **overrides)


def check_layers(model: nn.Module, adapter: ArchAdapter, layers: Sequence[int], stack: str | None) -> list[int]:
    """The edited layers, validated (each in range, no repeats) and in ascending order."""
    if not layers:
        raise LayerIndexError("MEMIT needs at least one layer to edit (hparams.layers is empty)")
    out = sorted(adapter.check_layer(model, int(i) if not isinstance(i, bool) else i, stack) for i in layers)
    if len(set(out)) != len(out):
        raise LayerIndexError(f"MEMIT layers {list(layers)} name a layer twice")
    return out


# --------------------------------------------------------------------------- the update
def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔW (out × in) = Rᵀ K (λC + KᵀK)⁻¹ for keys K (n × in) and residuals R (n × out), in float64.

    It solves the normal equations ΔW (λC + KᵀK) = Rᵀ K of min ‖K ΔWᵀ - R‖² + λ tr(ΔW C ΔWᵀ).
    """
    k = keys.to(torch.float64)
    r = resid.to(torch.float64).to(k.device)
    return solve_psd(lam * cov.to(torch.float64).to(k.device) + k.T @ k, k.T @ r).T


# --------------------------------------------------------------------------- batched passes
def _rows(requests: Sequence[EditRequest], prefixes: Sequence[str], kl_prompts: Sequence[str] = ()):
    """(prefix, prompt, subject, target) rows of each request, with each row's owner and whether it is KL."""
    rows, owner, is_kl = [], [], []
    for i, req in enumerate(requests):
        for p in prefixes:
            rows.append((p, req.prompt, req.subject, req.target_new))
            owner.append(i)
            is_kl.append(False)
        for kp in kl_prompts:
            rows.append(("", kp, req.subject, req.target_new))
            owner.append(i)
            is_kl.append(True)
    return rows, owner, is_kl


def _group_mean(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, values.shape[-1], dtype=values.dtype, device=values.device)
    out.index_add_(0, owner, values)
    counts = torch.bincount(owner, minlength=n).clamp(min=1).to(values.dtype)
    return out / counts[:, None]


@torch.no_grad()
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
        rows, owner, _ = _rows(chunk, prefixes)
        batch, pos = encode_at_subject(tok, family, rows)
        pos = edit_positions(batch, pos, family, position)
        batch = lm.to_device(batch, device)
        idx = torch.arange(len(rows), device=device)
        pos_t = torch.tensor(pos, device=device)
        own = torch.tensor(owner, device=device)
        with Trace(model, key_name, retain_input=True, retain_output=False) as tk, \
                Trace(model, out_name, retain_output=True, stop=True) as to:
            model(**lm.model_inputs(batch, family))
        keys.append(_group_mean(as_btd(tk.input, batch)[idx, pos_t].float(), own, len(chunk)))
        outs.append(_group_mean(as_btd(to.output, batch)[idx, pos_t].float(), own, len(chunk)))
    model.train(was_training)
    return torch.cat(keys), torch.cat(outs)


def compute_z(model: nn.Module, tok, adapter: ArchAdapter, family: str, requests: Sequence[EditRequest],
              module_name: str, hp: MEMITHyperParams, prefixes: Sequence[str] = ("",)) -> dict:
    """Target outputs z = v₀ + δ of ``module_name`` at the subject's last token, δ per request optimised in one
    batch (ROME's value loss per request; requests under ``early_stop_loss`` are frozen and leave the batch).

    Returns ``{"z", "delta", "v_init"}`` (n × width) and per-request ``"loss"`` (final NLL) and ``"steps"``.
    """
    device = next(model.parameters()).device
    n = len(requests)
    rows, owner, is_kl = _rows(requests, prefixes, hp.kl_prompts)
    batch, pos = encode_at_subject(tok, family, rows)
    pos = edit_positions(batch, pos, family, hp.position)
    batch = lm.to_device(batch, device)
    pos_t = torch.tensor(pos, device=device)
    own = torch.tensor(owner, device=device)
    kl_mask = torch.tensor(is_kl, device=device)
    first = _first_label_positions(batch["labels"], family)
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # only δ needs gradients: no graph through the weights
        p.requires_grad_(False)
    try:
        with torch.no_grad(), Trace(model, module_name, retain_output=True) as tr:
            logits = lm.forward_logits(model, batch, family)
            out = as_btd(tr.output, batch)
            rw = ~kl_mask
            all_rows = torch.arange(len(rows), device=device)
            v_init = _group_mean(out[all_rows[rw], pos_t[rw]].float(), own[rw], n)
            lg, _ = lm.aligned(logits, batch["labels"], family)
            kl_init = torch.log_softmax(lg[all_rows, first].float(), -1)  # used on the KL rows only
            width = out.shape[-1]
        del logits, lg, out
        delta = torch.zeros(n, width, device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        max_norm = hp.clamp_norm_factor * v_init.norm(dim=-1)
        v_norm2 = v_init.norm(dim=-1).clamp(min=1e-8) ** 2
        active = torch.ones(n, dtype=torch.bool, device=device)
        last_nll = torch.full((n,), float("nan"), device=device)
        steps = torch.zeros(n, dtype=torch.long)
        n_kl = torch.bincount(own[kl_mask], minlength=n).clamp(min=1).float()
        n_rw = torch.bincount(own[~kl_mask], minlength=n).clamp(min=1).float()
        for _ in range(hp.v_steps):
            sel = active[own].nonzero().squeeze(-1)
            sub = {k: v[sel] for k, v in batch.items()}
            s_own, s_pos, s_kl = own[sel], pos_t[sel], kl_mask[sel]
            s_idx = torch.arange(len(sel), device=device)

            def add_delta(x: torch.Tensor, _name: str, sub=sub, s_own=s_own, s_pos=s_pos, s_idx=s_idx):
                view = as_btd(x, sub).clone()
                view[s_idx, s_pos] = view[s_idx, s_pos] + delta[s_own].to(view.dtype)
                return view.view(x.shape)

            with torch.enable_grad(), Trace(model, module_name, retain_output=False, edit_output=add_delta):
                logits = lm.forward_logits(model, sub, family)
                tok_lp, mask = lm.token_logprobs(logits, sub["labels"], family)
                row_nll = -tok_lp.sum(-1) / mask.sum(-1).clamp(min=1)
                lg, _ = lm.aligned(logits, sub["labels"], family)
                new_lp = torch.log_softmax(lg[s_idx, first[sel]].float(), -1)
                old_lp = kl_init[sel]
                row_kl = (new_lp.exp() * (new_lp - old_lp)).sum(-1)  # KL(new ‖ original), per row
                nll = torch.zeros(n, device=device).index_add(0, s_own[~s_kl], row_nll[~s_kl]) / n_rw
                kl = torch.zeros(n, device=device).index_add(0, s_own[s_kl], row_kl[s_kl]) / n_kl
                decay = hp.v_weight_decay * delta.norm(dim=-1) / v_norm2
                loss = ((nll + hp.kl_factor * kl + decay) * active.clone()).sum()
            with torch.no_grad():
                last_nll[active] = nll.detach()[active]
                steps[active.cpu()] += 1
                active &= ~(last_nll < hp.early_stop_loss)
            if not bool(active.any()):
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            kept = delta.detach().clone()
            delta.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                delta[~active] = kept[~active]  # frozen requests do not drift with Adam's momentum
                norms = delta.norm(dim=-1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    d = delta.detach()
    return {"z": v_init + d, "delta": d, "v_init": v_init, "loss": last_nll.tolist(), "steps": steps.tolist()}


# --------------------------------------------------------------------------- the editor
class MEMITEditor:
    """``Editor`` for ``lethe edit`` and the benchmark: all requests of a call are written at once."""

    name = "memit"

    def __init__(self, hparams: MEMITHyperParams | dict | str | None = None, cache_dir: str | None = None,
                 progress: bool = True, overrides: dict | None = None) -> None:
        self.hp = hparams_from(hparams, **(overrides or {}))
        self.cache_dir = cache_dir
        self.progress = progress
        self._prefixes: dict[int, list[str]] = {}
        self._cov: dict[tuple, torch.Tensor] = {}
        self.last_stats: dict = {}

    def covariance(self, loaded, layer: int) -> torch.Tensor:
        hp = self.hp
        corpus_key = hp.mom2_corpus if isinstance(hp.mom2_corpus, str) else tuple(hp.mom2_corpus)
        key = (id(unwrap(loaded.model)), layer, hp.stack, corpus_key, hp.mom2_n_samples, hp.mom2_max_length)
        if key not in self._cov:
            self._cov[key] = layer_covariance(
                loaded.model, loaded.tokenizer, loaded.adapter, loaded.family, layer, hp.stack,
                corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples, max_length=hp.mom2_max_length,
                batch_size=hp.mom2_batch_size, source=loaded.source, cache_dir=self.cache_dir,
                progress=self.progress)
        return self._cov[key]

    def prefixes(self, loaded) -> list[str]:
        key = id(unwrap(loaded.model))
        if key not in self._prefixes:
            self._prefixes[key] = context_prefixes(loaded.model, loaded.tokenizer, loaded.family,
                                                   self.hp.context_templates, self.hp.context_source,
                                                   self.hp.mom2_corpus, self.hp.seed)
        return self._prefixes[key]

    def validate(self, loaded, requests: Sequence[EditRequest]) -> list[int]:
        """Everything that can be wrong with the input, checked before any weight changes."""
        hp, model, adapter, family = self.hp, loaded.model, loaded.adapter, loaded.family
        if not requests:
            raise ValueError("MEMIT got an empty list of edit requests: nothing to edit")
        if family == "seq2seq" and (hp.stack or "encoder") != "encoder":
            raise ValueError("MEMIT edits a seq2seq model's encoder MLPs (stack='encoder')")
        layers = check_layers(model, adapter, hp.layers, hp.stack)
        for req in requests:
            check_target(loaded.tokenizer, family, req)
            text, a, b = fill("", req.prompt, req.subject, req.case_id)
            subject_last_index(loaded.tokenizer, text, a, b, req.case_id)
        return layers

    def edit(self, loaded, requests: Sequence[EditRequest]) -> EditArtifact:
        from tqdm.auto import tqdm

        model, tok, adapter, family, hp = loaded.model, loaded.tokenizer, loaded.adapter, loaded.family, self.hp
        requests = list(requests)
        layers = self.validate(loaded, requests)
        covs = {layer: self.covariance(loaded, layer) for layer in layers}
        prefixes = self.prefixes(loaded)
        last = layers[-1]
        z_module = adapter.block_name(last, hp.stack)
        names = {layer: adapter.mlp_out_name(layer, hp.stack) for layer in layers}
        before = EditArtifact.snapshot(model, [f"{names[layer]}.weight" for layer in layers])
        t0 = time.perf_counter()

        zs, losses, steps = [], [], []
        chunks = range(0, len(requests), max(1, hp.z_batch_size))
        for s in tqdm(chunks, desc="MEMIT z", disable=not self.progress, leave=False):
            out = compute_z(model, tok, adapter, family, requests[s:s + hp.z_batch_size], z_module, hp, prefixes)
            zs.append(out["z"])
            losses += out["loss"]
            steps += out["steps"]
        z = torch.cat(zs)
        t_z = time.perf_counter() - t0

        layer_stats = []
        for i, layer in enumerate(tqdm(layers, desc="MEMIT layers", disable=not self.progress, leave=False)):
            keys, cur = keys_and_outputs(model, tok, adapter, family, requests, layer, last, hp.stack, prefixes,
                                         hp.key_batch_size, hp.position)
            resid = (z - cur) / (len(layers) - i)
            dw = memit_update(keys, resid, covs[layer], hp.mom2_update_weight)
            module = adapter.module(model, names[layer])
            with torch.no_grad():
                w = adapter.weight_out_in(module)
                w.add_(dw.to(w.device, w.dtype))
            layer_stats.append({"layer": layer, "residual_norm": float((z - cur).norm(dim=-1).mean()),
                                "update_norm": float(dw.norm()), "key_norm": float(keys.norm(dim=-1).mean())})
        _, final = keys_and_outputs(model, tok, adapter, family, requests, layers[0], last, hp.stack, prefixes,
                                    hp.key_batch_size, hp.position)
        self.last_stats = {
            "layers": layers, "n_requests": len(requests), "z_seconds": t_z,
            "seconds": time.perf_counter() - t0, "z_final_nll_mean": float(torch.tensor(losses).nanmean()),
            "z_steps_mean": sum(steps) / len(steps), "per_layer": layer_stats,
            # share of the residual z - h still missing after all layers (0 = every z reached exactly)
            "residual_left": float((z - final).norm(dim=-1).mean()) / max(layer_stats[0]["residual_norm"], 1e-12),
        }
        meta = {"hparams": dataclasses.asdict(hp), "layers": layers, "modules": list(names.values()),
                "stats": self.last_stats}
        return EditArtifact.from_weights("memit", loaded.source, before, model, requests, meta)
