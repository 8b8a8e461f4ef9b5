"""Forgetting metrics as torchmetrics ``Metric`` subclasses (summed states, so DDP reduces them exactly).

- **MA**, memorisation accuracy (Jang et al. 2022): per sequence, the share of target
  tokens that the model's teacher-forced top-1 prediction gets right; averaged over
  sequences. One forward per batch.
- **EL_n**, extraction likelihood (Jang et al. 2022): per sequence x with target tokens
  x_1..x_T, the mean over prefixes t of the n-gram overlap between the greedy continuation
  of x_<t and the true suffix x_>=t, where overlap(a, b) = sum over the n-grams g of a
  of 1{g in ngrams(b)} / |ngrams(a)| and the continuation is as long as the suffix.
  Which prefixes: ``convention="code"`` (the default) continues every prefix whose suffix holds at
  least one n-gram, |suffix| >= n, as Jang et al.'s released implementation does (its loop over
  prefix lengths i stops at T-n); ``convention="paper"`` reads the paper's formula literally,
  sum over t = 1..T-n of overlap(f(x_<t), x_>=t) / (T-n), so |suffix| >= n+1 (the last
  single-n-gram suffix is left out). A sequence too short for
  one n-gram of order n (facts are 5-10 tokens, EL_10 is the paper's default) uses
  n_eff = min(n, |suffix|) for each of its prefixes instead of being dropped -- so it
  still measures "does the greedy continuation reproduce the rest". All prefixes of
  all sequences of a batch are continued by ONE batched ``generate`` call.
  Context before the target span (a QA question, BOS) is always part of the prefix;
  a prefix needs at least one context token. Decoders only. EOS is an ordinary token of the
  continuation (never suppressed, never a reason to stop early), so a target that ends in EOS
  scores 1 when the model would end it there.
- **Perplexity**: exp of the token-level mean NLL over target tokens.
- **MembershipAUROC**: ROC-AUC of per-example membership scores, members against non-members
  (lethe.privacy's attacks).

Sequences are :mod:`lethe.lm` batches (labels = -100 outside the targets).
"""

from __future__ import annotations

from collections import Counter

import torch
from torchmetrics import Metric

from lethe import lm


def teacher_forced_hits(logits: torch.Tensor, labels: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example number of correct top-1 target predictions and of target tokens."""
    lg, lb = lm.aligned(logits, labels, family)
    mask = lb != lm.IGNORE
    hit = (lg.argmax(-1) == lb) & mask
    return hit.sum(-1), mask.sum(-1)


class _Mean(Metric):
    """A summed value over a summed count (per-sequence values over sequences, unless a subclass counts else)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update_values(self, values: torch.Tensor) -> None:
        values = values.detach().to(self.total.device, torch.float64).flatten()
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class MemorizationAccuracy(_Mean):
    """MA over sequences (see the module docstring)."""

    def update(self, logits: torch.Tensor, labels: torch.Tensor, family: str) -> None:
        hits, n = teacher_forced_hits(logits, labels, family)
        keep = n > 0
        self.update_values(hits[keep].double() / n[keep].double())


class ExtractionLikelihood(_Mean):
    """EL_n over sequences; ``update`` takes per-sequence values from :func:`extraction_likelihood`."""

    def __init__(self, n: int = 10, convention: str = "code", **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n
        self.convention = check_convention(convention)

    def update(self, values: torch.Tensor) -> None:
        self.update_values(values[~torch.isnan(values)])


class Perplexity(_Mean):
    """exp(mean token NLL) over all target tokens seen (the mean is over tokens, not sequences)."""

    def update(self, logits: torch.Tensor, labels: torch.Tensor, family: str) -> None:
        tok, mask = lm.token_logprobs(logits, labels, family)
        self.total += -tok.detach().double().sum().to(self.total.device)
        self.count += mask.sum().double().to(self.count.device)

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


class MembershipAUROC(Metric):
    """ROC-AUC of membership scores: members (forget set) against non-members (holdout), higher score = member.
    Scores and labels are concatenated across processes before the AUC, so DDP gives the exact set's AUC."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("members", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, members: torch.Tensor) -> None:
        self.scores.append(scores.detach().double().flatten())
        self.members.append(members.detach().bool().flatten())

    def compute(self) -> torch.Tensor:
        from torchmetrics.utilities import dim_zero_cat

        scores, members = dim_zero_cat(self.scores), dim_zero_cat(self.members)
        pos, neg = scores[members], scores[~members]
        if not len(pos) or not len(neg):
            return torch.tensor(float("nan"))
        from torchmetrics.functional.classification import binary_auroc

        # the trapezoid over the exact ROC curve: P(member > non-member) + 1/2 P(tie)
        return binary_auroc(scores, members.long(), thresholds=None).float()


# ---------------------------------------------------------------------- EL_n pieces


def ngram_overlap(generated: list[int], true: list[int], n: int) -> float:
    """Share of the n-grams of ``generated`` (with multiplicity) that occur among the n-grams of ``true``."""
    grams = [tuple(generated[i:i + n]) for i in range(len(generated) - n + 1)]
    if not grams:
        return 0.0
    ref = Counter(tuple(true[i:i + n]) for i in range(len(true) - n + 1))
    return sum(1 for g in grams if g in ref) / len(grams)


EL_CONVENTIONS = ("code", "paper")


def check_convention(convention: str) -> str:
    if convention not in EL_CONVENTIONS:
        raise ValueError(f"EL_n convention {convention!r}: use 'code' (|suffix| >= n, Jang et al.'s implementation) "
                         "or 'paper' (t = 1..T-n, |suffix| >= n+1)")
    return convention


def extraction_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                        n: int, max_prefixes: int | None = None,
                        convention: str = "code") -> list[list[tuple[list[int], list[int], int]]]:
    """For each sequence: the (prefix ids, true suffix ids, n_eff) pairs EL_n averages over (decoders).

    ``convention``: "code" keeps prefixes whose suffix has >= n tokens, "paper" >= n + 1 (module docstring).

    ``max_prefixes`` keeps that many evenly spaced prefixes per sequence (an estimate of EL_n
    for long passages, where continuing every prefix would cost O(T^2) generated tokens).
    """
    out = []
    for ids, att, lab in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist()):
        length = sum(att)
        ids, lab = ids[:length], lab[:length]
        pos = [i for i, v in enumerate(lab) if v != lm.IGNORE]
        rows: list[tuple[list[int], list[int], int]] = []
        if pos:
            start, end = pos[0], pos[-1] + 1
            cuts = [c for c in range(max(start, 1), end)]
            least = n if check_convention(convention) == "code" else n + 1
            long_enough = [c for c in cuts if end - c >= least]
            if long_enough:
                rows = [(ids[:c], ids[c:end], n) for c in long_enough]
            else:
                rows = [(ids[:c], ids[c:end], min(n, end - c)) for c in cuts]
            if max_prefixes is not None and len(rows) > max_prefixes:
                step = len(rows) / max_prefixes
                rows = [rows[int(i * step)] for i in range(max_prefixes)]
        out.append(rows)
    return out


@torch.no_grad()
def greedy_continuations(model, prefixes: list[list[int]], lengths: list[int], pad_id: int) -> list[list[int]]:
    """Greedy continuations of every prefix (lengths[i] tokens each) from ONE batched ``generate`` call."""
    if not prefixes:
        return []
    device = next(model.parameters()).device
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prefixes):  # left padding: every prefix ends where generation starts
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    # EOS is an ordinary token here: the continuation is the greedy one, as long as the suffix, whatever it
    # holds (a TOFU answer ends in EOS). Stopping at EOS would shorten it; min_new_tokens would forbid EOS.
    # (tests/test_forget_metrics.py checks this on a crafted model whose greedy continuation is EOS)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max(lengths),
                             do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=None)
    finally:
        model.train(was_training)
    gen = out[:, width:].tolist()
    return [g[:k] for g, k in zip(gen, lengths)]


def el_from_continuations(rows: list[list[tuple[list[int], list[int], int]]],
                          continuations: list[list[int]]) -> torch.Tensor:
    """Per-sequence EL from the prefixes' continuations (flattened in ``rows`` order); NaN for no prefix."""
    values, k = [], 0
    for seq in rows:
        if not seq:
            values.append(float("nan"))
            continue
        scores = []
        for (_, suffix, n_eff), cont in zip(seq, continuations[k:k + len(seq)]):
            scores.append(ngram_overlap(cont, suffix, n_eff))
        k += len(seq)
        values.append(sum(scores) / len(scores))
    return torch.tensor(values, dtype=torch.float64)


def extraction_likelihood(model, batch: dict[str, torch.Tensor], n: int, pad_id: int,
                          family: str = "decoder", max_prefixes: int | None = None,
                          convention: str = "code") -> torch.Tensor:
    """Per-sequence EL_n of a batch (one batched generate for all its prefixes)."""
    if family != "decoder":
        raise ValueError(f"EL_n is defined for decoder (causal) models; this is a {family} model -- use MA")
    rows = extraction_prefixes(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), batch["labels"].cpu(), n,
                               max_prefixes, convention)
    flat = [r for seq in rows for r in seq]
    conts = greedy_continuations(model, [p for p, _, _ in flat], [len(s) for _, s, _ in flat], pad_id)
    return el_from_continuations(rows, conts)


@torch.no_grad()
def memorisation_scores(model, batches, family: str, n: int | None, pad_id: int,
                        ma: MemorizationAccuracy | None = None, el: ExtractionLikelihood | None = None,
                        ppl: Perplexity | None = None, max_prefixes: int | None = None) -> dict[str, float]:
    """MA / EL_n / perplexity over an iterable of batches (updates and computes the given metrics)."""
    ma = ma if ma is not None else MemorizationAccuracy()
    ppl = ppl if ppl is not None else Perplexity()
    if el is None and n is not None and family == "decoder":
        el = ExtractionLikelihood(n)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = lm.to_device({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")},
                                 device)
            logits = lm.forward_logits(model, batch, family)
            ma.update(logits, batch["labels"], family)
            ppl.update(logits, batch["labels"], family)
            if el is not None:
                el.update(extraction_likelihood(model, batch, el.n, pad_id, family, max_prefixes, el.convention))
    finally:
        model.train(was_training)
    out = {"ma": float(ma.compute()), "ppl": float(ppl.compute())}
    if el is not None:
        out[f"el{el.n}"] = float(el.compute())
    return out
