"""Is it really gone? Membership inference, extraction and recovery attacks (``lethe evaluate``).

**Membership inference.** Per example, each attack gives a score where *higher means "more likely a
training member"*; its ROC-AUC of forget (members) against holdout (never trained on) examples is the
attack's ``mia_auc`` (:class:`lethe.metrics.MembershipAUROC`, gathered across processes). 1.0: the forget set
is told apart perfectly (remembered); 0.5: indistinguishable from unseen text; below 0.5: the forget set
looks *less* likely than unseen text (over-unlearned, itself a tell).

- ``loss``: minus the target's mean token NLL (Yeom et al. 2018).
- ``zlib``: minus the mean NLL over the zlib-compressed length of the target text in bytes (Carlini et al. 2021).
- ``min_k``: the mean of the lowest k% (20%) target-token log-probabilities (Min-K% Prob, Shi et al. 2024).
- ``min_k_pp``: Min-K%++ (Zhang et al. 2024): each token's log-probability standardised by the mean and
  standard deviation of log p(z) under the model's own next-token distribution at that position; the mean
  of the lowest k%.
- ``reference``: the reference model's mean NLL minus this model's (a likelihood ratio; Carlini et al. 2021).

**privleak** (MUSE, Shi et al. 2024): (AUC_model - AUC_retain) / AUC_retain x 100 per attack: ~0 for a model
that leaks like the retain model, large and positive when the forget set is still recognised, negative when
it is over-unlearned.

**Memorisation.** ``exact_memorization``: the share of target tokens whose teacher-forced argmax is right
(the same quantity as MA, :class:`lethe.metrics.MemorizationAccuracy`); ``extraction_strength``
(Carlini et al. 2021, as open-unlearning computes it): 1 - k/|target| for the shortest prefix of k target
tokens after which every teacher-forced argmax is right.

**Recovery attacks** (each seeded and bounded, each on a copy of the model):

- ``relearn``: fine-tune k steps (10 and 50) on one half of the forget set (even positions), score the other
  half (Hu et al. 2024; Łucki et al. 2024).
- ``quantize``: 8- and 4-bit round-to-nearest weight quantisation of every linear layer but the output head,
  symmetric, per output channel in groups of 128 inputs (Zhang et al. 2024, "Does your LLM truly unlearn?").
- ``probes``: the paraphrased forget questions, and each question asked after an in-context hint that names
  its subject (another answer about the same TOFU author).
- ``finetune`` (edits): 20 steps of fine-tuning on unrelated text.

For an edited model (:func:`edit_survival`), the same quantisation and an unrelated fine-tuning: efficacy,
paraphrase and neighbourhood (CounterFact) before and after each, and the share of the successful edits whose
old fact returns (P(true) > P(new) again).

The forget score after each attack is ROUGE-L recall of the greedy answer for question/answer records,
exact memorisation for plain text.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lethe import lm, precision
from lethe.metrics import MembershipAUROC

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "reference")
RECOVERY_ATTACKS = ("relearn", "quantize", "probes")
EDIT_ATTACKS = ("quantize", "finetune")
ATTACKS = ("mia", *dict.fromkeys(RECOVERY_ATTACKS + EDIT_ATTACKS))
MIN_K = 0.2


class EvaluationError(ValueError):
    """Bad input to an evaluation: names the set, record and field."""


@dataclass
class Example:
    """One scored example: the prompt (a question, or "" for plain text) and the target the model should say."""

    prompt: str
    target: str


def examples(records: Sequence) -> list[Example]:
    """QA records (question -> answer) or text records (the whole text is the target)."""
    out = []
    for r in records:
        if hasattr(r, "question"):
            out.append(Example(r.question, r.answer))
        else:
            out.append(Example("", r.text))
    return out


def check_sets(forget: Sequence[Example], holdout: Sequence[Example], where: dict[str, str]) -> None:
    """Refuse an empty set and a forget/holdout pair that share an example (the AUC would mean nothing)."""
    for name, rows in (("forget", forget), ("holdout", holdout)):
        if not rows:
            raise EvaluationError(f"the {name} set ({where.get(name, '?')}) is empty")
    seen = {(e.prompt, e.target): i for i, e in enumerate(holdout)}
    for i, e in enumerate(forget):
        if (e.prompt, e.target) in seen:
            field = "question" if e.prompt else "text"
            raise EvaluationError(
                f"forget record {i} ({where.get('forget', '?')}) is also holdout record {seen[(e.prompt, e.target)]} "
                f"({where.get('holdout', '?')}), field {field!r}: {(e.prompt or e.target)[:80]!r}; membership "
                "inference needs disjoint sets")


# --------------------------------------------------------------------------- per-example statistics


@torch.no_grad()
def example_stats(model, tokenizer, family: str, rows: Sequence[Example], prompt_format: str | None = None,
                  batch_size: int = 16, k: float = MIN_K, bf16: bool = False) -> dict[str, np.ndarray]:
    """Per example: mean NLL, Min-K%, Min-K%++, exact memorisation and extraction strength of the target.
    ``bf16``: the forward pass runs under bf16 autocast (3x faster on a CPU with bf16 units); the statistics are
    taken from its logits in float32."""
    device = next(model.parameters()).device
    out: dict[str, list[float]] = {"nll": [], "min_k": [], "min_k_pp": [], "exact_memorization": [],
                                   "extraction_strength": []}
    was = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            batch = lm.to_device(lm.encode_pairs(tokenizer, family, [e.prompt for e in chunk],
                                                 [e.target for e in chunk], prompt_format=prompt_format), device)
            with precision.autocast("bf16-mixed" if bf16 else "32", device):
                logits = lm.forward_logits(model, batch, family)
            lg, lb = lm.aligned(logits, batch["labels"], family)
            for i in range(lg.shape[0]):
                mask = lb[i] != lm.IGNORE
                logp = torch.log_softmax(lg[i][mask].float(), -1)
                labels = lb[i][mask]
                tok = logp.gather(-1, labels[:, None]).squeeze(-1)
                p = logp.exp()
                mu = (p * logp).sum(-1)
                sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp_min(1e-12).sqrt()
                n = max(1, int(k * tok.numel()))
                hits = logp.argmax(-1) == labels
                # extraction strength: the shortest prefix after which every argmax is right
                wrong = (~hits).nonzero().flatten()
                first_all_right = int(wrong[-1]) + 1 if wrong.numel() else 0
                out["nll"].append(float(-tok.mean()))
                out["min_k"].append(float(tok.sort().values[:n].mean()))
                out["min_k_pp"].append(float(((tok - mu) / sigma).sort().values[:n].mean()))
                out["exact_memorization"].append(float(hits.float().mean()))
                out["extraction_strength"].append(1.0 - first_all_right / tok.numel())
    finally:
        model.train(was)
    return {key: np.asarray(v, dtype=np.float64) for key, v in out.items()}


def zlib_bytes(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


def mia_scores(stats: dict[str, np.ndarray], rows: Sequence[Example],
               reference_nll: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each attack's per-example membership score (higher = more likely a member)."""
    scores = {"loss": -stats["nll"],
              "zlib": -stats["nll"] / np.asarray([zlib_bytes(e.target) for e in rows], dtype=np.float64),
              "min_k": stats["min_k"], "min_k_pp": stats["min_k_pp"]}
    if reference_nll is not None:
        scores["reference"] = reference_nll - stats["nll"]
    return scores


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC-AUC of members against non-members (ties count one half), through the torchmetrics metric."""
    metric = MembershipAUROC()
    metric.update(torch.as_tensor(member_scores), torch.ones(len(member_scores), dtype=torch.bool))
    metric.update(torch.as_tensor(nonmember_scores), torch.zeros(len(nonmember_scores), dtype=torch.bool))
    return float(metric.compute())


def privleak(auc_model: float, auc_retain: float) -> float:
    """MUSE's PrivLeak: the relative difference of the model's MIA AUC to the retain model's, in percent."""
    return (auc_model - auc_retain) / auc_retain * 100.0


def privleak_by_attack(mia_auc: dict[str, float], retain_mia_auc: dict[str, float]) -> dict[str, float]:
    """privleak of every attack but the reference one (against the retain model it is the retain model itself)."""
    return {a: privleak(v, retain_mia_auc[a]) for a, v in mia_auc.items() if a != "reference"}


# --------------------------------------------------------------------------- forget scores


def forget_metric(rows: Sequence[Example], family: str) -> str:
    """What :func:`forget_score` measures: ROUGE-L recall of greedy answers when every example is a question to a
    decoder, else exact memorisation."""
    return "rougeL_recall" if rows and all(e.prompt for e in rows) and family == "decoder" else "exact_memorization"


def forget_scores(model, tokenizer, family: str, rows: Sequence[Example], prompt_format: str | None = None,
                  max_new_tokens: int = 48, batch_size: int = 16, bf16: bool = False) -> np.ndarray:
    """Per example, how much of it the model still says (:func:`forget_metric`). ``bf16``: greedy answers are
    generated under bf16 autocast (2.3x faster on a CPU with bf16 units; the weights stay float32)."""
    if forget_metric(rows, family) == "rougeL_recall":
        from lethe.tofu import greedy_answers, rouge_l_recall

        with precision.autocast("bf16-mixed" if bf16 else "32", next(model.parameters()).device):
            answers = greedy_answers(model, tokenizer, [e.prompt for e in rows], max_new_tokens, batch_size,
                                     prompt_format)
        return np.asarray([rouge_l_recall(a, e.target) for a, e in zip(answers, rows)], dtype=np.float64)
    return example_stats(model, tokenizer, family, rows, prompt_format, batch_size)["exact_memorization"]


def forget_score(model, tokenizer, family: str, rows: Sequence[Example], prompt_format: str | None = None,
                 max_new_tokens: int = 48, batch_size: int = 16, bf16: bool = False) -> float:
    """How much of the forget set the model still says (:func:`forget_metric`), averaged over its examples."""
    return float(forget_scores(model, tokenizer, family, rows, prompt_format, max_new_tokens, batch_size,
                               bf16).mean())


def attack_baseline(report: dict, key: str) -> float:
    """The forget score an attack's score ``report[key]`` is compared with: the scored half before relearning for
    ``relearn_<k>``, the whole forget set otherwise."""
    return report["relearn_half_before"] if key.startswith("relearn_") else report["forget"]


def halves(rows: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """The relearning attack's split: even positions are trained on, odd positions are scored."""
    return list(rows[0::2]), list(rows[1::2])


# --------------------------------------------------------------------------- recovery attacks


def relearn(model, tokenizer, family: str, train: Sequence[Example], steps: Sequence[int],
            score: Callable[[nn.Module], Any], lr: float = 2e-5, batch_size: int = 4, seed: int = 0,
            prompt_format: str | None = None, bf16: bool = False) -> dict[int, Any]:
    """Fine-tune a copy of ``model`` on ``train`` (AdamW, answer-token NLL, seeded order) and ``score`` it after
    each number of steps in ``steps``; the original model is untouched."""
    if not train:
        raise EvaluationError("the relearning attack needs at least two forget examples (one to train on)")
    attacked = copy.deepcopy(model)
    attacked.train()
    for p in attacked.parameters():
        p.requires_grad_(True)
    device = next(attacked.parameters()).device
    # torch's fused AdamW (CPU and CUDA): the same update in one kernel per step, 5x faster than the per-tensor
    # loop on a 2-core CPU for SmolLM2's 135M parameters (0.16 s against 0.89 s a step)
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                    for p in attacked.parameters())
    opt = torch.optim.AdamW(attacked.parameters(), lr=lr, weight_decay=0.0, **({"fused": True} if fused else {}))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out: dict[int, float] = {}
    for step in range(1, max(steps) + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(train), generator=gen).tolist()
        chunk, order = [train[i] for i in order[:batch_size]], order[batch_size:]
        batch = lm.to_device(lm.encode_pairs(tokenizer, family, [e.prompt for e in chunk], [e.target for e in chunk],
                                             prompt_format=prompt_format), device)
        with precision.autocast("bf16-mixed" if bf16 else "32", device):
            loss = lm.lm_loss(*lm.forward_target_logits(attacked, batch, family), family)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in steps:
            attacked.eval()
            out[step] = score(attacked)
            attacked.train()
    del attacked, opt
    return out


def _linear_weights(model: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(name, weight, input dimension) of every linear layer but the output head (transformers' GPT-2 Conv1D
    stores its weight as inputs x outputs)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight is not head_weight:
            out.append((name, mod.weight, 1))
        elif isinstance(mod, Conv1D):
            out.append((name, mod.weight, 0))
    return out


@torch.no_grad()
def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = 128, in_dim: int = 1) -> torch.Tensor:
    """Round-to-nearest symmetric quantisation of a weight (dequantised back to its dtype): one scale per output
    channel and group of ``group_size`` inputs, integer levels -2^(b-1) .. 2^(b-1)-1."""
    w = weight.float()
    if in_dim == 0:
        w = w.t()
    rows, cols = w.shape
    pad = (-cols) % group_size
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(rows, -1, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = wp.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    q = (wp / scale).round().clamp(-qmax - 1, qmax) * scale
    q = q.reshape(rows, -1)[:, :cols]
    return (q.t() if in_dim == 0 else q).to(weight.dtype)


def quantized_copy(model: nn.Module, bits: int, group_size: int = 128) -> nn.Module:
    """A copy of ``model`` with every linear weight but the output head round-to-nearest quantised."""
    q = copy.deepcopy(model)
    for _, weight, in_dim in _linear_weights(q):
        weight.data.copy_(quantize_rtn(weight.data, bits, group_size, in_dim))
    return q


def hinted(records: Sequence) -> list[Example] | None:
    """Each TOFU forget question asked after a hint naming its subject: another answer about the same author
    (the author's first question's answer, or the second's for the first). None when the records are not TOFU
    author questions."""
    from lethe.records import tofu_author_index

    author = tofu_author_index()
    if not records or not all(hasattr(r, "question") and r.question in author for r in records):
        return None
    by_author: dict[int, list] = {}
    for r in records:
        by_author.setdefault(author[r.question], []).append(r)
    out = []
    for r in records:
        mates = [m for m in by_author[author[r.question]] if m is not r]
        if not mates:
            return None
        out.append(Example(f"Here is something you know: {mates[0].answer}\n{r.question}", r.answer))
    return out


def paraphrased(records: Sequence) -> list[Example] | None:
    """The forget questions in their paraphrased form, when every record has one."""
    if records and all(getattr(r, "paraphrased_question", None) for r in records):
        return [Example(r.paraphrased_question, r.answer) for r in records]
    return None


# --------------------------------------------------------------------------- one model's report


@dataclass
class AttackSettings:
    """The recovery attacks' bounds (each attack is seeded by ``seed``)."""

    relearn_steps: tuple[int, ...] = (10, 50)
    relearn_lr: float = 5e-5
    relearn_batch_size: int = 4
    quant_bits: tuple[int, ...] = (8, 4)
    group_size: int = 128
    survive_tolerance: float = 0.05
    seed: int = 0
    bf16: bool = False  # the attacks' training steps, greedy answers and MIA forward passes under bf16 autocast
    max_new_tokens: int = 48
    batch_size: int = 16


def membership(model, tokenizer, family: str, forget: Sequence[Example], holdout: Sequence[Example],
               prompt_format: str | None = None, reference_nll: dict[str, np.ndarray] | None = None,
               batch_size: int = 16, bf16: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Every MIA attack's AUC, exact memorisation and extraction strength on forget vs holdout, and the model's
    per-example NLLs (``{"forget": ..., "holdout": ...}``: the ``reference_nll`` of another model's call, when
    this model is the reference). ``reference_nll`` adds the reference attack."""
    sets = {"forget": forget, "holdout": holdout}
    stats = {name: example_stats(model, tokenizer, family, rows, prompt_format, batch_size, bf16=bf16)
             for name, rows in sets.items()}
    scores = {name: mia_scores(stats[name], rows, reference_nll[name] if reference_nll else None)
              for name, rows in sets.items()}
    report = {"mia_auc": {a: auc(scores["forget"][a], scores["holdout"][a]) for a in scores["forget"]},
              **{q: {name: float(stats[name][q].mean()) for name in stats}
                 for q in ("exact_memorization", "extraction_strength")},
              "mean_nll": {name: float(stats[name]["nll"].mean()) for name in stats}}
    return report, {name: stats[name]["nll"] for name in stats}


def recovery(model, tokenizer, family: str, forget_records: Sequence, attacks: Sequence[str],
             settings: AttackSettings, prompt_format: str | None = None,
             progress: Callable[[str], None] = lambda _msg: None) -> dict:
    """The forget score before and after each recovery attack in ``attacks``, and whether forgetting survived
    each (its forget score rose by less than ``settings.survive_tolerance``)."""
    forget = examples(forget_records)
    score = lambda m, rows: forget_score(m, tokenizer, family, rows, prompt_format, settings.max_new_tokens,
                                         settings.batch_size, settings.bf16)
    out: dict = {"forget_score": forget_metric(forget, family)}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    progress("forget score")
    per_example = forget_scores(model, tokenizer, family, forget, prompt_format, settings.max_new_tokens,
                                settings.batch_size, settings.bf16)
    out["forget"] = float(per_example.mean())
    out["forget_per_example"] = [round(float(v), 4) for v in per_example]
    seconds["forget"] = time.perf_counter() - t0
    if "relearn" in attacks:
        # the scored half's own answers from the pass above (a greedy answer depends on its batch only by padding)
        out["relearn_half_before"] = relearn_baseline(per_example.tolist())
        progress(f"relearning on {len(halves(forget)[0])} examples, {max(settings.relearn_steps)} steps")
        out.update(relearn_attack(model, tokenizer, family, forget, settings, prompt_format))
        seconds["relearn"] = time.perf_counter() - t0 - sum(seconds.values())
    if "quantize" in attacks:
        for bits in settings.quant_bits:
            progress(f"{bits}-bit quantisation")
            q = quantized_copy(model, bits, settings.group_size)
            out[f"quant_{bits}bit"] = score(q, forget)
            del q
        seconds["quantize"] = time.perf_counter() - t0 - sum(seconds.values())
    if "probes" in attacks:
        for name, rows in (("probe_paraphrase", paraphrased(forget_records)), ("probe_hint", hinted(forget_records))):
            if rows is not None:
                progress(name.replace("_", " "))
                out[name] = score(model, rows)
        seconds["probes"] = time.perf_counter() - t0 - sum(seconds.values())
    out["survived"] = survival(out, settings.survive_tolerance)
    out["attack_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return out


def relearn_attack(model, tokenizer, family: str, forget: Sequence[Example], settings: AttackSettings,
                   prompt_format: str | None = None) -> dict[str, float]:
    """``{"relearn_<k>": forget score}``: the relearning attack of :func:`recovery` on its own (train on the even
    half of ``forget``, score the odd half after each of ``settings.relearn_steps``)."""
    train, held = halves(forget)
    after = relearn(model, tokenizer, family, train, settings.relearn_steps,
                    lambda m: forget_score(m, tokenizer, family, held, prompt_format, settings.max_new_tokens,
                                           settings.batch_size, settings.bf16),
                    settings.relearn_lr, settings.relearn_batch_size, settings.seed, prompt_format, settings.bf16)
    return {f"relearn_{k}": v for k, v in after.items()}


def relearn_baseline(forget_per_example: Sequence[float]) -> float:
    """The relearning attack's "before": the mean forget score of the half it scores."""
    return float(np.mean(halves(list(forget_per_example))[1]))


def survival(report: dict, tolerance: float) -> dict[str, bool]:
    """Per attack in ``report``, whether forgetting survived it: its score rose by less than ``tolerance``."""
    attacked = [k for k in report if k.startswith(("relearn_", "quant_", "probe_")) and k != "relearn_half_before"]
    return {k: bool(report[k] - attack_baseline(report, k) < tolerance) for k in attacked}


def flat_numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a report under a slash-joined key (a wandb table, a CSV row)."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def plot_report(report: dict, dest, title: str = ""):
    """Two panels: each MIA attack's AUC (model, and reference when there is one) with the 0.5 line; the forget
    score before and after each recovery attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lethe.io import save_png

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    mia = report.get("mia_auc", {})
    ref = report.get("reference_mia_auc", {})
    names = list(mia)
    xs = np.arange(len(names))
    ax1.bar(xs - 0.2, [mia[n] for n in names], 0.4, label="model")
    if ref:
        ax1.bar(xs + 0.2, [ref.get(n, np.nan) for n in names], 0.4, label="reference")
    ax1.axhline(0.5, ls="--", color="k", lw=0.8)
    ax1.set_xticks(xs, names, rotation=20)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("MIA ROC-AUC (forget vs holdout)")
    ax1.legend(fontsize=7)
    rec = report.get("recovery", {})
    keys = [k for k in rec if isinstance(rec[k], float) and k != "relearn_half_before"]
    ax2.bar(range(len(keys)), [rec[k] for k in keys],
            color=["grey" if k == "forget" else ("tab:red" if not rec["survived"].get(k, True) else "tab:green")
                   for k in keys])
    ax2.set_xticks(range(len(keys)), keys, rotation=30)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel(f"forget {rec.get('forget_score', 'score')}")
    ax2.set_title("after each attack (red: forgetting did not survive)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, dest)


# --------------------------------------------------------------------------- edits


def _edit_scores(model, tokenizer, family: str, requests: Sequence) -> dict:
    from lethe.evaluation import counterfact_scores

    cf = counterfact_scores(model, tokenizer, family, requests)
    return {k: cf[k] for k in ("efficacy", "paraphrase", "neighborhood")} | {"_per_case": cf["efficacy_per_case"]}


def edit_survival(model, tokenizer, family: str, requests: Sequence, attacks: Sequence[str], settings: AttackSettings,
                  finetune_texts: Sequence[str] = (), finetune_steps: int = 20, finetune_lr: float = 2e-5,
                  progress: Callable[[str], None] = lambda _msg: None) -> dict:
    """Does each edit of an edited model survive quantisation and unrelated fine-tuning? CounterFact efficacy /
    paraphrase / neighbourhood before and after each attack, and ``old_fact_returns``: the share of the edits that
    held before the attack (P(new) > P(true)) whose old fact wins again after it."""
    before = _edit_scores(model, tokenizer, family, requests)
    held = [i for i, e in enumerate(before.pop("_per_case")) if e == 1.0]
    out: dict = {"n_edits": len(requests), "edits_holding_before": len(held), "before": before}

    def after(m) -> dict:
        row = _edit_scores(m, tokenizer, family, requests)
        per_case = row.pop("_per_case")
        row["old_fact_returns"] = sum(per_case[i] == 0.0 for i in held) / len(held) if held else None
        return row

    if "quantize" in attacks:
        for bits in settings.quant_bits:
            progress(f"{bits}-bit quantisation")
            q = quantized_copy(model, bits, settings.group_size)
            out[f"quant_{bits}bit"] = after(q)
            del q
    if "finetune" in attacks:
        if not finetune_texts:
            raise EvaluationError("the finetune attack needs unrelated text to fine-tune on")
        progress(f"{finetune_steps} steps of unrelated fine-tuning")
        rows = [Example("", t) for t in finetune_texts]
        out[f"finetune_{finetune_steps}"] = relearn(model, tokenizer, family, rows, (finetune_steps,), after,
                                                    finetune_lr, 8, settings.seed, None, settings.bf16)[finetune_steps]
        out[f"finetune_{finetune_steps}"].update(lr=finetune_lr, batch_size=8)
    return out
