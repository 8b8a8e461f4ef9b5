"""Unlearning objectives: the loss math, and each objective registered by name with its typed arguments.

A training batch is ``{"forget": batch, "retain": batch}`` (``retain`` optional), each a
:mod:`lethe.lm` batch (labels = -100 outside the target tokens, so one loss serves decoders,
masked LMs and encoder-decoders). The loss is ``forget_weight · forget term + retain_weight ·
retain term``. Each term is a small dataclass registered in ``FORGET`` or ``RETAIN``; its fields
are the arguments a preset sets (``model.init_args.method_args`` / ``retain_args``):

=============  =====================================  ===================  ===============
``method``     forget term (arguments)                default retain term  reference model
=============  =====================================  ===================  ===============
``ga``         gradient ascent                        none                 no
``graddiff``   gradient ascent                        nll (descent)        no
``ga_kl``      gradient ascent                        kl to reference      yes (retain)
``npo``        NPO (beta 0.1)                         none                 yes (forget)
``simnpo``     SimNPO (beta 2.5, gamma 0)             none                 no
``rmu``        RMU steering (layer, stack, coef, seed) rmu activation match yes (retain)
``undial``     UNDIAL self-distillation (beta 10)     none                 yes (forget)
``idk_dpo``    DPO to a refusal (beta, refusals)      none                 yes (forget)
=============  =====================================  ===================  ===============

Adding an objective (UNDIAL, say) is one registered class (or function ``f(ctx, batch, **args)``) here or
in your own module (``method: my_module:my_objective`` in a preset imports it) and one YAML. An objective is called
with the running ``UnlearningModule`` (``ctx``: ``model``, ``family``, ``logits(model, batch)``,
``hidden(model, batch)``, ``reference()``) and its batch, and returns (loss, terms to log).
Signs: every objective returns a quantity to MINIMISE.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lethe import lm
from lethe.checks import ModuleConfigError
from lethe.registry import Registry


def gradient_ascent(forget_logits: torch.Tensor, forget_labels: torch.Tensor, family: str) -> torch.Tensor:
    """Jang et al. (2022): maximise the LM loss on the forget sequences, i.e. minimise its negative."""
    return -lm.lm_loss(forget_logits, forget_labels, family)


def retain_nll(retain_logits: torch.Tensor, retain_labels: torch.Tensor, family: str) -> torch.Tensor:
    """Ordinary LM loss on retain data: the descent half of GradDiff."""
    return lm.lm_loss(retain_logits, retain_labels, family)


def grad_diff(forget_logits: torch.Tensor, forget_labels: torch.Tensor, retain_logits: torch.Tensor,
              retain_labels: torch.Tensor, family: str, retain_weight: float = 1.0) -> torch.Tensor:
    """GradDiff: ascent on forget + ``retain_weight`` x descent on retain."""
    return gradient_ascent(forget_logits, forget_labels, family) + retain_weight * retain_nll(
        retain_logits, retain_labels, family)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                    family: str) -> torch.Tensor:
    """KL(p_ref || p_theta) averaged over the target positions (what the frozen model would predict there).

    Why forward KL from the reference: it penalises the trained model for dropping
    probability mass the original model put on retain continuations.
    """
    lg, lb = lm.aligned(logits, labels, family)
    rlg, _ = lm.aligned(ref_logits, labels, family)
    mask = lb != lm.IGNORE
    logp = torch.log_softmax(lg[mask].float(), -1)
    ref_logp = torch.log_softmax(rlg[mask].float(), -1)
    if logp.numel() == 0:
        return logits.sum() * 0.0
    return F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed target-token log-likelihood per example, and the number of target tokens."""
    tok, mask = lm.token_logprobs(logits, labels, family)
    return tok.sum(-1), mask.sum(-1)


def npo(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO (Zhang et al. 2024): -(2/beta) E log sigmoid(-beta (log pi_theta(y|x) - log pi_ref(y|x))).

    ``logp``/``ref_logp`` are per-example summed log-likelihoods. At theta = ref the loss
    is (2/beta) log 2 and its gradient is half gradient ascent's; it flattens as the
    forget likelihood falls below the reference's, which is what keeps NPO from collapsing.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def simnpo(logp: torch.Tensor, n_tokens: torch.Tensor, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): NPO without a reference, length-normalised, with a margin gamma.

    -(2/beta) E log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma).
    """
    norm = logp / n_tokens.clamp(min=1).to(logp.dtype)
    return -(2.0 / beta) * F.logsigmoid(-beta * norm - gamma).mean()


def dpo(win_logp: torch.Tensor, ref_win_logp: torch.Tensor, lose_logp: torch.Tensor, ref_lose_logp: torch.Tensor,
        beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) as unlearning uses it (IdkDPO, Maini et al. 2024):
    -(2/beta) E log sigmoid(beta ((log pi(w) - log ref(w)) - (log pi(l) - log ref(l)))), w the refusal, l the
    forget answer (summed log-likelihoods). Without the refusal term it is NPO."""
    margin = (win_logp - ref_win_logp) - (lose_logp - ref_lose_logp)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def undial(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, family: str,
           beta: float = 10.0) -> torch.Tensor:
    """UNDIAL (Dong et al. 2024): self-distillation towards the frozen model's distribution with the forget
    token's logit lowered by ``beta``; cross-entropy to those soft targets, averaged over the target tokens.
    The teacher never moves, so the loss is bounded (no collapse as under gradient ascent)."""
    lg, lb = lm.aligned(logits, labels, family)
    rlg, _ = lm.aligned(ref_logits, labels, family)
    mask = lb != lm.IGNORE
    if not mask.any():
        return logits.sum() * 0.0
    teacher = rlg[mask].float()
    teacher = teacher - beta * F.one_hot(lb[mask], teacher.shape[-1]).to(teacher.dtype)
    return -(torch.softmax(teacher, -1) * torch.log_softmax(lg[mask].float(), -1)).sum(-1).mean()


def masked_mean_sq(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of the mean squared entry (RMU's MSE over tokens)."""
    m = mask.to(diff.dtype).unsqueeze(-1)
    return ((diff.float() ** 2) * m).sum() / (m.sum().clamp(min=1) * diff.shape[-1])


def rmu_forget(hidden: torch.Tensor, mask: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """RMU forget term: push the layer's activations on forget tokens to the scaled random vector c*u."""
    return masked_mean_sq(hidden - control.to(hidden.dtype), mask)


def rmu_retain(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU retain term: keep the layer's activations on retain tokens equal to the frozen model's."""
    return masked_mean_sq(hidden - ref_hidden.to(hidden.dtype), mask)


def random_unit_vector(dim: int, seed: int) -> torch.Tensor:
    """RMU's fixed direction u: uniform in [0,1)^d, normalised (as in Li et al. 2024), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(dim, generator=g)
    return u / u.norm()


# --------------------------------------------------------------------------- objectives, registered by name
FORGET = Registry("unlearning forget objective")
RETAIN = Registry("unlearning retain objective")
# methods that pair a forget objective with another retain term than its default
METHODS: dict[str, tuple[str, str]] = {"graddiff": ("ga", "nll"), "ga_kl": ("ga", "kl")}


class UnlearningConfigError(ModuleConfigError):
    pass


class Objective:
    """One term of the unlearning loss; subclasses are dataclasses whose fields are the preset's arguments."""

    needs_reference: ClassVar[bool] = False
    default_retain: ClassVar[str] = "none"  # (forget objectives) the retain term a bare ``method`` gets

    def setup(self, ctx) -> None:
        """Called once with the module after the model is loaded (before LoRA wrapping)."""

    def __call__(self, ctx, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class FunctionObjective(Objective):
    """A plain registered function ``f(ctx, batch, **args) -> loss`` (or ``(loss, logs)``) as an objective."""

    def __init__(self, fn, **args) -> None:
        self.fn, self.args = fn, args

    def __call__(self, ctx, batch):
        out = self.fn(ctx, batch, **self.args)
        return out if isinstance(out, tuple) else (out, {})


def build_objective(registry: Registry, name: str, args: dict[str, Any] | None, field_name: str) -> Objective:
    """The objective ``name`` with its arguments; unknown names and arguments fail naming the preset field."""
    import inspect

    try:
        cls = registry.get(name)
    except ValueError as err:
        raise UnlearningConfigError(f"model.init_args.{field_name}={name!r}: {err}") from err
    if not isinstance(cls, type):  # a function: its keyword parameters after (ctx, batch) are its arguments
        known = set(list(inspect.signature(cls).parameters)[2:])
        unknown = set(args or {}) - known
        if unknown:
            raise UnlearningConfigError(f"model.init_args.{field_name}_args: {name} has no argument(s) "
                                        f"{sorted(unknown)}; its arguments: {sorted(known)}")
        return FunctionObjective(cls, **(args or {}))
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = set(args or {}) - known
    if unknown:
        raise UnlearningConfigError(f"model.init_args.{field_name}_args: {name} has no argument(s) {sorted(unknown)}; "
                                    f"its arguments: {sorted(known)}")
    return cls(**(args or {}))


def resolve_method(method: str, retain_loss: str | None) -> tuple[str, str]:
    """(forget objective, retain objective) names of a preset's ``method`` / ``retain_loss``."""
    if method in METHODS:
        forget, retain = METHODS[method]
    else:
        try:
            forget, retain = method, getattr(FORGET.get(method), "default_retain", "none")
        except ValueError as err:
            raise UnlearningConfigError(f"model.init_args.method={method!r} is not an unlearning method; choose one "
                                        f"of {sorted({*FORGET.names(), *METHODS})} (or module:Class)") from err
    if retain_loss is not None:
        if retain_loss not in RETAIN and ":" not in retain_loss:
            raise UnlearningConfigError(f"model.init_args.retain_loss={retain_loss!r}: use one of {RETAIN.names()}")
        retain = retain_loss
    if (retain == "rmu") != (forget == "rmu") and retain != "none":
        raise UnlearningConfigError("retain_loss 'rmu' goes with method 'rmu' only (and RMU needs it)")
    return forget, retain


def needs_retain(method: str, retain_loss: str | None = None) -> bool:
    return resolve_method(method, retain_loss)[1] != "none"


def with_reference(ctx, fn, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(model, batch)`` on the trained model and, without gradients, on the frozen reference."""
    ours = fn(ctx.model, batch)
    with torch.no_grad(), ctx.reference() as ref:
        return ours, fn(ref, batch)


def _logged_nll(logits: torch.Tensor, batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    return lm.lm_loss(logits.detach(), batch["labels"], family)


@FORGET.register("ga")
@dataclass
class GradientAscent(Objective):
    """Jang et al. (2022): gradient ascent on the forget sequences."""

    def __call__(self, ctx, batch):
        logits = ctx.logits(ctx.model, batch)
        return gradient_ascent(logits, batch["labels"], ctx.family), {"forget_nll": _logged_nll(logits, batch,
                                                                                             ctx.family)}


@FORGET.register("npo")
@dataclass
class NPO(Objective):
    """NPO (Zhang et al. 2024) against the frozen reference."""

    beta: float = 0.1
    needs_reference: ClassVar[bool] = True

    def __call__(self, ctx, batch):
        logits, ref_logits = with_reference(ctx, ctx.logits, batch)
        logp, _ = sequence_logprob(logits, batch["labels"], ctx.family)
        ref_logp, _ = sequence_logprob(ref_logits, batch["labels"], ctx.family)
        return npo(logp, ref_logp, self.beta), {"forget_nll": _logged_nll(logits, batch, ctx.family)}


@FORGET.register("simnpo")
@dataclass
class SimNPO(Objective):
    """SimNPO (Fan et al. 2024): length-normalised NPO without a reference."""

    beta: float = 2.5
    gamma: float = 0.0

    def __call__(self, ctx, batch):
        logits = ctx.logits(ctx.model, batch)
        logp, n = sequence_logprob(logits, batch["labels"], ctx.family)
        return simnpo(logp, n, self.beta, self.gamma), {"forget_nll": _logged_nll(logits, batch, ctx.family)}


@FORGET.register("undial")
@dataclass
class UNDIAL(Objective):
    """UNDIAL (Dong et al. 2024): distil the frozen model with the forget tokens' logits lowered by beta."""

    beta: float = 10.0
    needs_reference: ClassVar[bool] = True

    def __call__(self, ctx, batch):
        logits, ref_logits = with_reference(ctx, ctx.logits, batch)
        return undial(logits, ref_logits, batch["labels"], ctx.family, self.beta), {
            "forget_nll": _logged_nll(logits, batch, ctx.family)}


@FORGET.register("idk_dpo")
@dataclass
class IdkDPO(Objective):
    """IdkDPO (TOFU, Maini et al. 2024): DPO preferring a refusal ("I don't know"-style, ``refusals``: a file of
    one per line, default lethe's list) to the forget answer, against the frozen reference. Decoder models:
    the refusal replaces the answer tokens after the same prompt; example i gets refusal (i + seed) mod n."""

    beta: float = 0.1
    refusals: str | None = None
    seed: int = 0
    needs_reference: ClassVar[bool] = True

    def setup(self, ctx) -> None:
        if ctx.family != "decoder":
            raise UnlearningConfigError(f"method 'idk_dpo' needs a decoder model (this one is {ctx.family!r}): the "
                                        "refusal replaces the answer after the prompt")
        self._refusals = load_refusals(self.refusals)
        tok = ctx.tokenizer
        # as the answer would be tokenised after a prompt ending in white space (a chat turn) or not
        self._ids = {after_space: [tok(lm.target_text(r, " " if after_space else ""), add_special_tokens=False)[
            "input_ids"] for r in self._refusals] for after_space in (True, False)}

    def refusal_batch(self, ctx, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with every answer replaced by a refusal (prompt tokens kept, EOS kept if the answer had it)."""
        tok = ctx.tokenizer
        rows_in, rows_lab = [], []
        index = batch.get("index")
        for i in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][i].bool()
            ids, lab = batch["input_ids"][i][real].tolist(), batch["labels"][i][real].tolist()
            n_prompt = next((j for j, v in enumerate(lab) if v != lm.IGNORE), len(lab))
            k = (int(index[i]) if index is not None else i) + self.seed
            after_space = n_prompt > 0 and tok.decode(ids[n_prompt - 1:n_prompt])[-1:].isspace()
            refusal = list(self._ids[after_space][k % len(self._refusals)])
            if tok.eos_token_id is not None and lab and lab[-1] == tok.eos_token_id:
                refusal.append(tok.eos_token_id)
            rows_in.append(ids[:n_prompt] + refusal)
            rows_lab.append([lm.IGNORE] * n_prompt + refusal)
        out = lm.collate(rows_in, rows_lab, tok.pad_token_id)
        return {k: v.to(batch["input_ids"].device) for k, v in out.items()}

    def __call__(self, ctx, batch):
        win = self.refusal_batch(ctx, batch)
        lose_logits, ref_lose_logits = with_reference(ctx, ctx.logits, batch)
        win_logits, ref_win_logits = with_reference(ctx, ctx.logits, win)
        lp = lambda lg, b: sequence_logprob(lg, b["labels"], ctx.family)[0]
        loss = dpo(lp(win_logits, win), lp(ref_win_logits, win), lp(lose_logits, batch), lp(ref_lose_logits, batch),
                   self.beta)
        return loss, {"forget_nll": _logged_nll(lose_logits, batch, ctx.family),
                      "refusal_nll": _logged_nll(win_logits, win, ctx.family)}


def load_refusals(path: str | None = None) -> list[str]:
    """Refusal answers, one per line (blank lines and ``#`` comments skipped): ``path`` or lethe's list."""
    from pathlib import Path

    from lethe.io import REFUSALS

    source = Path(path) if path else REFUSALS
    if not source.is_file():
        raise UnlearningConfigError(f"method_args.refusals={path!r}: no such file")
    lines = [ln.strip() for ln in source.read_text().splitlines()]
    refusals = [ln for ln in lines if ln and not ln.startswith("#")]
    if not refusals:
        raise UnlearningConfigError(f"{source}: no refusals in it (one per line)")
    return refusals


@FORGET.register("rmu")
@dataclass
class RMU(Objective):
    """RMU (Li et al. 2024): steer one block's output on forget tokens to coef·u, u a fixed random unit vector.

    layer: the steered block (default: the middle one); stack: its stack (seq2seq); coef: c; seed: u's seed.
    """

    layer: int | None = None
    stack: str | None = None
    coef: float = 6.5
    seed: int = 0
    default_retain: ClassVar[str] = "rmu"

    def setup(self, ctx) -> None:
        stack = self.stack or ctx.adapter.default_stack
        n_layers = ctx.adapter.num_layers(ctx.model, stack)
        layer = n_layers // 2 if self.layer is None else self.layer
        ctx.adapter.check_layer(ctx.model, layer, stack)
        ctx.rmu_stack = stack
        ctx.rmu_layer_name = ctx.adapter.block_name(layer, stack, ctx.model)
        cfg = ctx.model.config
        width = cfg.get_text_config().hidden_size if hasattr(cfg, "get_text_config") else cfg.hidden_size
        ctx.register_buffer("rmu_control", self.coef * random_unit_vector(width, self.seed), persistent=True)

    def __call__(self, ctx, batch):
        return rmu_forget(ctx.hidden(ctx.model, batch), rmu_mask(ctx, batch), ctx.rmu_control), {}


def rmu_mask(ctx, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens RMU's MSE runs over: the target tokens in a seq2seq decoder, else every real token."""
    if ctx.family == "seq2seq" and ctx.rmu_stack == "decoder":
        return batch["labels"] != lm.IGNORE
    return batch["attention_mask"].bool()


@RETAIN.register("none")
@dataclass
class NoRetain(Objective):
    """No retain term."""


@RETAIN.register("nll")
@dataclass
class RetainNLL(Objective):
    """Ordinary LM loss on the retain data (GradDiff's descent half)."""

    def __call__(self, ctx, batch):
        logits = ctx.logits(ctx.model, batch)
        return retain_nll(logits, batch["labels"], ctx.family), {"retain_nll": _logged_nll(logits, batch, ctx.family)}


@RETAIN.register("kl")
@dataclass
class RetainKL(Objective):
    """KL(p_ref ‖ p_θ) on the retain targets."""

    needs_reference: ClassVar[bool] = True

    def __call__(self, ctx, batch):
        logits, ref_logits = with_reference(ctx, ctx.logits, batch)
        loss = kl_to_reference(logits, ref_logits, batch["labels"], ctx.family)
        return loss, {"retain_nll": _logged_nll(logits, batch, ctx.family)}


@RETAIN.register("rmu")
@dataclass
class RetainRMU(Objective):
    """RMU's retain term: the steered block's activations on retain tokens stay the frozen model's."""

    needs_reference: ClassVar[bool] = True

    def __call__(self, ctx, batch):
        hid, ref_hid = with_reference(ctx, ctx.hidden, batch)
        return rmu_retain(hid, ref_hid, rmu_mask(ctx, batch)), {}

