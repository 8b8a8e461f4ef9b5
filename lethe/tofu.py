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
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lethe import lm, records
from lethe.records import parse_split, subset_authors

UTILITY_SETS = ("retain", "real_authors", "world_facts")
SUBSETS = records.TOFU_SUBSETS  # which TOFU authors a run keeps (lethe.records: full, cpu40, cpu20)

def cache_root() -> Path:
    """Where TOFU's fine-tuned models and reference ratios are cached ($LETHE_CACHE or ~/.cache/lethe, /tofu)."""
    from lethe.io import cache_root as lethe_cache

    return lethe_cache() / "tofu"


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
def mean_nll(model, tokenizer, questions: Sequence[str], answers: Sequence[str], batch_size: int = 32,
             prompt_format: str | None = None) -> np.ndarray:
    """Per-pair mean token NLL of the answer given the (formatted) question (TOFU's avg loss)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(questions), batch_size):
        batch = lm.to_device(lm.encode_pairs(tokenizer, "decoder", questions[s:s + batch_size],
                                             answers[s:s + batch_size], prompt_format=prompt_format), device)
        out.append(lm.sequence_nll(model, batch, "decoder").float().cpu())
    return torch.cat(out).double().numpy()


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 48,
                   batch_size: int = 32, prompt_format: str | None = None) -> list[str]:
    """Greedy answers, one batched (left-padded) generate per batch; the prompt is tokenised as in
    :func:`lethe.lm.encode_pairs` (same BOS, same format)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    prefix = lm._bos_prefix(tokenizer)
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
                        if "<|im_end|>" in tokenizer.get_vocab() else None) if t is not None}
    answers = []
    for s in range(0, len(questions), batch_size):
        rows = [prefix + tokenizer(lm.format_prompt(tokenizer, q, prompt_format), add_special_tokens=False)[
            "input_ids"] for q in questions[s:s + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            att[i, width - len(r):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=sorted(stop) or None,
                             temperature=None, top_p=None, top_k=None)
        for g in gen[:, width:].tolist():
            cut = min([g.index(t) for t in stop if t in g], default=len(g))
            answers.append(tokenizer.decode([t for t in g[:cut] if t != pad], skip_special_tokens=True).strip())
    return answers


def truth_ratios(para_nll: np.ndarray, pert_nll: np.ndarray) -> np.ndarray:
    """R = exp(mean perturbed NLL - paraphrase NLL) per question (pert_nll: questions x perturbations)."""
    return np.exp(pert_nll.mean(-1) - para_nll)


def question_scores(model, tokenizer, records, max_new_tokens: int = 48, prompt_format: str | None = None,
                    batch_size: int = 32, generate: bool = True) -> dict[str, list]:
    """Per-question raw numbers of a set of QARecords: the answer's, the paraphrase's and each perturbed
    answer's mean NLL, and the greedy answer's ROUGE-L recall (``generate=False``: NLLs only). Kept per
    question so processes can score shards and the whole set is put back together in order."""
    q = [r.question for r in records]
    gold = [r.answer for r in records]
    para = [r.paraphrased_answer or r.answer for r in records]
    k = min(len(r.perturbed_answer) for r in records) if records else 0
    out: dict[str, list] = {"gt_nll": [], "para_nll": [], "pert_nll": [], "rougeL_recall": [], "generated": []}
    if not records:
        return out
    was = model.training
    model.eval()
    try:
        nll = partial(mean_nll, model, tokenizer, q, batch_size=batch_size, prompt_format=prompt_format)
        out["gt_nll"] = nll(gold).tolist()
        out["para_nll"] = out["gt_nll"] if para == gold else nll(para).tolist()  # no paraphrases: the answer
        out["pert_nll"] = np.stack([nll([r.perturbed_answer[j] for r in records]) for j in range(k)], -1).tolist()
        if generate:
            gens = greedy_answers(model, tokenizer, q, max_new_tokens, batch_size, prompt_format)
            out["generated"] = gens
            out["rougeL_recall"] = [rouge_l_recall(g, a) for g, a in zip(gens, gold)]
    finally:
        model.train(was)
    return out


def aggregate_set(kind: str, scores: dict[str, list]) -> dict:
    """TOFU's three numbers of one set from its per-question scores; ``kind`` is "forget", "retain",
    "real_authors" or "world_facts" (the latter two normalise the answer's probability against the perturbed
    answers', and every set but forget reports the truth ratio as max(0, 1 - 1/R))."""
    gt, para, pert = (np.asarray(scores[k], dtype=np.float64) for k in ("gt_nll", "para_nll", "pert_nll"))
    if kind in ("real_authors", "world_facts"):
        p_true, p_false = np.exp(-gt), np.exp(-pert).sum(-1)
        prob = float(np.mean(p_true / (p_true + p_false)))
    else:
        prob = float(np.mean(np.exp(-gt)))
    ratio = truth_ratios(para, pert)
    tr = float(np.mean(np.minimum(ratio, 1 / ratio))) if kind == "forget" else float(
        np.mean(np.maximum(0.0, 1 - 1 / ratio)))
    out = {"prob": prob, "truth_ratio": tr, "truth_ratios": ratio.tolist()}
    if scores.get("rougeL_recall"):
        out["rougeL_recall"] = float(np.mean(scores["rougeL_recall"]))
    return out


def evaluate_set(model, tokenizer, records, kind: str, max_new_tokens: int = 48, prompt_format: str | None = None,
                 batch_size: int = 32) -> dict:
    """TOFU's numbers on one set of QARecords in one process (:func:`question_scores` + :func:`aggregate_set`)."""
    scores = question_scores(model, tokenizer, records, max_new_tokens, prompt_format, batch_size)
    out = aggregate_set(kind, scores)
    out["examples"] = [{"q": r.question, "gold": r.answer, "generated": g}
                       for r, g in zip(records[:2], scores["generated"][:2])]
    return out


def perturbed_split(forget_split: str) -> str:
    """The evaluation split of a forget split: ``forget05[:2]`` -> ``forget05_perturbed[:2]``."""
    name, authors = parse_split(forget_split)
    tail = "" if authors is None else f"[{'' if authors.start is None else authors.start}:" \
                                      f"{'' if authors.stop is None else authors.stop}]"
    return f"{name}_perturbed{tail}"


EVAL_SETS = {"forget": None, "retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
             "world_facts": "world_facts_perturbed"}


def load_eval_sets(forget_split: str, subset: str = "full", limits: dict[str, int | None] | None = None,
                   check_forget: bool = True) -> dict:
    """TOFU's evaluation sets: ``<forget_split>_perturbed`` (whole) and the first ``limits[name]`` questions of
    retain_perturbed / real_authors_perturbed / world_facts_perturbed, each record checked for its perturbed
    answers (the truth ratio needs them); the forget set's perturbed questions must be the forget split's own
    (``check_forget``)."""
    from lethe.records import read_records

    limits = limits or {}
    sets = {}
    for name, split in EVAL_SETS.items():
        split = split or perturbed_split(forget_split)
        sets[name] = read_records(f"tofu:{split}", "tofu", tofu_subset=subset)[:limits.get(name)]
        if not sets[name]:
            raise ValueError(f"tofu:{split}: the {name} evaluation set is empty")
        missing = [i for i, r in enumerate(sets[name]) if not r.perturbed_answer]
        if missing:
            raise ValueError(f"tofu:{split}: record {missing[0]} ({sets[name][missing[0]].question!r}): field "
                             "'perturbed_answer' is missing or empty (the truth ratio needs it)")
    if check_forget:
        from lethe.records import read_records

        forget = {r.question for r in read_records(f"tofu:{forget_split}", "tofu", tofu_subset=subset)}
        pert = sets["forget"]
        stray = [i for i, r in enumerate(pert) if r.question not in forget]
        if stray or len({r.question for r in pert}) != len(forget):
            where = (f"record {stray[0]}, field 'question' ({pert[stray[0]].question!r}) is not a question of "
                     f"tofu:{forget_split}" if stray else f"it holds {len(pert)} of tofu:{forget_split}'s "
                     f"{len(forget)} questions")
            raise ValueError(f"tofu:{perturbed_split(forget_split)} does not match the forget set: {where}")
    return sets


def summarise(results: dict[str, dict], reference_ratios: Sequence[float] | None) -> dict:
    """One row of TOFU numbers from :func:`aggregate_set` results of every evaluation set."""
    row: dict = {"forget_quality": (forget_quality(results["forget"]["truth_ratios"], reference_ratios)
                                    if reference_ratios is not None else None),
                 "model_utility": model_utility(results)}
    for name, res in results.items():
        for key in ("prob", "rougeL_recall", "truth_ratio"):
            if key in res:
                row[f"{name}/{key}"] = res[key]
    row["forget_truth_ratios"] = results["forget"]["truth_ratios"]
    return row


def evaluate_model(model, tokenizer, sets: dict, reference_ratios: Sequence[float] | None = None,
                   prompt_format: str | None = None, max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """TOFU's row for one model in this process (the callback shards the same work across processes)."""
    results = {name: aggregate_set(name, question_scores(model, tokenizer, records, max_new_tokens, prompt_format,
                                                         batch_size)) for name, records in sets.items()}
    return summarise(results, reference_ratios)


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


# --------------------------------------------------------------------------- fine-tuned models, cached by recipe

FINETUNE_PRESETS = {"target": "tofu/smollm2_target", "retain": "tofu/smollm2_retain",
                    "target_lora": "tofu/smollm2_target_lora", "retain_lora": "tofu/smollm2_retain_lora"}


def recipe_key(role: str, subset: str, seed: int = 0, overrides: Sequence[str] = ()) -> str:
    """A hash of what makes a fine-tuned TOFU model: its preset's text, the subset, the seed and any overrides."""
    import hashlib
    import json

    from lethe.presets import preset_path

    text = preset_path(FINETUNE_PRESETS[role]).read_text()
    return hashlib.sha256(json.dumps([text, subset, seed, list(overrides)]).encode()).hexdigest()[:12]


def finetuned_dir(role: str, subset: str = "cpu20", seed: int = 0, overrides: Sequence[str] = ()) -> Path:
    if role not in FINETUNE_PRESETS:
        raise ValueError(f"TOFU model role {role!r}: use {' or '.join(FINETUNE_PRESETS)}")
    subset_authors(subset)
    return cache_root() / f"smollm2-{subset}-{role}-seed{seed}-{recipe_key(role, subset, seed, overrides)}"


def ensure_finetuned(role: str, subset: str = "cpu20", seed: int = 0, overrides: Sequence[str] = (),
                     log: str | None = None) -> Path:
    """The fine-tuned TOFU model ``role`` (``target``: forget + retain authors; ``retain``: retain authors only)
    of ``subset``: from the cache, else trained once by its preset (``lethe fit``, a subprocess; its progress
    goes to ``log`` or this process's output) and cached under its recipe's hash."""
    import subprocess
    import sys

    from lethe.interrupts import run_child
    from lethe.io import file_lock
    from lethe.presets import preset_path

    dest = finetuned_dir(role, subset, seed, overrides)
    done = dest / "config.json"
    if done.is_file():
        return dest
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if done.is_file():
            return dest
        cmd = [sys.executable, "-m", "lethe.cli", "fit", "--config", str(preset_path(FINETUNE_PRESETS[role])),
               "--seed_everything", str(seed), "--data.init_args.tofu_subset", subset,
               "--model.init_args.save_dir", str(dest), "--run.root", str(dest.parent / "runs"),
               "--run.name", dest.name, *overrides]
        print(f"lethe: fine-tuning the TOFU {role} model ({subset}, seed {seed}) into {dest} -- once; "
              f"{' '.join(cmd[2:])}", flush=True)
        out = open(log, "a") if log else None  # noqa: SIM115 -- closed below
        try:
            rc = run_child(cmd, check=False, stdout=out, stderr=subprocess.STDOUT if out else None).returncode
        finally:
            if out:
                out.close()
        if rc != 0 or not done.is_file():
            raise RuntimeError(f"fine-tuning the TOFU {role} model failed (exit {rc}); see "
                               f"{log or 'the output above'}")
    return dest


def _alias(role: str, subset: str):
    return lambda: ensure_finetuned(role, subset)


def register_aliases() -> None:
    """``lethe:smollm2-tofu-<subset>-<role>``: the fine-tuned TOFU models, built on first use."""
    from lethe.models import register_alias

    for subset in SUBSETS:
        for role in FINETUNE_PRESETS:
            register_alias(f"smollm2-tofu-{subset}-{role}", _alias(role, subset))


register_aliases()
