"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection, in all three families.

Steps for a request "{subject} ... -> target_new":

1. key k* = mean, over the bare prompt and ~20 short random prefixes, of the MLP
   output projection's input at the subject's last token (``compute_keys``);
2. value: a vector δ added to a module's output at the subject's last token is
   optimised so the target becomes likely, with KL(new ‖ original) on "{subject} is a"
   prompts, weight decay ‖δ‖/‖v₀‖² and ‖δ‖ ≤ clamp·‖v₀‖ (``compute_target_value``; it
   works on any module, so MEMIT calls it for a residual target at another layer);
3. closed form: ΔW = δ uᵀ / (uᵀ k*), u = C⁻¹ k*, C = E[k kᵀ] in float64
   (``rome_update``), so W' k* = W k* + δ and every key C⁻¹-orthogonal to k* keeps its value.

r-ROME's consistency fix: the same averaged k* is used in u and in the residual (the
reference code mixed the prefix average with the bare prompt's key, which makes
sequential edits collapse). Since the projection is linear, the mean output over the
prompts is W k* + b, so the residual to write is exactly δ.

Families: decoder and masked LM edit their (only) stack at the subject's last token in the
prompt (the MLM scores the target at the mask); the encoder-decoder edits its ENCODER MLPs
at the subject's last token in the encoder input and is scored on the decoder's output.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lethe import lm
from lethe.adapters import ArchAdapter, unwrap
from lethe.covariance import layer_covariance, load_corpus, solve_psd
from lethe.edits import EditArtifact, resolve_hparams
from lethe.hooks import Trace
from lethe.records import EditRequest


class SubjectNotFoundError(ValueError):
    pass


@dataclass
class ROMEHyperParams:
    """ROME's knobs; ``PRESETS`` holds the paper's values for GPT-2 XL and GPT-J."""

    layer: int = 0
    stack: str | None = None  # default: the decoder of a decoder-only model, the encoder otherwise
    # where k* is read and δ added: "subject_last" (the paper) or "prompt_last" (the prediction position,
    # for models whose causal trace shows the fact is looked up there, like lethe's world decoder)
    position: str = "subject_last"
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    kl_prompts: list[str] = field(default_factory=lambda: ["{} is a"])
    # [number of prefixes, length in tokens] groups; "{}" alone is always included.
    context_templates: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_source: str = "auto"  # "generate" (decoders, as in the paper), "corpus" snippets, or "auto"
    mom2_corpus: str | list[str] = "pydoc"  # a corpus name/path (lethe.covariance.load_corpus) or texts
    mom2_n_samples: int = 100000
    mom2_max_length: int = 128
    mom2_batch_size: int = 8
    mom2_ridge: float = 0.0  # λ·mean(diag C) added to C before the solve (0 = the paper)
    seed: int = 0


PRESETS: dict[str, dict] = {
    # Meng et al. 2022, hparams/ROME/gpt2-xl.json and EleutherAI_gpt-j-6B.json (C from Wikipedia; here from
    # whatever corpus the user names, "pydoc" offline by default).
    "gpt2-xl": {"layer": 17, "v_lr": 0.5, "v_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0,
                    "kl_factor": 0.0625, "mom2_n_samples": 100000},
    "gpt-j": {"layer": 5, "v_lr": 0.5, "v_steps": 20, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0,
                  "kl_factor": 0.0625, "mom2_n_samples": 100000},
    # lethe's embedded world models (4-block GPT-2 / BERT, 3-block T5 encoder), world corpus for C.
    # world decoder: its causal trace shows facts looked up at the prediction position (not the subject's
    # last token), so k* and δ live there; residual norms (~100 at width 128) need lr 2.0 (paper: 0.5).
    # Measured on 50 single edits: efficacy 1.0 / paraphrase 0.94 / neighbourhood 0.996
    # (benchmarks/results/rome.json).
    "world-decoder": {"layer": 0, "position": "prompt_last", "mom2_corpus": "world", "mom2_n_samples": 4000,
                      "v_lr": 2.0, "v_steps": 60, "context_templates": []},
    # world MLM and T5 encoder: the paper's pull-back (weight decay 0.5, KL 0.0625, clamp 4) left δ too small to
    # move the prediction (layer 1, 50 edits: MLM efficacy 0.16 / seq2seq 0.50, neighbourhood ~1.0); layer 0 with a
    # weak pull-back and no effective clamp, 25 edits: MLM 0.96 / 0.92 / 0.89, seq2seq 1.0 / 0.90 / 0.98.
    "world-mlm": {"layer": 0, "mom2_corpus": "world", "mom2_n_samples": 4000, "context_source": "corpus",
                  "v_lr": 1.0, "v_steps": 80, "v_weight_decay": 0.02, "kl_factor": 0.02, "clamp_norm_factor": 100.0},
    "world-seq2seq": {"layer": 0, "stack": "encoder", "mom2_corpus": "world", "mom2_n_samples": 4000,
                      "context_source": "corpus", "v_lr": 1.0, "v_steps": 80, "v_weight_decay": 0.02,
                      "kl_factor": 0.02, "clamp_norm_factor": 100.0},
    # SmolLM2-135M (30 Llama blocks); C from TOFU + Python docs, offline English text. Layer 3: inside the span
    # where its causal trace (benchmarks/results/trace_smollm2) shows the subject's state carrying the fact
    # (layers 0-10; MLP 0 is an extended embedding). A weaker pull back (weight decay 0.1, KL 0.02) and a wider
    # clamp (8) let δ generalise to paraphrases: on 10 real facts, paraphrase 0.77 (layer 5, paper values) ->
    # 0.87 (layer 3) and 0.87 (layer 5, these three), neighbourhood >= 0.96 in all. Both together, 20 edits:
    # efficacy 1.0 / paraphrase 0.80 / neighbourhood 0.98, 21 s/edit (benchmarks/results/rome.json).
    "smollm2": {"layer": 3, "mom2_corpus": "tofu+pydoc", "mom2_n_samples": 2000, "context_source": "generate",
                "v_weight_decay": 0.1, "clamp_norm_factor": 8.0, "kl_factor": 0.02},
}


def hparams_from(spec: ROMEHyperParams | dict | str | None = None, **overrides) -> ROMEHyperParams:
    """Hyperparameters from a preset name, a dict, or an instance, with overrides on top."""
    return resolve_hparams(ROMEHyperParams, PRESETS, "ROME", spec, **overrides)


# --------------------------------------------------------------------------- prompts and positions
def context_prefixes(model: nn.Module, tok, family: str, groups: Sequence[Sequence[int]], source: str = "auto",
                     corpus: str | Sequence[str] = "pydoc", seed: int = 0) -> list[str]:
    """Short random prefixes ("" first) put before a prompt so k* and v* do not overfit one context.

    Decoders generate them (as in the paper); masked LMs and encoder-decoders cannot continue text, so
    they take random word spans of the corpus.
    """
    if source == "auto":
        source = "generate" if family == "decoder" else "corpus"
    out = [""]
    if source == "generate":
        starts = ["The", "Therefore", "Because", "I", "You"]
        device = next(model.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for n, length in groups:
                for i in range(n):
                    ids = tok(starts[i % len(starts)], return_tensors="pt")["input_ids"].to(device)
                    with torch.no_grad():
                        seq = unwrap(model).generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                                     top_k=5, max_new_tokens=length,
                                                     pad_token_id=tok.pad_token_id)
                    text = tok.decode(seq[0], skip_special_tokens=True)
                    out.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
        finally:
            torch.random.set_rng_state(torch_state)
        del gen
    elif source == "corpus":
        _, texts = load_corpus(corpus)
        rng = random.Random(seed)
        for n, length in groups:
            for _ in range(n):
                words = rng.choice(texts).split()
                start = rng.randrange(max(1, len(words) - length))
                span = " ".join(words[start:start + max(1, length // 2)])
                out.append(span.replace("{", " ").replace("}", " ").strip() + ". ")
    else:
        raise ValueError(f"context_source must be 'generate', 'corpus' or 'auto', got {source!r}")
    return out


def subject_last_index(tok, text: str, subj_start: int, subj_end: int, case: object = None) -> int:
    """Index (among the text's tokens, no specials) of the token holding the subject's last character."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    best = None
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a < subj_end and b > subj_start and b > a:
            best = i
    if best is None:
        raise SubjectNotFoundError(
            f"case {case}: subject {text[subj_start:subj_end]!r} is not found in the tokens of prompt {text!r}")
    return best


def fill(prefix: str, prompt: str, subject: str, case: object = None) -> tuple[str, int, int]:
    """prefix + prompt with the subject filled in, and the subject's character span."""
    if prompt.count("{}") != 1:
        raise SubjectNotFoundError(f"case {case}: prompt {prompt!r} must hold exactly one '{{}}' for the subject")
    if not subject.strip():
        raise SubjectNotFoundError(f"case {case}: empty subject")
    at = prompt.index("{}")
    text = prefix + prompt[:at] + subject + prompt[at + 2:]
    return text, len(prefix) + at, len(prefix) + at + len(subject)


def encode_at_subject(tok, family: str, items: Sequence[tuple[str, str, str, str]],
                      case: object = None) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Encode (prefix, prompt-with-{}, subject, target) rows; also return each row's subject position."""
    from lethe.lm import _bos_prefix

    texts, pos = [], []
    lead = len(_bos_prefix(tok))
    for prefix, prompt, subject, _ in items:
        text, a, b = fill(prefix, prompt, subject, case)
        texts.append(text)
        pos.append(lead + subject_last_index(tok, text, a, b, case))
    batch = lm.encode_pairs(tok, family, texts, [t for *_, t in items])
    return batch, pos


def check_target(tok, family: str, req: EditRequest) -> None:
    if not tok(lm.target_text(req.target_new), add_special_tokens=False)["input_ids"] or not req.target_new.strip():
        raise lm.EncodingError(f"case {req.case_id}: target_new {req.target_new!r} tokenises to nothing")


def as_btd(t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Activations as (batch, tokens, width): OPT's MLP sees tokens flattened to (batch·tokens, width)."""
    if t.dim() == 2:
        return t.view(*batch["input_ids"].shape, t.shape[-1])
    return t


def edit_positions(batch: dict[str, torch.Tensor], subject_pos: Sequence[int], family: str,
                   where: str = "subject_last") -> list[int]:
    """Per row, the token where keys are read and δ is added (see ``ROMEHyperParams.position``)."""
    if where == "subject_last":
        return list(subject_pos)
    if where != "prompt_last":
        raise ValueError(f"position must be 'subject_last' or 'prompt_last', got {where!r}")
    if family == "seq2seq":
        return (batch["attention_mask"].sum(-1) - 1).tolist()
    first = (batch["labels"] != lm.IGNORE).float().argmax(-1)
    return (first - 1 if family == "decoder" else first).tolist()


# --------------------------------------------------------------------------- keys
@torch.no_grad()
def compute_keys(model: nn.Module, tok, adapter: ArchAdapter, family: str, requests: Sequence[EditRequest],
                 layer: int, stack: str | None = None, prefixes: Sequence[str] = ("",),
                 position: str = "subject_last") -> torch.Tensor:
    """k* per request: the mean input of layer ``layer``'s MLP output projection at the subject's last token
    over ``prefixes`` (shape: requests × FFN width, float32)."""
    layer = adapter.check_layer(model, layer, stack)
    name = adapter.mlp_out_name(layer, stack)
    device = next(model.parameters()).device
    out = []
    for req in requests:
        check_target(tok, family, req)
        rows = [(p, req.prompt, req.subject, req.target_new) for p in prefixes]
        batch, pos = encode_at_subject(tok, family, rows, req.case_id)
        pos = edit_positions(batch, pos, family, position)
        batch = lm.to_device(batch, device)
        with Trace(model, name, retain_input=True, retain_output=False, stop=True) as tr:
            model(**lm.model_inputs(batch, family))
        keys = as_btd(tr.input, batch)[torch.arange(len(pos), device=device), torch.tensor(pos, device=device)]
        out.append(keys.float().mean(0))
    return torch.stack(out)


# --------------------------------------------------------------------------- values
def _first_label_positions(labels: torch.Tensor, family: str) -> torch.Tensor:
    """Where, in ``lm.aligned`` logits, the first target token is predicted."""
    lb = labels[:, 1:] if family == "decoder" else labels
    return (lb != lm.IGNORE).float().argmax(-1)


def compute_target_value(model: nn.Module, tok, adapter: ArchAdapter, family: str, request: EditRequest,
                         module_name: str, hp: ROMEHyperParams, prefixes: Sequence[str] = ("",),
                         progress: bool = False) -> dict:
    """Optimise δ added to ``module_name``'s output at the subject's last token (see the module docstring).

    Returns ``{"delta": δ, "v_init": mean module output at those positions, "loss": [...], "steps": n}``.
    ``module_name`` is ROME's MLP output projection, or for MEMIT a block (residual stream) output.
    """
    device = next(model.parameters()).device
    check_target(tok, family, request)
    rows = [(p, request.prompt, request.subject, request.target_new) for p in prefixes]
    n_rw = len(rows)
    rows += [("", kp, request.subject, request.target_new) for kp in hp.kl_prompts]
    batch, pos = encode_at_subject(tok, family, rows, request.case_id)
    pos = edit_positions(batch, pos, family, hp.position)
    batch = lm.to_device(batch, device)
    pos_t = torch.tensor(pos, device=device)
    rows_t = torch.arange(len(pos), device=device)
    kl_first = _first_label_positions(batch["labels"][n_rw:], family)
    kl_rows = torch.arange(n_rw, len(pos), device=device)
    was_training = model.training
    model.eval()

    width = None
    with torch.no_grad(), Trace(model, module_name, retain_output=True) as tr:
        logits = lm.forward_logits(model, batch, family)
        width = tr.output.shape[-1]
        v_init = as_btd(tr.output, batch)[rows_t[:n_rw], pos_t[:n_rw]].float().mean(0)
        lg, _ = lm.aligned(logits, batch["labels"], family)
        kl_init = torch.log_softmax(lg[kl_rows, kl_first].float(), -1)

    delta = torch.zeros(width, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * v_init.norm()

    def add_delta(out: torch.Tensor, _name: str) -> torch.Tensor:
        view = as_btd(out, batch).clone()
        view[rows_t, pos_t] = view[rows_t, pos_t] + delta.to(view.dtype)
        return view.view(out.shape)

    losses = []
    steps = 0
    for steps in range(1, hp.v_steps + 1):
        with torch.enable_grad(), Trace(model, module_name, retain_output=False, edit_output=add_delta):
            logits = lm.forward_logits(model, batch, family)
            tok_lp, mask = lm.token_logprobs(logits[:n_rw], batch["labels"][:n_rw], family)
            nll = (-tok_lp.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
            lg, _ = lm.aligned(logits, batch["labels"], family)
            kl_new = torch.log_softmax(lg[kl_rows, kl_first].float(), -1)
            kl = torch.nn.functional.kl_div(kl_init, kl_new, log_target=True, reduction="batchmean")
            decay = hp.v_weight_decay * (delta.norm() / v_init.norm().clamp(min=1e-8) ** 2)
            loss = nll + hp.kl_factor * kl + decay
        losses.append(float(nll.detach()))
        if losses[-1] < hp.early_stop_loss:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            n = delta.norm()
            if n > max_norm:
                delta.mul_(max_norm / n)
    model.train(was_training)
    return {"delta": delta.detach(), "v_init": v_init.detach(), "loss": losses, "steps": steps}


# --------------------------------------------------------------------------- the update
def rome_update(k_star: torch.Tensor, delta: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """ΔW (out × in) with ΔW k* = δ and ΔW k = 0 for every k with (C⁻¹k*)ᵀ k = 0; solved in float64
    (C⁻¹ is the pseudo-inverse where dead neurons make C singular: see ``solve_psd``)."""
    k = k_star.to(torch.float64).reshape(-1, 1)
    u = solve_psd(cov.to(k.device), k)
    denom = (u.T @ k).item()
    if abs(denom) < 1e-30:
        raise ValueError("k*ᵀ C⁻¹ k* is zero: the key is null; is the subject position right?")
    return (delta.to(torch.float64).reshape(-1, 1) @ u.T) / denom


class ROMEEditor:
    """``Editor`` for ``lethe edit``: requests are applied one after another (sequential ROME)."""

    name = "rome"

    def __init__(self, hparams: ROMEHyperParams | dict | str | None = None, cache_dir: str | None = None,
                 progress: bool = True, overrides: dict | None = None) -> None:
        self.hp = hparams_from(hparams, **(overrides or {}))
        self.cache_dir = cache_dir
        self.progress = progress
        self._prefixes: dict[int, list[str]] = {}
        self._cov: dict[tuple, torch.Tensor] = {}
        self.last_stats: list[dict] = []
        self.last_vectors: list[dict[str, torch.Tensor]] = []  # k*, δ, v₀ of the last call (for inspection)

    def covariance(self, loaded) -> torch.Tensor:
        hp = self.hp
        corpus_key = hp.mom2_corpus if isinstance(hp.mom2_corpus, str) else tuple(hp.mom2_corpus)
        key = (id(unwrap(loaded.model)), hp.layer, hp.stack, corpus_key, hp.mom2_n_samples)
        if key not in self._cov:
            corpus = _corpus_spec(hp.mom2_corpus)
            cov = layer_covariance(loaded.model, loaded.tokenizer, loaded.adapter, loaded.family, hp.layer,
                                   hp.stack, corpus=corpus, n_samples=hp.mom2_n_samples,
                                   max_length=hp.mom2_max_length, batch_size=hp.mom2_batch_size,
                                   source=loaded.source, cache_dir=self.cache_dir, progress=self.progress)
            if hp.mom2_ridge:
                cov = cov + hp.mom2_ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
            self._cov[key] = cov
        return self._cov[key]

    def prefixes(self, loaded) -> list[str]:
        key = id(unwrap(loaded.model))
        if key not in self._prefixes:
            self._prefixes[key] = context_prefixes(loaded.model, loaded.tokenizer, loaded.family,
                                                   self.hp.context_templates, self.hp.context_source,
                                                   _corpus_spec(self.hp.mom2_corpus), self.hp.seed)
        return self._prefixes[key]

    def edit(self, loaded, requests: Sequence[EditRequest]) -> EditArtifact:
        model, tok, adapter, family, hp = loaded.model, loaded.tokenizer, loaded.adapter, loaded.family, self.hp
        if family == "seq2seq" and (hp.stack or "encoder") != "encoder":
            raise ValueError("ROME edits a seq2seq model's encoder MLPs (stack='encoder')")
        layer = adapter.check_layer(model, hp.layer, hp.stack)
        mod_name = adapter.mlp_out_name(layer, hp.stack)
        module = adapter.module(model, mod_name)
        pname = f"{mod_name}.weight"
        for req in requests:  # bad requests fail before anything changes
            check_target(tok, family, req)
            for prefix in ("",):
                text, a, b = fill(prefix, req.prompt, req.subject, req.case_id)
                subject_last_index(tok, text, a, b, req.case_id)
        cov = self.covariance(loaded)
        prefixes = self.prefixes(loaded)
        before = EditArtifact.snapshot(model, [pname])
        self.last_stats, self.last_vectors = [], []
        for req in requests:
            t0 = time.perf_counter()
            k_star = compute_keys(model, tok, adapter, family, [req], layer, hp.stack, prefixes, hp.position)[0]
            out = compute_target_value(model, tok, adapter, family, req, mod_name, hp, prefixes)
            dw = rome_update(k_star, out["delta"], cov)
            with torch.no_grad():
                w = adapter.weight_out_in(module)
                w.add_(dw.to(w.device, w.dtype))
            self.last_vectors.append({"k_star": k_star, "delta": out["delta"], "v_init": out["v_init"]})
            self.last_stats.append({"case_id": req.case_id, "v_loss": out["loss"], "v_steps": out["steps"],
                                    "delta_norm": float(out["delta"].norm()), "update_norm": float(dw.norm()),
                                    "seconds": time.perf_counter() - t0})
        meta = {"hparams": dataclasses.asdict(hp), "layer": layer, "module": mod_name, "stats": self.last_stats}
        return EditArtifact.from_weights("rome", loaded.source, before, model, requests, meta)


def _corpus_spec(spec: str) -> str:
    return spec
