"""TOFU's evaluation (Maini et al. 2024), following the reference implementation's aggregate_stat_eval.

For a set of QA records (question, answer, paraphrased_answer, perturbed_answer list):

- **answer probability**: forget/retain sets: mean over questions of P(answer|q)^(1/|answer|)
  = exp(-mean token NLL); real-authors / world-facts: that normalised against the perturbed
  answers, P(a) / (P(a) + sum P(perturbed)).
- **ROUGE-L recall** of the greedy answer against the gold answer (LCS over lower-cased words).
- **truth ratio** R = exp(mean over perturbed of their mean NLL - the paraphrase's mean NLL)
  = P_pert^(1/|a|) averaged (geometrically) / P_para^(1/|a|). Reported as mean min(R, 1/R) on
  the forget set and mean max(0, 1 - 1/R) elsewhere.
- **forget quality**: p-value of the two-sample KS test between the unlearned and the retain
  model's forget-set truth ratios R (high p = indistinguishable from never having seen them).
- **model utility**: harmonic mean of the nine probability / ROUGE-L / truth-ratio numbers on
  retain, real authors and world facts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from lethe import lm

UTILITY_SETS = ("retain", "real_authors", "world_facts")


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l_recall(prediction: str, reference: str) -> float:
    """LCS(prediction, reference) / |reference| over lower-cased alphanumeric words (rouge_score's recall)."""
    p, r = _words(prediction), _words(reference)
    if not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0] * (len(r) + 1)
        for j, b in enumerate(r):
            cur[j + 1] = prev[j] + 1 if a == b else max(prev[j + 1], cur[j])
        prev = cur
    return prev[-1] / len(r)


@torch.no_grad()
def mean_nll(model, tokenizer, questions: Sequence[str], answers: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Per-pair mean token NLL of the answer given the question (TOFU's avg loss)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(questions), batch_size):
        batch = lm.to_device(lm.encode_pairs(tokenizer, "decoder", questions[s:s + batch_size],
                                             answers[s:s + batch_size]), device)
        out.append(lm.sequence_nll(model, batch, "decoder").cpu())
    return torch.cat(out).double().numpy()


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 48,
                   batch_size: int = 64) -> list[str]:
    """Greedy answers, one batched (left-padded) generate per batch."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    answers = []
    for s in range(0, len(questions), batch_size):
        rows = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions[s:s + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            att[i, width - len(r):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        for g in gen[:, width:].tolist():
            if tokenizer.eos_token_id in g:
                g = g[:g.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode([t for t in g if t != pad], skip_special_tokens=True))
    return answers


def truth_ratios(para_nll: np.ndarray, pert_nll: np.ndarray) -> np.ndarray:
    """R = exp(mean perturbed NLL - paraphrase NLL) per question (pert_nll: questions x perturbations)."""
    return np.exp(pert_nll.mean(-1) - para_nll)


def evaluate_set(model, tokenizer, records, kind: str, max_new_tokens: int = 48) -> dict:
    """TOFU's numbers on one set of QARecords; ``kind`` is "forget", "retain", "real_authors" or "world_facts"."""
    q = [r.question for r in records]
    gold = [r.answer for r in records]
    para = [r.paraphrased_answer or r.answer for r in records]
    k = min(len(r.perturbed_answer) for r in records)
    was = model.training
    model.eval()
    gt = mean_nll(model, tokenizer, q, gold)
    para_nll = mean_nll(model, tokenizer, q, para)
    pert = np.stack([mean_nll(model, tokenizer, q, [r.perturbed_answer[j] for r in records]) for j in range(k)], -1)
    gens = greedy_answers(model, tokenizer, q, max_new_tokens)
    model.train(was)
    if kind in ("real_authors", "world_facts"):
        p_true, p_false = np.exp(-gt), np.exp(-pert).sum(-1)
        prob = float(np.mean(p_true / (p_true + p_false)))
    else:
        prob = float(np.mean(np.exp(-gt)))
    ratio = truth_ratios(para_nll, pert)
    tr = float(np.mean(np.minimum(ratio, 1 / ratio))) if kind == "forget" else float(
        np.mean(np.maximum(0.0, 1 - 1 / ratio)))
    rouge = float(np.mean([rouge_l_recall(g, a) for g, a in zip(gens, gold)]))
    return {"prob": prob, "rougeL_recall": rouge, "truth_ratio": tr, "truth_ratios": ratio.tolist(),
            "examples": [{"q": q[i], "gold": gold[i], "generated": gens[i]} for i in range(min(2, len(q)))]}


def forget_quality(unlearned_ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """KS-test p-value between two forget-set truth-ratio distributions."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(unlearned_ratios), np.asarray(retain_ratios)).pvalue)


def model_utility(results: dict[str, dict]) -> float:
    """Harmonic mean of probability, ROUGE-L recall and truth ratio on the utility sets."""
    from scipy.stats import hmean

    vals = [results[s][k] for s in UTILITY_SETS if s in results for k in ("prob", "rougeL_recall", "truth_ratio")]
    if any(v <= 0 for v in vals):
        return 0.0
    return float(hmean(vals))
