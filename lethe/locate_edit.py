"""What the locate-and-edit family (ROME, MEMIT and their successors) shares.

- ``LocateEditHyperParams``: the knobs every member has (value optimisation, prefixes, covariance);
- prompt rows at the subject (``encode_at_subject``, ``edit_positions``) on the one locator of
  :mod:`lethe.locate`;
- ``optimise_values``: the value optimisation. ROME's v* is MEMIT's z for a single request: δ added to
  a module's output at the edit position makes the target likely (mean target NLL over prefixed
  prompts) under KL(new ‖ original) on "{subject} is a" prompts, a weight decay ‖δ‖/‖v₀‖² and a clamp
  ‖δ‖ ≤ clamp·‖v₀‖. Requests optimise together in one batch; each δ only meets its own rows' losses
  and Adam is element-wise, so a batch equals each request alone;
- ``LocateEditor``: the per-model covariance (C = E[k kᵀ]) and prefix caches.

Keys, values and residuals are averages over the same prefixed prompts everywhere (the r-ROME
consistency fix that the reference code lacked).
"""

from __future__ import annotations

import contextlib
import random
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lethe import lm
from lethe.adapters import unwrap
from lethe.covariance import layer_covariance, load_corpus
from lethe.hooks import Trace
from lethe.locate import SubjectNotFoundError, fill, subject_last_index
from lethe.precision import cast_frozen_weights, full_precision
from lethe.records import EditRequest

__all__ = ["LocateEditHyperParams", "LocateEditor", "SubjectNotFoundError", "optimise_values"]


@dataclass
class LocateEditHyperParams:
    """The knobs ROME and MEMIT share. A preset (``configs/edit/*.yaml``) sets every one of them."""

    stack: str | None = None  # default: the decoder of a decoder-only model, the encoder otherwise
    # where keys are read and δ added: "subject_last" (the papers) or "prompt_last" (the prediction position:
    # decoder's last prompt token, MLM's first mask, seq2seq's last source token) for models whose causal
    # trace shows the fact looked up there rather than at the subject (lethe's world decoder)
    position: str = "subject_last"
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05  # a request stops once its mean target NLL is below this
    kl_prompts: list[str] = field(default_factory=lambda: ["{} is a"])
    # [number of prefixes, length in tokens] groups; "" (the bare prompt) is always included
    context_templates: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_source: str = "auto"  # "generate" (decoders, as in the papers), "corpus" snippets, or "auto"
    mom2_corpus: str | list[str] = "pydoc"  # a corpus name/path (lethe.covariance.load_corpus) or texts
    mom2_n_samples: int = 100000
    mom2_max_length: int = 128
    mom2_batch_size: int = 8
    mom2_ridge: float = 0.0  # λ·mean(diag C) added to C before the solve (0 = the papers)
    seed: int = 0
    # decoders: compute the positions before the edit once (they never see δ) and run each optimisation step on
    # the rest alone; the same δ to float rounding (checked against the full forward once per model)
    reuse_prefix: bool = True
    # Two places where lethe deliberately differs from the reference code (kmeng01/rome, kmeng01/memit):
    # where the KL term reads the "{subject} is a" prompts: "next_token" (lethe: the distribution over what follows
    # the prompt, the prediction the term means to keep) or "edit_position" (the reference: at the edit position,
    # the subject's last token, whose next-token distribution is about the subject's own continuation)
    kl_position: str = "next_token"
    # what early_stop_loss is compared with: "nll" (lethe: the mean target NLL alone, so a request stops when its
    # target is likely, whatever the KL and weight decay) or "total" (the reference: NLL + KL + weight decay, and
    # no step after the last loss evaluated, so v_steps evaluations make v_steps - 1 steps)
    stop_on: str = "nll"
    # "lethe" keeps the two settings above as given; "reference" sets both to the reference's choice
    # (edit_position, total) to reproduce published numbers
    protocol: str = "lethe"

    def __post_init__(self) -> None:
        choices = {"position": ("subject_last", "prompt_last"), "kl_position": ("next_token", "edit_position"),
                   "stop_on": ("nll", "total"), "protocol": ("lethe", "reference")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"hparams.{name} = {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        if self.protocol == "reference":
            self.kl_position, self.stop_on = "edit_position", "total"


# --------------------------------------------------------------------------- prompts and positions
def context_prefixes(model: nn.Module, tok, family: str, groups: Sequence[Sequence[int]], source: str = "auto",
                     corpus: str | Sequence[str] = "pydoc", seed: int = 0) -> list[str]:
    """Short random prefixes ("" first) put before a prompt so keys and values do not overfit one context.

    Decoders generate them (as in the paper); masked LMs and encoder-decoders cannot continue text, so
    they take random word spans of the corpus.
    """
    if source == "auto":
        source = "generate" if family == "decoder" else "corpus"
    out = [""]
    if source == "generate":
        starts = ["The", "Therefore", "Because", "I", "You"]
        device = next(model.parameters()).device
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


def check_request(tok, family: str, req: EditRequest) -> None:
    """A request's target tokenises to something and its subject is found in its prompt's tokens."""
    if not req.target_new.strip() or not tok(lm.target_text(req.target_new), add_special_tokens=False)["input_ids"]:
        raise lm.EncodingError(f"case {req.case_id}: target_new {req.target_new!r} tokenises to nothing")
    text, a, b = fill(req.prompt, req.subject, case=req.case_id)
    subject_last_index(tok, text, a, b, req.case_id)


def request_rows(requests: Sequence[EditRequest], prefixes: Sequence[str], kl_prompts: Sequence[str] = ()):
    """(prefix, prompt, subject, target) rows of each request, each row's owner and whether it is a KL row."""
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


def encode_at_subject(tok, family: str, rows: Sequence[tuple[str, str, str, str]],
                      case: object = None) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Encode (prefix, prompt-with-{}, subject, target) rows; also return each row's subject position."""
    texts, pos = [], []
    lead = len(lm._bos_prefix(tok))
    for prefix, prompt, subject, _ in rows:
        text, a, b = fill(prompt, subject, prefix, case)
        texts.append(text)
        pos.append(lead + subject_last_index(tok, text, a, b, case))
    return lm.encode_pairs(tok, family, texts, [t for *_, t in rows]), pos


def as_btd(t: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Activations as (batch, tokens, width): OPT's MLP sees tokens flattened to (batch·tokens, width)."""
    if t.dim() == 2:
        return t.view(*batch["input_ids"].shape, t.shape[-1])
    return t


def edit_positions(batch: dict[str, torch.Tensor], subject_pos: Sequence[int], family: str,
                   where: str = "subject_last") -> list[int]:
    """Per row, the token where keys are read and δ is added (see ``LocateEditHyperParams.position``)."""
    if where == "subject_last":
        return list(subject_pos)
    if where != "prompt_last":
        raise ValueError(f"position must be 'subject_last' or 'prompt_last', got {where!r}")
    if family == "seq2seq":
        return (batch["attention_mask"].sum(-1) - 1).tolist()
    first = (batch["labels"] != lm.IGNORE).float().argmax(-1)
    return (first - 1 if family == "decoder" else first).tolist()



def group_mean(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``values`` rows per owner (n × width)."""
    out = torch.zeros(n, values.shape[-1], dtype=values.dtype, device=values.device)
    out.index_add_(0, owner, values)
    counts = torch.bincount(owner, minlength=n).clamp(min=1).to(values.dtype)
    return out / counts[:, None]


# --------------------------------------------------------------------------- the value optimisation
class _FullRows:
    """Every step runs the whole prompt of each active row (the general path: any family)."""

    def __init__(self, batch: dict[str, torch.Tensor], pos: torch.Tensor, family: str) -> None:
        self.batch, self.pos, self.family = batch, pos, family
        self.targets = lm.column_targets(batch["labels"], family)

    def rows(self, sel: torch.Tensor):
        """Rows ``sel``: model inputs, the label each logit column is scored on, and each row's edit position."""
        sub = {k: v[sel] for k, v in self.batch.items()}
        return lm.model_inputs(sub, self.family), self.targets[sel], self.pos[sel]


class _SuffixRows:
    """Decoders: a token before the edit position never sees δ (attention is causal), so its keys and values
    at every layer are fixed for the whole optimisation. They are computed once (the model's KV cache) and each
    step runs only the tokens from the edit position on, projecting onto the vocabulary only the columns that
    predict a target token (``logits_to_keep``). For a prompt behind a 10-token prefix that is a fraction of
    the work. Rows are left-padded so every row's edit position falls in one column P."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor], pos: torch.Tensor,
                 keep_edit_column: bool = False) -> None:
        lengths = batch["attention_mask"].sum(-1)
        self.P = int(pos.max())
        shift = self.P - pos
        width = int((shift + lengths).max())
        n = len(pos)
        device = batch["input_ids"].device
        ids = torch.zeros((n, width), dtype=torch.long, device=device)  # padding: masked, any id does
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        labels = torch.full((n, width), lm.IGNORE, dtype=torch.long, device=device)
        for i in range(n):
            a, m = int(shift[i]), int(lengths[i])
            ids[i, a:a + m] = batch["input_ids"][i, :m]
            mask[i, a:a + m] = 1
            labels[i, a:a + m] = batch["labels"][i, :m]
        self.ids, self.mask = ids, mask
        self.position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        self.prefix = lm.PrefixCache(model, ids, mask, self.position_ids, self.P)
        targets = lm.column_targets(labels[:, self.P:], "decoder")
        self.keep = None
        if self.prefix.head_slice:
            wanted = (targets != lm.IGNORE).any(0)
            wanted[0] |= keep_edit_column  # the edit position's own prediction (kl_position: edit_position)
            self.keep = wanted.nonzero().squeeze(-1)
            targets = targets[:, self.keep]
        self.targets = targets

    def rows(self, sel: torch.Tensor):
        inputs = {"input_ids": self.ids[sel, self.P:], "attention_mask": self.mask[sel],
                  "position_ids": self.position_ids[sel, self.P:], "use_cache": True,
                  self.prefix.arg: self.prefix.build(lambda _layer, t: t[sel])}
        if self.keep is not None:
            inputs["logits_to_keep"] = self.keep
        return inputs, self.targets[sel], torch.zeros_like(sel)


def _row_scores(model, module_name: str, runner, sel: torch.Tensor, delta: torch.Tensor | None, own: torch.Tensor,
                kl_position: str = "next_token"):
    """Per row of ``sel``: the mean target NLL, the log-probabilities the KL term compares (at the first target
    token, or at the edit position: ``kl_position``) and the module's output at the edit position (before δ),
    with each row's δ (``delta[own]``; None: nothing) added to ``module_name``'s output at its edit position."""
    inputs, targets, s_pos = runner.rows(sel)
    s_own = own[sel]
    s_idx = torch.arange(len(sel), device=sel.device)
    seen = {}

    def add_delta(x: torch.Tensor, _name: str) -> torch.Tensor:
        view = as_btd(x, inputs)
        seen["value"] = view[s_idx, s_pos]
        if delta is None:
            return x
        view = view.clone()
        view[s_idx, s_pos] = view[s_idx, s_pos] + delta[s_own].to(view.dtype)
        return view.view(x.shape)

    with Trace(model, module_name, retain_output=False, edit_output=add_delta):
        logits = model(**inputs).logits
    tok_lp, mask = lm.target_logprobs(logits, targets)
    row_nll = -tok_lp.sum(-1) / mask.sum(-1).clamp(min=1)
    # the edit position's logit column is s_pos in both runners (the suffix keeps its column 0 when asked)
    at = s_pos if kl_position == "edit_position" else mask.float().argmax(-1)
    return row_nll, torch.log_softmax(logits[s_idx, at].float(), -1), seen["value"]


# models on which the cached-prefix forward was checked against the full one (once per model object)
_PREFIX_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _choose_runner(model: nn.Module, module_name: str, batch: dict[str, torch.Tensor], pos: torch.Tensor,
                   own: torch.Tensor, family: str, reuse: bool, kl_position: str = "next_token"):
    """The forward each optimisation step runs: the cached-prefix one for decoders (checked against the full
    forward at δ = 0, in float32, the first time a model meets it; on a disagreement the full one, with a
    warning). The cache itself is computed in whatever precision surrounds the call, as the steps are."""

    if not (reuse and family == "decoder" and int(pos.max()) > 0):
        return _FullRows(batch, pos, family)
    keep_edit = kl_position == "edit_position"
    if unwrap(model) not in _PREFIX_CHECKED:
        k = min(len(pos), 16)  # a few rows show it (and keep memory low)
        sub = {key: v[:k] for key, v in batch.items()}
        rows = torch.arange(k, device=pos.device)
        with full_precision(pos.device):
            runners = (_FullRows(sub, pos[:k], family), _SuffixRows(model, sub, pos[:k], keep_edit_column=keep_edit))
            a, b = (_row_scores(model, module_name, r, rows, None, own[:k], kl_position) for r in runners)
        gap = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
        if gap > 1e-3 * max(1.0, float(a[2].abs().max())):
            warnings.warn(f"value optimisation: the cached-prefix forward of {type(unwrap(model)).__name__} differs "
                          f"from the full one by {gap:.2g} at δ = 0; every step runs the whole prompt", stacklevel=3)
            return _FullRows(batch, pos, family)
        _PREFIX_CHECKED.add(unwrap(model))
    return _SuffixRows(model, batch, pos, keep_edit_column=keep_edit)


@contextlib.contextmanager
def _eager_attention_on_cpu(model: nn.Module):
    """On CPU, many small attention backward passes run faster as plain matmuls than through torch's fused
    attention kernel (its bfloat16 backward most of all: 37 ms a call against ~1 ms for SmolLM2's shapes), so the
    optimisation steps switch a Hugging Face model to eager attention and back. Same maths."""
    inner = unwrap(model)
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    switch = (impl == "sdpa" and hasattr(inner, "set_attn_implementation")
              and next(inner.parameters()).device.type == "cpu")
    if switch:
        try:
            inner.set_attn_implementation("eager")
        except (ValueError, ImportError):
            switch = False
    try:
        yield
    finally:
        if switch:
            inner.set_attn_implementation(impl)


def optimise_values(model: nn.Module, tok, family: str, requests: Sequence[EditRequest], module_name: str,
                    hp: LocateEditHyperParams, prefixes: Sequence[str] = ("",)) -> dict:
    """Target outputs z = v₀ + δ of ``module_name`` at the edit position, δ per request optimised in one batch
    (see the module docstring); a request under ``hp.early_stop_loss`` is frozen and leaves the batch.

    Everything here runs in whatever autocast surrounds the call (``lethe edit --trainer.precision
    bf16-mixed``), the unedited pass included, so the KL term is 0 at δ = 0. Under bf16, ``v_init`` is therefore
    a bf16 reading: callers that need the exact unedited value take it in full precision themselves and add δ
    (MEMIT's z). The cached path is checked against the full one at δ = 0 in float32, once per model, and
    falls back to the full forward (with a warning) on a model where they disagree.

    Returns ``{"z", "delta", "v_init"}`` (n × width), per request ``"loss"`` (final NLL) and ``"steps"``,
    ``"history"``: the mean target NLL of each request at every step (steps × n; NaN once it stopped), and
    ``"reused_prefix"``: whether the cached path ran.
    """
    device = next(model.parameters()).device
    n = len(requests)
    rows, owner, is_kl = request_rows(requests, prefixes, hp.kl_prompts)
    batch, pos = encode_at_subject(tok, family, rows, requests[0].case_id if n == 1 else None)
    pos = edit_positions(batch, pos, family, hp.position)
    batch = lm.to_device(batch, device)
    pos_t = torch.tensor(pos, device=device)
    own = torch.tensor(owner, device=device)
    kl_mask = torch.tensor(is_kl, device=device)
    was_training = model.training
    model.eval()
    steps_context = contextlib.ExitStack()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # only δ needs gradients: no graph through the weights
        p.requires_grad_(False)
    try:
        all_rows = torch.arange(len(rows), device=device)
        with torch.no_grad():
            runner = _choose_runner(model, module_name, batch, pos_t, own, family, hp.reuse_prefix, hp.kl_position)
            steps_context.enter_context(cast_frozen_weights(unwrap(model)))  # weights fixed from here on
            # the unedited pass in the steps' own precision, so that the KL term is exactly 0 at δ = 0
            _, kl_init, out = _row_scores(model, module_name, runner, all_rows, None, own, hp.kl_position)
            rw = ~kl_mask
            v_init = group_mean(out[rw].float(), own[rw], n)
            width = out.shape[-1]
        delta = torch.zeros(n, width, device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        max_norm = hp.clamp_norm_factor * v_init.norm(dim=-1)
        v_norm2 = v_init.norm(dim=-1).clamp(min=1e-8) ** 2
        active = torch.ones(n, dtype=torch.bool, device=device)
        last_nll = torch.full((n,), float("nan"), device=device)
        steps = torch.zeros(n, dtype=torch.long)
        history: list[list[float]] = []
        n_kl = torch.bincount(own[kl_mask], minlength=n).clamp(min=1).float()
        n_rw = torch.bincount(own[~kl_mask], minlength=n).clamp(min=1).float()
        steps_context.enter_context(_eager_attention_on_cpu(model))
        for it in range(hp.v_steps):
            sel = active[own].nonzero().squeeze(-1)
            s_own, s_kl = own[sel], kl_mask[sel]
            with torch.enable_grad():
                row_nll, new_lp, _ = _row_scores(model, module_name, runner, sel, delta, own, hp.kl_position)
                row_kl = (new_lp.exp() * (new_lp - kl_init[sel])).sum(-1)  # KL(new ‖ original), per row
                nll = torch.zeros(n, device=device).index_add(0, s_own[~s_kl], row_nll[~s_kl].float()) / n_rw
                kl = torch.zeros(n, device=device).index_add(0, s_own[s_kl], row_kl[s_kl].float()) / n_kl
                decay = hp.v_weight_decay * delta.norm(dim=-1) / v_norm2
                total = nll + hp.kl_factor * kl + decay
                loss = (total * active.clone()).sum()
            with torch.no_grad():
                last_nll[active] = nll.detach()[active]
                history.append(torch.where(active, nll.detach(), torch.nan).tolist())
                steps[active.cpu()] += 1
                crit = last_nll if hp.stop_on == "nll" else torch.where(active, total.detach(), last_nll)
                active &= ~(crit < hp.early_stop_loss)
            if not bool(active.any()) or (hp.stop_on == "total" and it == hp.v_steps - 1):
                break  # the reference's rule also takes no step after the last loss it evaluates
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
        steps_context.close()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    d = delta.detach()
    return {"z": v_init + d, "delta": d, "v_init": v_init, "loss": last_nll.tolist(), "steps": steps.tolist(),
            "history": history, "reused_prefix": isinstance(runner, _SuffixRows)}


# --------------------------------------------------------------------------- the editors' shared state
class LocateEditor:
    """Base of the locate-and-edit editors: hyperparameters, and per-model caches of C and of the prefixes.

    Subclasses set ``name`` and ``hparams_class`` and implement ``edit(loaded, requests) -> EditArtifact``.
    """

    name = "locate-edit"
    hparams_class: type[LocateEditHyperParams] = LocateEditHyperParams

    def __init__(self, hparams: LocateEditHyperParams | dict | str | None = None, cache_dir: str | None = None,
                 progress: bool = True, overrides: dict | None = None) -> None:
        from lethe.edits import resolve_hparams

        self.hp = resolve_hparams(self.hparams_class, self.name, hparams, **(overrides or {}))
        self.cache_dir = cache_dir
        self.progress = progress
        self._prefixes: dict[int, list[str]] = {}
        self._cov: dict[tuple, torch.Tensor] = {}

    def covariance(self, loaded, layer: int) -> torch.Tensor:
        """C = E[k kᵀ] of ``layer``'s MLP output-projection input (float64, cached on disk and here)."""
        hp = self.hp
        corpus_key = hp.mom2_corpus if isinstance(hp.mom2_corpus, str) else tuple(hp.mom2_corpus)
        key = (id(unwrap(loaded.model)), layer, hp.stack, corpus_key, hp.mom2_n_samples, hp.mom2_max_length,
               hp.mom2_ridge)
        if key not in self._cov:
            cov = layer_covariance(loaded.model, loaded.tokenizer, loaded.adapter, loaded.family, layer, hp.stack,
                                   corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples,
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
                                                   self.hp.mom2_corpus, self.hp.seed)
        return self._prefixes[key]

    def check_requests(self, loaded, requests: Sequence[EditRequest]) -> None:
        """Everything that can be wrong with the requests, checked before any weight changes."""
        if not requests:
            raise ValueError(f"{self.name} got an empty list of edit requests: nothing to edit")
        if loaded.family == "seq2seq" and (self.hp.stack or "encoder") != "encoder":
            raise ValueError(f"{self.name} edits a seq2seq model's encoder MLPs (stack='encoder')")
        for req in requests:
            check_request(loaded.tokenizer, loaded.family, req)
