"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

Where does a model store "subject -> object"? Three runs of the same prompt:

1. clean: the model's probability P of the target (CounterFact's P = exp(-mean token NLL));
2. corrupted: Gaussian noise of scale ν is added to the token embeddings of the subject, so the
   model can no longer tell who the prompt is about; P drops to P*;
3. corrupted-with-restoration: one hidden state (layer l, token t) is put back to its clean
   value; if P comes back, that state carries the fact. Indirect effect IE(l, t) = P_restored - P*.

Three kinds of state are restored: the block output (the residual stream h_l), and the MLP or
attention contribution over a window of ``window`` layers centred on l (the paper's 10 of 48
for GPT-2 XL; here about a fifth of the depth by default). The noise scale is ν = 3 × the
standard deviation of the subject tokens' embeddings (the paper computes it over many subjects:
pass ``noise_subjects``). The same noise samples serve every restoration, so the differences
between cells are the restoration's doing only.

Families: decoder-only models are scored at the target after the prompt; masked LMs at the
``[MASK]`` tokens; encoder-decoders on the decoder's output, with the noise put on the
encoder's input embeddings and the ENCODER's states restored (what ROME/MEMIT edit there).

Efficiency: restorations run as batches of rows (``batch_size`` rows per forward = several
restorations × noise samples), each row restoring its own (layer(s), token) through one set of
hooks, so a whole grid costs ⌈layers·tokens·samples / batch_size⌉ forwards.

Choosing an edit layer: average the MLP indirect effects of many facts at the subject's last
token (``average_effects`` / ``suggest_layers``); ROME edits the peak, MEMIT a range ending there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lethe import lm
from lethe.adapters import ArchAdapter, get_adapter, unwrap
from lethe.hooks import Trace, TraceDict
from lethe.io import save_png
from lethe.locate import SubjectNotFoundError, fill, subject_tokens

KINDS = ("block", "mlp", "attn")
KIND_LABELS = {"block": "single restored layer (residual stream)", "mlp": "MLP contribution",
               "attn": "attention contribution"}
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
              "further tokens", "prediction position")


class TracingError(ValueError):
    pass


# --------------------------------------------------------------------------- prompts and tokens
def _input_embeddings(model: nn.Module, adapter: ArchAdapter, family: str) -> nn.Module:
    """The embedding module whose output is corrupted (for seq2seq: the encoder's own)."""
    if family == "seq2seq":
        return unwrap(model).get_encoder().get_input_embeddings()
    return adapter.embeddings(model)


@torch.no_grad()
def embedding_noise_level(model: nn.Module, tok, subjects: Sequence[str], factor: float = 3.0,
                          adapter: ArchAdapter | None = None, family: str | None = None) -> float:
    """ν = factor × the standard deviation of the subjects' token embeddings (the paper's 3σ)."""
    adapter = adapter or get_adapter(model)
    family = family or adapter.family
    ids = [i for s in subjects for i in tok(" " + s.strip(), add_special_tokens=False)["input_ids"]]
    if not ids:
        raise TracingError("no subject tokens to measure the embedding spread on")
    emb = _input_embeddings(model, adapter, family)
    device = next(model.parameters()).device
    vecs = emb(torch.tensor(ids, device=device)).float()
    return float(factor * vecs.std())


# --------------------------------------------------------------------------- results
@dataclass
class TraceResult:
    """One fact's trace. ``scores[kind]`` is (layers × grid tokens) of P with that state restored."""

    prompt: str
    subject: str
    target: str
    family: str
    stack: str
    tokens: list[str]
    subject_range: tuple[int, int]
    answer_position: int
    high_score: float
    low_score: float
    noise: float
    samples: int
    window: int
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def indirect_effect(self, kind: str) -> torch.Tensor:
        return self.scores[kind] - self.low_score

    @property
    def total_effect(self) -> float:
        return self.high_score - self.low_score

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt, "subject": self.subject, "target": self.target, "family": self.family,
            "stack": self.stack, "tokens": self.tokens, "subject_range": list(self.subject_range),
            "answer_position": self.answer_position, "clean_p": self.high_score, "corrupted_p": self.low_score,
            "total_effect": self.total_effect, "noise": self.noise, "samples": self.samples,
            "window": self.window, "protocol": "P = exp(-mean target-token NLL); IE = P_restored - P_corrupted",
            "restored_p": {k: _rounded(v) for k, v in self.scores.items()},
            "indirect_effect": {k: _rounded(self.indirect_effect(k)) for k in self.scores},
        }


def _rounded(t: torch.Tensor, digits: int = 5) -> list:
    return torch.round(t.float(), decimals=digits).tolist()


# --------------------------------------------------------------------------- the trace
def _module_names(adapter: ArchAdapter, model: nn.Module, kind: str, stack: str) -> list[str]:
    n = adapter.num_layers(model, stack)
    if kind == "block":
        return [adapter.block_name(i, stack) for i in range(n)]
    if kind == "mlp":
        return [adapter.mlp_out_name(i, stack) for i in range(n)]
    if kind == "attn":
        return [adapter.attn_name(i, stack) for i in range(n)]
    raise TracingError(f"unknown kind {kind!r}; kinds: {KINDS}")


def window_layers(center: int, window: int, n_layers: int) -> list[int]:
    """The layers restored together for a windowed (MLP / attention) restoration centred on ``center``."""
    lo = max(0, center - window // 2)
    hi = min(n_layers, center - (-window // 2))
    return list(range(lo, max(hi, lo + 1)))


def _btd(t: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    return t.view(rows, length, t.shape[-1]) if t.dim() == 2 else t


class _Runner:
    """Runs rows of (noised, partly restored) copies of one encoded prompt and scores the target."""

    def __init__(self, model, adapter, family, batch, n_target: int) -> None:
        self.model, self.adapter, self.family, self.batch = model, adapter, family, batch
        self.length = batch["input_ids"].shape[1]
        self.keep = None
        if family == "decoder" and lm.forward_accepts(model, "logits_to_keep"):
            # the target tokens are the last n_target tokens: only their predictions are needed
            self.keep = n_target + 1

    def forward(self, rows: int) -> torch.Tensor:
        """P(target) per row, for ``rows`` copies of the prompt (hooks active outside do the rest)."""
        b = {k: v.expand(rows, *v.shape[1:]) for k, v in self.batch.items()}
        m = unwrap(self.model)
        if self.family == "seq2seq":
            enc = m.get_encoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            logits = m(encoder_outputs=enc, attention_mask=b["attention_mask"], labels=b["labels"]).logits
            labels = b["labels"]
        elif self.keep is not None:
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       logits_to_keep=self.keep).logits
            labels = b["labels"][:, -self.keep:]
        else:
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            labels = b["labels"]
        tok, mask = lm.token_logprobs(logits, labels, self.family)
        return torch.exp(tok.sum(-1) / mask.sum(-1).clamp(min=1))


@torch.no_grad()
def trace_fact(model: nn.Module, tok, prompt: str, subject: str, target: str | None = None, *,
               kinds: Sequence[str] = KINDS, noise: float | None = None, noise_subjects: Sequence[str] | None = None,
               samples: int = 10, window: int | None = None, stack: str | None = None, batch_size: int = 128,
               seed: int = 0, adapter: ArchAdapter | None = None, family: str | None = None,
               progress: bool = False) -> TraceResult:
    """Causal trace of one fact (see the module docstring).

    Args:
        prompt: text with ``{}`` for the subject (or containing the subject literally).
        target: the object whose probability is traced; None = the model's own top-1 next token.
        noise: ν; None = 3 × std of the embeddings of ``noise_subjects`` (default: this subject).
        samples: noise samples per cell (P is averaged over them). ``noise=0`` corrupts nothing.
        window: layers restored together for the MLP/attention kinds (default max(1, round(layers/5))).
        batch_size: rows per forward pass (restorations × samples).
    """
    from tqdm.auto import tqdm

    adapter = adapter or get_adapter(model)
    family = family or adapter.family
    kinds = list(dict.fromkeys(kinds))
    for k in kinds:
        if k not in KINDS:
            raise TracingError(f"unknown kind {k!r}; kinds: {KINDS}")
    if samples < 1:
        raise TracingError(f"samples must be at least 1, got {samples}")
    stack = stack or adapter.default_stack
    if family == "seq2seq" and stack != "encoder":
        raise TracingError("a seq2seq model is traced on its encoder (where the subject is); use stack='encoder'")
    adapter.stack(stack)
    n_layers = adapter.num_layers(model, stack)
    window = window or max(1, round(n_layers / 5))
    if window < 1:
        raise TracingError(f"window must be at least 1, got {window}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    try:
        text, c0, c1 = fill(prompt, subject)
    except SubjectNotFoundError as err:
        raise TracingError(str(err)) from err
    if target is None:
        target = predict_next_token(model, tok, family, text)
    batch = lm.to_device(lm.encode_pairs(tok, family, [text], [target]), device)
    lead = len(lm._bos_prefix(tok))
    try:
        s0, s1 = subject_tokens(tok, text, c0, c1, lead)
    except SubjectNotFoundError as err:
        raise TracingError(str(err)) from err
    ids = batch["input_ids"][0].tolist()
    n_target = int((batch["labels"][0] != lm.IGNORE).sum())
    n_prompt = lead + len(tok(text, add_special_tokens=False)["input_ids"])
    if family == "decoder":
        grid_len, answer = n_prompt, n_prompt - 1
    elif family == "mlm":
        grid_len, answer = len(ids), n_prompt
    else:
        grid_len, answer = len(ids), len(ids) - 1
    tokens = [tok.decode([i]) for i in ids[:grid_len]]

    if noise is None:
        noise = embedding_noise_level(model, tok, list(noise_subjects or [subject]), 3.0, adapter, family)
    gen = torch.Generator().manual_seed(seed)
    emb_mod = _input_embeddings(model, adapter, family)
    width = emb_mod.weight.shape[-1]
    noise_t = (noise * torch.randn(samples, s1 - s0, width, generator=gen)).to(device)

    runner = _Runner(model, adapter, family, batch, n_target)
    names = {k: _module_names(adapter, model, k, stack) for k in kinds}
    all_names = [n for k in kinds for n in names[k]]
    length = runner.length

    # clean run: the states to restore, and the clean probability
    with TraceDict(model, all_names, retain_output=True, detach=True, clone=True) as td:
        high = float(runner.forward(1)[0])
    clean = {n: _btd(td[n].output, 1, length)[0] for n in all_names}

    plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    state = {"noise": None}

    def corrupt(x: torch.Tensor, _name: str) -> torch.Tensor:
        nz = state["noise"]
        if nz is None:
            return x
        x = x.clone()
        x[:, s0:s1] = x[:, s0:s1] + nz.to(x.dtype)
        return x

    def restore(x: torch.Tensor, name: str) -> torch.Tensor:
        if name not in plan:
            return x
        rows, toks = plan[name]
        out = _btd(x, state["rows"], length).clone()
        out[rows, toks] = clean[name][toks].to(out.dtype)
        return out.view(x.shape)

    def run_rows(cells: list[tuple[str, list[int], int]]) -> torch.Tensor:
        """Rows = each cell (kind, layers, token) × samples (+ plain corrupted rows for an empty cell list)."""
        n_cells = max(1, len(cells))
        rows = n_cells * samples
        state["rows"] = rows
        state["noise"] = noise_t.repeat(n_cells, 1, 1)
        plan.clear()
        acc: dict[str, tuple[list[int], list[int]]] = {}
        for c, (kind, layers, t) in enumerate(cells):
            for layer in layers:
                r, ts = acc.setdefault(names[kind][layer], ([], []))
                r += range(c * samples, (c + 1) * samples)
                ts += [t] * samples
        for n, (r, ts) in acc.items():
            plan[n] = (torch.tensor(r, device=device), torch.tensor(ts, device=device))
        with Trace(model, _embedding_name(model, emb_mod), retain_output=False, edit_output=corrupt), \
                TraceDict(model, list(acc), retain_output=False, edit_output=restore):
            p = runner.forward(rows)
        return p.view(n_cells, samples).mean(-1)

    low = float(run_rows([])[0])
    cells = []
    for kind in kinds:
        for layer in range(n_layers):
            layers = [layer] if kind == "block" else window_layers(layer, window, n_layers)
            for t in range(grid_len):
                cells.append((kind, layers, t))
    per_batch = max(1, batch_size // samples)
    out = []
    for s in tqdm(range(0, len(cells), per_batch), desc="causal trace", disable=not progress, leave=False):
        out.append(run_rows(cells[s:s + per_batch]).cpu())
    flat = torch.cat(out) if out else torch.zeros(0)
    scores, i = {}, 0
    for kind in kinds:
        scores[kind] = flat[i:i + n_layers * grid_len].view(n_layers, grid_len).float()
        i += n_layers * grid_len
    model.train(was_training)
    return TraceResult(prompt=text, subject=subject, target=target, family=family, stack=stack, tokens=tokens,
                       subject_range=(s0, s1), answer_position=answer, high_score=high, low_score=low,
                       noise=float(noise), samples=samples, window=window, scores=scores)


def _embedding_name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in unwrap(model).named_modules():
        if mod is module:
            return name
    raise TracingError("the input embedding module is not part of the model")


@torch.no_grad()
def predict_next_token(model: nn.Module, tok, family: str, text: str) -> str:
    """The model's top-1 single-token answer after ``text`` (the paper traces the predicted token)."""
    device = next(model.parameters()).device
    probe = tok.unk_token or tok.eos_token or "x"
    batch = lm.to_device(lm.encode_pairs(tok, family, [text], [probe]), device)
    if family == "decoder":
        n = int((batch["labels"][0] != lm.IGNORE).sum())
        ids = batch["input_ids"][:, :-n]
        logits = unwrap(model)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    else:
        logits = lm.forward_logits(model, batch, family)
        pos = (batch["labels"][0] != lm.IGNORE).nonzero()[0, 0]
        logits = logits[0, pos]
    return tok.decode([int(logits.argmax())]).strip()


# --------------------------------------------------------------------------- averaging and layer choice
def token_categories(result: TraceResult) -> dict[str, list[int]]:
    """Grid positions of each of the paper's six token categories for one trace."""
    s0, s1 = result.subject_range
    ans = result.answer_position
    cats = {c: [] for c in CATEGORIES}
    cats["first subject token"] = [s0]
    cats["middle subject tokens"] = list(range(s0 + 1, s1 - 1))
    cats["last subject token"] = [s1 - 1]
    cats["prediction position"] = [ans]
    if s1 < ans:
        cats["first subsequent token"] = [s1]
        cats["further tokens"] = list(range(s1 + 1, ans))
    return cats


def average_effects(results: Sequence[TraceResult], kinds: Sequence[str] | None = None,
                    normalise: bool = True) -> dict[str, torch.Tensor]:
    """Mean indirect effect per kind as (layers × the six categories); NaN where no fact has the category.

    ``normalise`` divides each fact's IE by its total effect (clean - corrupted), so facts the noise
    barely hurts do not dilute the average; facts with a total effect ≤ 0 are skipped.
    """
    if not results:
        raise TracingError("no traces to average")
    kinds = list(kinds or results[0].scores)
    out = {}
    for kind in kinds:
        n_layers = results[0].scores[kind].shape[0]
        total = torch.zeros(n_layers, len(CATEGORIES))
        count = torch.zeros(len(CATEGORIES))
        for r in results:
            te = r.total_effect
            if normalise and te <= 0:
                continue
            ie = r.indirect_effect(kind) / (te if normalise else 1.0)
            for j, c in enumerate(CATEGORIES):
                pos = token_categories(r)[c]
                if pos:
                    total[:, j] += ie[:, pos].mean(-1)
                    count[j] += 1
        out[kind] = total / count.clamp(min=1)
        out[kind][:, count == 0] = math.nan
    return out


# Models at least this deep get MLP 0 left out of the suggestion: there (GPT-2, GPT-J, Llama...) the first MLP acts
# as an extended embedding of the subject's tokens, so every window holding it restores ~all of the effect
# without telling where the fact is stored (the papers edit mid layers). Tiny models keep it: lethe's 4-block
# world models store facts in MLPs 0-1.
DEEP_MODEL_LAYERS = 12


def suggest_layers(avg: dict[str, torch.Tensor], kind: str = "mlp", span: int | None = None,
                   window: int = 1) -> dict:
    """The layer whose ``kind`` contribution at the subject's last token matters most (ROME's layer), and
    a MEMIT range of ``span`` layers ending there (default: the layers holding at least half the peak).

    ``window``: the layers restored together per cell (``TraceResult.window``). In a model of at least
    ``DEEP_MODEL_LAYERS`` layers, cells whose window holds layer 0 are not candidates (listed as
    ``skipped_layers``)."""
    col = avg[kind][:, CATEGORIES.index("last subject token")]
    n = len(col)
    skipped = ([c for c in range(n) if 0 in window_layers(c, window, n)]
               if kind == "mlp" and n >= DEEP_MODEL_LAYERS else [])
    first = len(skipped)
    scores = torch.nan_to_num(col, nan=-1e9).clone()
    scores[:first] = -1e9
    peak = int(scores.argmax())
    if span is None:
        lo = peak
        while lo > first and col[lo - 1] >= 0.5 * col[peak]:
            lo -= 1
        layers = list(range(lo, peak + 1))
    else:
        layers = list(range(max(first, peak - span + 1), peak + 1))
    return {"kind": kind, "rome_layer": peak, "memit_layers": layers, "skipped_layers": skipped,
            "effect_at_last_subject_token": [round(float(x), 4) for x in col]}


# --------------------------------------------------------------------------- pictures
def plot_trace(result: TraceResult, path: str | Path, kinds: Sequence[str] | None = None,
               title: str | None = None) -> Path:
    """A row of heatmaps (tokens × layers, one per kind) of the indirect effect; the subject is starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(kinds or result.scores)
    n_tok = len(result.tokens)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 1, 0.32 * n_tok + 1.6), squeeze=False)
    s0, s1 = result.subject_range
    labels = [f"{t.strip() or repr(t)}*" if s0 <= i < s1 else (t.strip() or repr(t))
              for i, t in enumerate(result.tokens)]
    cmap = {"block": "Purples", "mlp": "Greens", "attn": "Reds"}
    for ax, kind in zip(axes[0], kinds):
        ie = result.indirect_effect(kind).T.numpy()
        im = ax.imshow(ie, aspect="auto", cmap=cmap.get(kind, "viridis"), vmin=min(0.0, float(ie.min())))
        ax.set_yticks(range(n_tok))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel(f"{result.stack} layer")
        ax.set_title(KIND_LABELS[kind] + (f"\n(window {result.window})" if kind != "block" else ""), fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05).set_label("indirect effect on P", fontsize=7)
    fig.suptitle(title or f"{result.prompt!r} → {result.target!r}   P clean {result.high_score:.3f}, "
                 f"corrupted {result.low_score:.3f}", fontsize=8)
    out = save_png(fig, path, dpi=110)
    return out


def plot_average(avg: dict[str, torch.Tensor], path: str | Path, title: str = "average indirect effect",
                 n_facts: int | None = None) -> Path:
    """The paper's Figure 1 style: mean IE per token category × layer, one panel per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(avg)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds) + 1, 3.2), squeeze=False)
    cmap = {"block": "Purples", "mlp": "Greens", "attn": "Reds"}
    for ax, kind in zip(axes[0], kinds):
        grid = avg[kind].T.numpy()
        im = ax.imshow(grid, aspect="auto", cmap=cmap.get(kind, "viridis"))
        ax.set_yticks(range(len(CATEGORIES)))
        ax.set_yticklabels(CATEGORIES, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(KIND_LABELS[kind], fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05).set_label("IE / total effect", fontsize=7)
    fig.suptitle(title + (f" over {n_facts} facts" if n_facts else ""), fontsize=9)
    out = save_png(fig, path, dpi=110)
    return out
