"""Knowledge Neurons (Dai et al., 2022): integrated-gradients attribution of a fact to FFN neurons.

A *neuron* is one unit of an FFN's intermediate activation: the INPUT of the
FFN output projection (``adapter.mlp_out_name``), i.e. after the non-linearity
and, for gated MLPs (Llama), after the gate product -- hooking the up/gate
projection instead is the trap the public code fell into. Its *value vector*
is the matching column of the output projection's ``(out, in)`` weight.

Attribution of neuron i at one site (stack, layer) for a prompt and target:

    Attr_i = w_i * (1/m) * sum_{k=1..m} dP(alpha_k * w) / dw_i,   alpha_k = k/m

where w is the layer's real activation at the neuron's position(s) and P the
target's probability (right Riemann sum of the integral from the zeroed to the
real activation; the m steps of every site run as ONE batch, and several sites
share a batch, so one forward + one backward covers a whole chunk).

Positions (where the activation is scaled, and where suppress/enhance act):

- decoder: the next-token position (the last prompt token, which predicts the
  first target token);
- mlm: the ``[MASK]``; single-token targets only (:class:`MultiTokenTargetError`);
- seq2seq, decoder stack: decoder position 0 (it predicts the first target token);
  encoder stack: every source position together (the encoder has no prediction
  position; a neuron there is the unit over the whole source).

P is the joint, teacher-forced probability of the target tokens
(``exp(sum log p)``); for single-token targets, the paper's P(y|x).

Nothing here imports Lightning: the LightningModule, the CLI and the benchmark
all call these functions.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lethe import lm
from lethe.adapters import ArchAdapter, get_adapter, unwrap
from lethe.hooks import TraceDict
from lethe.precision import cast_frozen_weights

DEFAULT_STEPS = 20
DEFAULT_THRESHOLD = 0.2
DEFAULT_SHARE = 0.5


class AttributionError(ValueError):
    pass


class MultiTokenTargetError(AttributionError):
    pass


@dataclass(frozen=True, order=True)
class Neuron:
    """One FFN intermediate unit: ``stack`` ("decoder"/"encoder"), ``layer``, ``index``."""

    stack: str
    layer: int
    index: int

    def to_list(self) -> list:
        return [self.stack, self.layer, self.index]

    @classmethod
    def from_list(cls, item: Sequence) -> Neuron:
        if len(item) != 3:
            raise AttributionError(f"a neuron is [stack, layer, index], got {item!r}")
        return cls(str(item[0]), int(item[1]), int(item[2]))


Site = tuple[str, int]  # (stack, layer)


# --------------------------------------------------------------------------- sites and positions
def resolve_sites(model: nn.Module, layers: Sequence[int] | None = None, stacks: Sequence[str] | None = None,
                  adapter: ArchAdapter | None = None) -> list[Site]:
    """(stack, layer) pairs to attribute: every layer of every stack by default; bad layers raise."""
    adapter = adapter or get_adapter(model)
    stacks = list(stacks) if stacks else list(adapter.stacks)
    sites: list[Site] = []
    for stack in stacks:
        adapter.stack(stack)  # raises for an unknown stack
        n = adapter.num_layers(model, stack)
        chosen = range(n) if layers is None else layers
        if layers is not None and not list(layers):
            raise AttributionError("layers is an empty list: name at least one layer, or null for all")
        for layer in chosen:
            sites.append((stack, adapter.check_layer(model, layer, stack)))
    return list(dict.fromkeys(sites))


def prediction_positions(batch: dict[str, torch.Tensor], family: str, stack: str) -> torch.Tensor | None:
    """Per-row index of the neuron position in ``stack``'s sequence, or None for "every real position".

    decoder: the token before the first target token; mlm: the first mask; seq2seq decoder: 0;
    seq2seq encoder: None (all source positions).
    """
    labels = batch["labels"]
    is_t = labels != lm.IGNORE
    if not bool(is_t.any(-1).all()):
        raise AttributionError("a row of the batch has no target token")
    first = is_t.float().argmax(-1)
    if family == "decoder":
        if bool((first == 0).any()):
            raise AttributionError("a decoder target needs at least one token before it (BOS or prompt)")
        return first - 1
    if family == "mlm":
        return first
    if family == "seq2seq":
        return torch.zeros_like(first) if stack == "decoder" else None
    raise AttributionError(f"unknown family {family!r}")


def target_probability_from_logits(logits: torch.Tensor, labels: torch.Tensor, family: str) -> torch.Tensor:
    """Joint teacher-forced probability of each row's target tokens, differentiable."""
    tok, _ = lm.token_logprobs(logits, labels, family)
    return torch.exp(tok.sum(-1))


def encode_fact(tokenizer, family: str, prompts: Sequence[str], target: str) -> dict[str, torch.Tensor]:
    """Encode prompts with one target, refusing what attribution cannot handle."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise AttributionError(f"empty prompt list for target {target!r}: give at least one prompt")
    if not target or not str(target).strip():
        raise AttributionError("empty target")
    n_tok = len(tokenizer(lm.target_text(target), add_special_tokens=False)["input_ids"])
    if family == "mlm" and n_tok != 1:
        raise MultiTokenTargetError(
            f"target {target!r} is {n_tok} tokens; Knowledge-Neurons attribution for a masked LM needs a "
            "single-token target (one [MASK] = one prediction position). Pick a single-token object or "
            "attribute with a decoder / encoder-decoder model.")
    return lm.encode_pairs(tokenizer, family, list(prompts), [target] * len(prompts))


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients (only the scaled activations need them); eval mode; flags restored."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)


def _row(batch: dict[str, torch.Tensor], i: int, family: str) -> dict[str, torch.Tensor]:
    """Row i without its padding (a single example needs none)."""
    n = int(batch["attention_mask"][i].sum())
    lab = batch["labels"][i:i + 1]
    if family == "seq2seq":  # labels have their own length
        lab = lab[:, :int((lab[0] != lm.IGNORE).nonzero().max()) + 1]
    else:
        lab = lab[:, :n]
    return {"input_ids": batch["input_ids"][i:i + 1, :n], "attention_mask": batch["attention_mask"][i:i + 1, :n],
            "labels": lab}


def _as_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, seq, ffn) view of an FFN activation; OPT flattens it to (rows * seq, ffn)."""
    if x.dim() == 3:
        return x
    if x.dim() == 2 and x.shape[0] % rows == 0:
        return x.view(rows, x.shape[0] // rows, x.shape[1])
    raise AttributionError(f"unexpected FFN activation shape {tuple(x.shape)} for a batch of {rows} rows")


# --------------------------------------------------------------------------- integrated gradients
@dataclass
class IGResult:
    """Attribution of one example: ``scores[site]`` is a (ffn,) tensor; ``prob`` is P(target) unscaled."""

    scores: dict[Site, torch.Tensor]
    prob: float


def integrated_gradients(model: nn.Module, example: dict[str, torch.Tensor], family: str, sites: Sequence[Site],
                         steps: int = DEFAULT_STEPS, max_rows: int | None = 256, fast: bool = True,
                         adapter: ArchAdapter | None = None) -> IGResult:
    """IG of P(target) to every neuron of ``sites`` for ONE encoded example (a batch of one row).

    The m steps of a site are rows of one batch, and sites are packed together until a
    batch holds ``max_rows`` rows (a site's steps may straddle two batches; the sums are
    the same). ``max_rows=1, fast=False`` is the plain step-by-step computation (m
    sequential passes per site), kept as the reference for tests and the benchmark.

    ``fast`` (decoder and MLM families) skips work that every row shares: the blocks below
    the lowest attributed layer run once on one row and the batch is widened at that
    block's input (all rows are the same example, so batch-1 masks broadcast), and the LM
    head is applied only at the target-predicting positions. On a decoder the positions
    before the scaled one never see the scaling (attention is causal): their keys and
    values are computed once (:class:`lethe.lm.PrefixCache`) and every batch runs only the
    positions from the scaled one on (one token for a one-token target). Since rows before
    the widened block are identical, the lowest site of a batch sets the cost; packing
    sites still pays where rows are short (decoders, with the cached prefix: 4 sites or more
    per batch ran 1.5x faster than one on a GPT-2-small-sized model) or the model is tiny.
    """
    if steps < 1:
        raise AttributionError(f"steps must be >= 1, got {steps}")
    if example["input_ids"].shape[0] != 1:
        raise AttributionError("integrated_gradients takes one example; loop over rows (or use attribute)")
    if not sites:
        raise AttributionError("no sites (layers) to attribute")
    adapter = adapter or get_adapter(model)
    device = next(model.parameters()).device
    example = lm.to_device(example, device)
    max_rows = max(1, max_rows or steps * len(sites))
    alphas = torch.arange(1, steps + 1, dtype=torch.float64, device=device) / steps
    work = [(site, k) for site in sites for k in range(steps)]
    grad_sum: dict[Site, torch.Tensor] = {}
    base: dict[Site, torch.Tensor] = {}
    prob_real: float | None = None
    positions = {stack: prediction_positions(example, family, stack) for stack in {s for s, _ in sites}}
    fast = fast and family in ("decoder", "mlm")
    labels = example["labels"]
    prefix, start_at = None, 0
    if fast:  # logits only where a target token is predicted
        tpos = (labels[0] != lm.IGNORE).nonzero().squeeze(-1)
        keep = tpos - 1 if family == "decoder" else tpos
        head_name = adapter.lm_head
        sliced_labels = labels[:, tpos]
        if family == "decoder":  # the last target token predicts nothing that is scored: it is not run
            example = {k: v[:, :int(tpos[-1])] if k != "labels" else v for k, v in example.items()}
        if family == "decoder" and lm.PrefixCache.argument(model):
            # the tokens before the prediction position never see the scaling: their keys and values are
            # computed once, and every batch runs only the positions from the scaled one on
            start_at = int(positions["decoder"][0])
            prefix = lm.PrefixCache(model, example["input_ids"], example["attention_mask"], None, start_at)
            positions = {"decoder": positions["decoder"] - start_at}
            keep = keep - start_at
    with frozen(model), cast_frozen_weights(unwrap(model)), torch.enable_grad():
        for start in range(0, len(work), max_rows):
            chunk = work[start:start + max_rows]
            rows = len(chunk)
            spans: dict[Site, tuple[int, list[int]]] = {}  # contiguous rows per site inside this chunk
            for r, (site, k) in enumerate(chunk):
                spans.setdefault(site, (r, []))[1].append(k)
            names = {adapter.mlp_out_name(layer, stack): (stack, layer) for stack, layer in spans}
            widen = None
            if fast:
                lowest = min(spans, key=lambda s: s[1])
                widen = adapter.block_name(lowest[1], lowest[0])
            leaves: dict[Site, torch.Tensor] = {}

            def edit(x: torch.Tensor, name: str, spans=spans, names=names, leaves=leaves, rows=rows,
                     widen=widen) -> torch.Tensor:
                if name == widen:
                    return x.expand(rows, *x.shape[1:]).contiguous()
                if fast and name == head_name:
                    return x[:, keep]
                site = names[name]
                r0, ks = spans[site]
                shape = x.shape
                x = _as_rows(x, rows)
                pos = positions[site[0]]
                idx = slice(None) if pos is None else pos[:1]
                real = x[r0:r0 + 1, idx].detach()  # (1, npos, ffn), the unscaled activation
                real = real.to(torch.promote_types(real.dtype, torch.float32))
                base[site] = real[0]
                scaled = (alphas[ks].to(real.dtype).view(-1, 1, 1) * real).requires_grad_(True)
                leaves[site] = scaled
                x = x.clone()
                x[r0:r0 + len(ks), idx] = scaled.to(x.dtype)
                return x.reshape(shape)

            hooked = list(names) + ([widen, head_name] if fast else [])
            batch = example if fast else {k: v.repeat(rows, 1) for k, v in example.items()}
            with TraceDict(model, hooked, retain_output=False, edit_input=edit):
                if prefix is not None:  # rows are widened at block `lowest`: so is its cache and every later one
                    low = lowest[1]
                    cache = prefix.build(lambda i, t, low=low, rows=rows: t.expand(rows, *t.shape[1:]) if i >= low else t)
                    length = example["input_ids"].shape[1]
                    logits = model(input_ids=example["input_ids"][:, start_at:], attention_mask=example["attention_mask"],
                                   position_ids=torch.arange(start_at, length, device=device)[None],
                                   use_cache=True, **{prefix.arg: cache}).logits
                else:
                    logits = lm.forward_logits(model, batch, family)
            if fast:
                if logits.shape[:2] != (rows, len(keep)):
                    raise AttributionError(f"fast attribution got logits of shape {tuple(logits.shape)}; this "
                                           "architecture needs fast=False")
                probs = target_probability_from_logits(logits, sliced_labels.expand(rows, -1), "mlm")
            else:
                probs = target_probability_from_logits(logits, batch["labels"], family)
            order = list(leaves)
            grads = torch.autograd.grad(probs.sum(), [leaves[s] for s in order], allow_unused=True)
            for site, g in zip(order, grads):
                if g is None:
                    g = torch.zeros_like(leaves[site])
                grad_sum[site] = grad_sum.get(site, 0) + g.sum(0)  # (npos, ffn)
            # the row scaled by alpha=1 sees the real activation: P(target) unscaled
            for r, (site, k) in enumerate(chunk):
                if k == steps - 1 and prob_real is None:
                    prob_real = float(probs[r].detach())
    scores = {site: (base[site] * grad_sum[site] / steps).sum(0).detach().cpu() for site in sites}
    return IGResult(scores=scores, prob=float(prob_real))


# --------------------------------------------------------------------------- facts
@dataclass
class FactAttribution:
    """Everything attribution says about one fact.

    ``scores[stack]``: (n_prompts, n_layers_attributed, ffn) with ``layers[stack]`` the layer numbers;
    ``coarse[p]``: the neurons above ``threshold * max`` for prompt p; ``refined``: the neurons in
    at least ``share`` of the prompts, best mean score first.
    """

    prompts: list[str]
    target: str
    layers: dict[str, list[int]]
    scores: dict[str, torch.Tensor]
    coarse: list[list[Neuron]]
    refined: list[Neuron]
    probs: list[float]
    threshold: float
    share: float
    steps: int
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "prompts": self.prompts, "target": self.target, "layers": self.layers,
            "coarse": [[n.to_list() for n in c] for c in self.coarse],
            "refined": [n.to_list() for n in self.refined],
            "probs": self.probs, "threshold": self.threshold, "share": self.share, "steps": self.steps,
            **({"meta": self.meta} if self.meta else {}),
        }

    def mean_scores(self, stack: str) -> torch.Tensor:
        return self.scores[stack].mean(0)


def coarse_neurons(scores: dict[str, torch.Tensor], layers: dict[str, list[int]],
                   threshold: float = DEFAULT_THRESHOLD) -> list[Neuron]:
    """Neurons of one prompt scoring above ``threshold`` x the prompt's maximum (over every site)."""
    top = max(float(s.max()) for s in scores.values())
    if top <= 0:
        return []
    out = []
    for stack, s in scores.items():
        for li, idx in (s > threshold * top).nonzero().tolist():
            out.append(Neuron(stack, layers[stack][li], idx))
    return sorted(out)


def refine(coarse: Sequence[Sequence[Neuron]], share: float = DEFAULT_SHARE) -> list[Neuron]:
    """Neurons present in at least ``share`` of the prompts' coarse sets (the paper's p)."""
    if not coarse:
        return []
    if not 0 < share <= 1:
        raise AttributionError(f"share (p) must be in (0, 1], got {share}")
    counts = Counter(n for c in coarse for n in set(c))
    need = share * len(coarse) - 1e-9
    return sorted(n for n, c in counts.items() if c >= need)


def attribute(model: nn.Module, tokenizer, family: str, prompts: Sequence[str], target: str,
              layers: Sequence[int] | None = None, stacks: Sequence[str] | None = None,
              steps: int = DEFAULT_STEPS, threshold: float = DEFAULT_THRESHOLD, share: float = DEFAULT_SHARE,
              max_rows: int | None = 256, fast: bool = True, adapter: ArchAdapter | None = None
              ) -> FactAttribution:
    """Attribute one fact (several prompts, one target): scores, coarse and refined neurons."""
    adapter = adapter or get_adapter(model)
    sites = resolve_sites(model, layers, stacks, adapter)
    batch = encode_fact(tokenizer, family, prompts, target)
    by_stack: dict[str, list[int]] = defaultdict(list)
    for stack, layer in sites:
        by_stack[stack].append(layer)
    per_prompt: list[dict[str, torch.Tensor]] = []
    coarse, probs = [], []
    for i in range(batch["input_ids"].shape[0]):
        res = integrated_gradients(model, _row(batch, i, family), family, sites, steps, max_rows, fast, adapter)
        sc = {stack: torch.stack([res.scores[(stack, layer)] for layer in ls]) for stack, ls in by_stack.items()}
        per_prompt.append(sc)
        coarse.append(coarse_neurons(sc, by_stack, threshold))
        probs.append(res.prob)
    scores = {stack: torch.stack([p[stack] for p in per_prompt]) for stack in by_stack}
    refined = refine(coarse, share)
    mean = {stack: s.mean(0) for stack, s in scores.items()}
    pos = {stack: {layer: i for i, layer in enumerate(ls)} for stack, ls in by_stack.items()}
    refined.sort(key=lambda n: -float(mean[n.stack][pos[n.stack][n.layer], n.index]))
    return FactAttribution(prompts=list(prompts), target=target, layers=dict(by_stack), scores=scores,
                           coarse=coarse, refined=refined, probs=probs, threshold=threshold, share=share,
                           steps=steps)


def relation_neurons(attributions: Sequence[FactAttribution] | Sequence[Sequence[Neuron]],
                     min_share: float = 0.1, max_neurons: int | None = 20) -> list[Neuron]:
    """A relation's neurons: refined neurons recurring in at least ``min_share`` of its facts, most frequent first."""
    sets = [a.refined if isinstance(a, FactAttribution) else a for a in attributions]
    if not sets:
        raise AttributionError("no facts given for the relation")
    counts = Counter(n for s in sets for n in set(s))
    need = max(1.0, min_share * len(sets)) - 1e-9
    keep = sorted((n for n, c in counts.items() if c >= need), key=lambda n: (-counts[n], n))
    return keep[:max_neurons] if max_neurons else keep


def random_like(model: nn.Module, neurons: Sequence[Neuron], seed: int = 0,
                adapter: ArchAdapter | None = None) -> list[Neuron]:
    """As many random neurons per (stack, layer) as ``neurons`` has there, avoiding them (the baseline)."""
    adapter = adapter or get_adapter(model)
    rng = random.Random(seed)
    per_site: dict[Site, set[int]] = defaultdict(set)
    for n in neurons:
        per_site[(n.stack, n.layer)].add(n.index)
    out = []
    for (stack, layer), taken in sorted(per_site.items()):
        width = adapter.ffn_width(model, layer, stack)
        pool = [i for i in range(width) if i not in taken]
        out += [Neuron(stack, layer, i) for i in rng.sample(pool, min(len(taken), len(pool)))]
    return sorted(out)


# --------------------------------------------------------------------------- operations
def _group(neurons: Sequence[Neuron], adapter: ArchAdapter, model: nn.Module) -> dict[str, tuple[str, list[int]]]:
    groups: dict[str, tuple[str, list[int]]] = {}
    for n in neurons:
        name = adapter.mlp_out_name(adapter.check_layer(model, n.layer, n.stack), n.stack)
        width = adapter.ffn_width(model, n.layer, n.stack)
        if not 0 <= n.index < width:
            raise AttributionError(f"neuron {n.to_list()} is out of range: that FFN has {width} neurons")
        groups.setdefault(name, (n.stack, []))[1].append(n.index)
    return groups


@contextlib.contextmanager
def scale_activations(model: nn.Module, neurons: Sequence[Neuron], factor: float,
                      batch: dict[str, torch.Tensor] | None = None, family: str | None = None,
                      adapter: ArchAdapter | None = None) -> Iterator[None]:
    """Multiply the neurons' activations by ``factor`` during forward passes inside the context.

    With ``batch`` (and ``family``), only at each row's neuron position (see the module
    docstring), as in the paper; without, at every position. Hooks only: the weights are
    never touched, and the model is exactly as before once the context exits.
    """
    adapter = adapter or get_adapter(model)
    groups = _group(neurons, adapter, model)
    if batch is not None and family is None:
        family = adapter.family
    positions = {}
    if batch is not None:
        for stack in {s for s, _ in groups.values()}:
            positions[stack] = prediction_positions(batch, family, stack)

    def edit(x: torch.Tensor, name: str) -> torch.Tensor:
        stack, idx = groups[name]
        index = torch.tensor(idx, device=x.device)
        x = x.clone()
        pos = positions.get(stack)
        if pos is None:
            x[..., index] = x[..., index] * factor
        else:
            shape = x.shape
            x = _as_rows(x, pos.shape[0])
            rows = torch.arange(x.shape[0], device=x.device)
            sel = x[rows, pos.to(x.device)]
            sel[:, index] = sel[:, index] * factor
            x[rows, pos.to(x.device)] = sel
            x = x.reshape(shape)
        return x

    if not groups:
        yield
        return
    with TraceDict(model, list(groups), retain_output=False, edit_input=edit):
        yield


def suppress(model: nn.Module, neurons: Sequence[Neuron], batch=None, family=None, adapter=None):
    """Zero the neurons' activations inside the context (``with suppress(model, neurons, batch): ...``)."""
    return scale_activations(model, neurons, 0.0, batch, family, adapter)


def enhance(model: nn.Module, neurons: Sequence[Neuron], batch=None, family=None, adapter=None):
    """Double the neurons' activations inside the context."""
    return scale_activations(model, neurons, 2.0, batch, family, adapter)


@torch.no_grad()
def fact_probabilities(model: nn.Module, tokenizer, family: str, prompts: Sequence[str], targets: Sequence[str],
                       neurons: Sequence[Neuron] = (), factor: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """P(target | prompt) (joint, teacher-forced), optionally with neurons scaled at their positions."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = lm.to_device(lm.encode_pairs(tokenizer, family, prompts[s:s + batch_size],
                                             targets[s:s + batch_size]), device)
        ctx = scale_activations(model, neurons, factor, batch, family) if neurons and factor != 1.0 \
            else contextlib.nullcontext()
        with ctx:
            logits = lm.forward_logits(model, batch, family)
        out.append(target_probability_from_logits(logits, batch["labels"], family).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def first_token_accuracy(model: nn.Module, tokenizer, family: str, prompts: Sequence[str],
                         targets: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Per pair: is the target's first token the top-1 prediction at the prediction position."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = lm.to_device(lm.encode_pairs(tokenizer, family, prompts[s:s + batch_size],
                                             targets[s:s + batch_size]), device)
        logits = lm.forward_logits(model, batch, family)
        lg, lb = lm.aligned(logits, batch["labels"], family)
        first = (lb != lm.IGNORE).float().argmax(-1)
        rows = torch.arange(lb.shape[0], device=lb.device)
        out.append((lg[rows, first].argmax(-1) == lb[rows, first]).cpu())
    return torch.cat(out)


def _param_name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in unwrap(model).named_modules():
        if mod is module:
            return f"{name}.weight"
    raise AttributionError("module not found in model")


def value_deltas(model: nn.Module, neurons: Sequence[Neuron], new_values, adapter: ArchAdapter | None = None
                 ) -> dict[str, torch.Tensor]:
    """Additive weight deltas that set each neuron's value vector (a column of the (out, in) weight).

    ``new_values(neuron, current_value) -> new value``; the deltas are in the parameter's own
    storage layout (GPT-2's Conv1D stores the transpose), ready for an EditArtifact.
    """
    adapter = adapter or get_adapter(model)
    deltas: dict[str, torch.Tensor] = {}
    for name, (stack, idx) in _group(neurons, adapter, model).items():
        module = adapter.module(model, name)
        pname = _param_name(model, module)
        w = adapter.weight_out_in(module).detach()
        delta = torch.zeros_like(w)
        for i in idx:
            delta[:, i] = new_values(Neuron(stack, -1, i), w[:, i]) - w[:, i]
        deltas[pname] = (delta.T if adapter.transposed else delta).contiguous()
    return deltas


def erase_deltas(model: nn.Module, neurons: Sequence[Neuron], adapter: ArchAdapter | None = None
                 ) -> dict[str, torch.Tensor]:
    """Deltas zeroing the neurons' value vectors (their FFN output-weight slots): relation erasure."""
    if not neurons:
        raise AttributionError("no neurons to erase")
    return value_deltas(model, neurons, lambda n, v: torch.zeros_like(v), adapter)


def target_embedding(model: nn.Module, tokenizer, target: str, adapter: ArchAdapter | None = None) -> torch.Tensor:
    """The word embedding of the target's FIRST token (multi-token targets use their first token).

    The token embedding table (``adapter.embeddings``), never the position embeddings.
    """
    adapter = adapter or get_adapter(model)
    ids = tokenizer(lm.target_text(target), add_special_tokens=False)["input_ids"]
    if not ids:
        raise AttributionError(f"target {target!r} tokenises to nothing")
    return adapter.embeddings(model).weight[ids[0]].detach()


def edit_deltas(model: nn.Module, tokenizer, neurons: Sequence[Neuron], target_old: str, target_new: str,
                lambda_old: float = 1.0, lambda_new: float = 8.0, adapter: ArchAdapter | None = None
                ) -> dict[str, torch.Tensor]:
    """The paper's fact update: each value vector v -= lambda_old * E[old]; v += lambda_new * E[new]."""
    if not neurons:
        raise AttributionError("no neurons to edit")
    adapter = adapter or get_adapter(model)
    e_old = target_embedding(model, tokenizer, target_old, adapter)
    e_new = target_embedding(model, tokenizer, target_new, adapter)
    out_dim = adapter.weight_out_in(adapter.module(model, adapter.mlp_out_name(
        neurons[0].layer, neurons[0].stack))).shape[0]
    if e_old.shape[0] != out_dim:
        raise AttributionError(f"the word embeddings are {e_old.shape[0]}-wide but the FFN writes {out_dim}: "
                               "this model projects its embeddings; the paper's edit does not apply")
    shift = (lambda_new * e_new - lambda_old * e_old)
    return value_deltas(model, neurons, lambda n, v: v + shift.to(v.dtype), adapter)
