"""Knowledge Neurons benchmark: suppression vs random neurons, relation erasure, fact editing, throughput.

    python benchmarks/editing.py --method kn                       # 3 world models + SmolLM2 (a few minutes)
    python benchmarks/editing.py --method kn --models lethe:world-mlm --n 20

Per model (world models on ``world:train``, SmolLM2 on ``real_facts``), among the first facts the
unedited model knows (P(true) > P(new) on the rewrite prompt):

- suppression: attribute ``--n`` facts over their rewrite prompt + paraphrases (``--prompts`` at most),
  zero the refined neurons at their positions, mean relative drop of P(true) over the facts' prompts
  (the paper: ~29% on BERT); baseline = as many random neurons in the same layers, same process;
  enhancement (x2) reported alongside as the mean relative rise;
- erasure: the relation with the most known facts; its neurons = refined neurons recurring in >= 10%
  of ``--relation-facts`` attributed facts (at most 20); first-token top-1 accuracy on that relation's
  facts and on the other relations' facts before/after zeroing their value vectors (then reverted);
- editing: the paper's value-vector edit on each fact separately (reverted after scoring), CounterFact
  protocol efficacy / paraphrase / neighbourhood (paraphrases were also attribution prompts);
- throughput: attributed prompts/s (batched, shared prefix) and the step-by-step computation's
  prompts/s on 2 prompts in the same process (ratio = speed-up).
SmolLM2 is attributed on its top ``--smollm2-layers`` layers only (CPU time); world models on all.

Against the ``knowledge-neurons`` package (EleutherAI, PyPI 0.0.2; an optional benchmark dependency:
``pip install --no-deps knowledge-neurons==0.0.2 einops``), in the same process, on one model of GPT-2-small's
size (12 layers, width 768, random weights: speed only) with SmolLM2's tokenizer: the same ``--package-prompts``
real-fact prompts with one-token targets, every layer, ``--steps`` steps. The package runs its ``get_scores``
with its whole step count in one batch (its fastest setting); lethe runs ``attribute`` with its default
batching (up to 256 rows: here every layer's steps in one batch) in float32 and under
bf16 autocast, whose scores are compared with float32's (Pearson r, the lowest over prompts). The package
scales the FFN's pre-activation (``mlp.c_fc``) and lethe the neuron (the output projection's input, as the
paper defines it): the same number of units and passes. Key ``package`` in the result.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict

import torch

from lethe import attribution as A
from lethe import evaluation as ev
from lethe.models import load_model

DEFAULT_MODELS = "lethe:world-decoder,lethe:world-mlm,lethe:world-seq2seq,lethe:smollm2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--n", type=int, default=12, help="facts for suppression and editing (world models)")
    parser.add_argument("--n-smollm2", type=int, default=3, help="facts for SmolLM2")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per fact (rewrite + paraphrases)")
    parser.add_argument("--relation-facts", type=int, default=10, help="facts attributed for the erased relation")
    parser.add_argument("--eval-facts", type=int, default=60, help="facts scored per relation group")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lambda-old", type=float, default=1.0, help="edit: v -= lambda_old E[old] (paper: 1)")
    parser.add_argument("--lambda-new", type=float, default=8.0, help="edit: v += lambda_new E[new] (paper: 8)")
    parser.add_argument("--smollm2-layers", type=int, default=4, help="top layers attributed on SmolLM2")
    parser.add_argument("--package-prompts", type=int, default=6,
                        help="prompts for the comparison with the knowledge-neurons package (0: skip it)")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


def _rel_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return float(((after - before) / before.clamp(min=1e-12)).mean())


def run_model(name: str, args, log) -> dict:
    from lethe.knowledge_neurons import KnowledgeNeuronsEditor, erase_artifact
    from lethe.sources import load_requests

    world = name.startswith("lethe:world")
    loaded = load_model(name)
    model, tok, fam = loaded.model, loaded.tokenizer, loaded.family
    n = (2 if args.quick else args.n) if world else (1 if args.quick else args.n_smollm2)
    layers = None
    if not world:
        total = loaded.adapter.num_layers(model)
        layers = list(range(total - args.smollm2_layers, total))
    max_rows = 256 if world else args.steps * 2
    editor = KnowledgeNeuronsEditor(layers=layers, steps=args.steps, max_prompts=args.prompts, max_rows=max_rows,
                                    lambda_old=args.lambda_old, lambda_new=args.lambda_new)
    reqs = load_requests("world:train" if world else "real_facts")
    rng = random.Random(args.seed)
    rng.shuffle(reqs)
    pool = reqs[: (400 if world else 60)]
    known = ev.counterfact_scores(model, tok, fam, pool)["efficacy_per_case"]
    pool = [r for r, e in zip(pool, known) if e == 0.0]
    facts = pool[:n]

    # ---- attribution + suppression / enhancement
    t0 = time.perf_counter()
    attributed = [(r, *editor.neurons(loaded, r)) for r in facts]
    att_s = time.perf_counter() - t0
    n_prompts = sum(len(editor.prompts(r)) for r in facts)
    drops, rdrops, rises, sizes = [], [], [], []
    for i, (req, neurons, fa) in enumerate(attributed):
        if not fa.refined:
            continue
        prompts = fa.prompts
        tgt = [req.target_true] * len(prompts)
        p0 = A.fact_probabilities(model, tok, fam, prompts, tgt)
        ps = A.fact_probabilities(model, tok, fam, prompts, tgt, fa.refined, 0.0)
        pe = A.fact_probabilities(model, tok, fam, prompts, tgt, fa.refined, 2.0)
        rnd = A.random_like(model, fa.refined, seed=args.seed + i, adapter=loaded.adapter)
        pr = A.fact_probabilities(model, tok, fam, prompts, tgt, rnd, 0.0)
        drops.append(-_rel_change(p0, ps))
        rdrops.append(-_rel_change(p0, pr))
        rises.append(_rel_change(p0, pe))
        sizes.append(len(fa.refined))
    # step-by-step baseline throughput (m sequential passes per layer, no shared prefix)
    base_prompts = [editor.prompts(facts[0])[0]] if args.quick else editor.prompts(facts[0])[:2]
    t0 = time.perf_counter()
    A.attribute(model, tok, fam, base_prompts, facts[0].target_true, layers, steps=args.steps, max_rows=1,
                fast=False, adapter=loaded.adapter)
    seq_pps = len(base_prompts) / (time.perf_counter() - t0)
    log(f"{name}: attribution {n_prompts / att_s:.2f} prompts/s (step-by-step {seq_pps:.2f})")

    # ---- relation erasure
    by_rel = defaultdict(list)
    for r in pool:
        by_rel[r.relation].append(r)
    relation = max(by_rel, key=lambda k: len(by_rel[k]))
    rel_facts = by_rel[relation][: (3 if args.quick else args.relation_facts)]
    rel_sets = [editor.neurons(loaded, r)[1].refined for r in rel_facts]
    rel_neurons = A.relation_neurons(rel_sets, min_share=0.1, max_neurons=20)
    same = by_rel[relation][: args.eval_facts]
    other = [r for r in pool if r.relation != relation][: args.eval_facts]

    def acc(rs):
        if not rs:
            return None
        return float(A.first_token_accuracy(model, tok, fam, [r.rewrite_prompt for r in rs],
                                            [r.target_true for r in rs]).float().mean())

    erase = {"relation": relation, "n_neurons": len(rel_neurons), "n_relation_facts": len(same),
             "n_other_facts": len(other), "relation_acc_before": acc(same), "other_acc_before": acc(other)}
    if rel_neurons:
        art = erase_artifact(loaded, rel_neurons)
        erase.update(relation_acc_after=acc(same), other_acc_after=acc(other))
        art.revert(model)
    erase["note"] = ("top-1 accuracy of the true object's first token, over facts the unedited model knows "
                     "(P(true) > P(new)); a known fact can still lose top-1 to a third word")

    # ---- editing (each fact alone, reverted)
    eff, para, nb = [], [], []
    for req in facts:
        art = editor.edit(loaded, [req])
        sc = ev.counterfact_scores(model, tok, fam, [req])
        art.revert(model)
        eff.append(sc["efficacy"])
        para.append(sc["paraphrase"])
        nb.append(sc["neighborhood"])
    return {
        "facts": len(facts), "layers": "all" if layers is None else layers, "steps": args.steps,
        "suppression": {"protocol": "relative drop of P(true) at the neuron positions, mean over facts",
                        "n_facts_with_neurons": len(drops), "mean_refined_neurons": _mean(sizes),
                        "refined_drop": _mean(drops), "random_drop": _mean(rdrops), "enhance_rise": _mean(rises)},
        "erasure": erase,
        "edit": {"protocol": "counterfact", "n": len(facts), "lambda_old": args.lambda_old,
                 "lambda_new": args.lambda_new, "efficacy": _mean(eff), "paraphrase": _mean(para),
                 "neighborhood": _mean(nb)},
        "throughput": {"prompts_per_s": n_prompts / att_s, "step_by_step_prompts_per_s": seq_pps,
                       "speedup": (n_prompts / att_s) / seq_pps},
    }


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-300))


def package_comparison(args, log) -> dict:
    """prompts/s of lethe's attribution and of the knowledge-neurons package on one GPT-2-small-sized model."""
    try:
        from knowledge_neurons import KnowledgeNeurons
    except ImportError:
        return {"skipped": "the knowledge-neurons package is not installed "
                           "(pip install --no-deps knowledge-neurons==0.0.2 einops)"}
    from tokenizers import processors
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lethe.precision import autocast
    from lethe.smollm2 import ensure_smollm2
    from lethe.sources import load_requests

    tok = AutoTokenizer.from_pretrained(ensure_smollm2(progress=False))
    # no document-start token: the package encodes a target with special tokens on, and would count it
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    n = 2 if args.quick else args.package_prompts
    cases = [(r.rewrite_prompt, r.target_true) for r in load_requests("real_facts")]
    cases = [(p, t) for p, t in cases if len(tok.encode(" " + t)) == 1][: n + 1]  # the first one warms both up
    steps = args.steps
    package = KnowledgeNeurons(model, tok, model_type="gpt2", device="cpu")

    def run_package(prompt, target):
        return package.get_scores(prompt, " " + target, batch_size=steps, steps=steps, pbar=False)

    def run_lethe(prompt, target):
        res = A.attribute(model, tok, "decoder", [prompt], target, steps=steps)  # lethe's default batching
        return res.scores["decoder"][0]

    def timed(fn, precision="32"):
        with autocast(precision, "cpu"):
            fn(*cases[0])
            t = time.perf_counter()
            out = [fn(p, tgt) for p, tgt in cases[1:]]
        return len(out) / (time.perf_counter() - t), out

    from hardware import count_flops, matmul_rates, mfu

    rates = matmul_rates("cpu")
    pkg_pps, _ = timed(run_package)
    fp32_pps, fp32_scores = timed(run_lethe)
    bf16_pps, bf16_scores = timed(run_lethe, "bf16-mixed")
    r = min(_pearson(a, b) for a, b in zip(fp32_scores, bf16_scores))
    _, flops = count_flops(lambda: [run_lethe(p, tgt) for p, tgt in cases[1:]])
    _, pkg_flops = count_flops(lambda: run_package(*cases[1]))
    per_prompt = flops / (len(cases) - 1)
    log(f"package comparison: knowledge-neurons {pkg_pps:.3f} prompts/s, lethe fp32 {fp32_pps:.3f} "
        f"({fp32_pps / pkg_pps:.1f}x), bf16 {bf16_pps:.3f} ({bf16_pps / pkg_pps:.1f}x, r = {r:.5f})")
    return {"model": "gpt2-small-sized (12 layers, width 768, random weights), SmolLM2 tokenizer",
            "package": "knowledge-neurons 0.0.2 (get_scores, batch_size = steps)",
            "prompts": len(cases) - 1, "layers": 12, "steps": steps,
            "package_prompts_per_s": round(pkg_pps, 4),
            "lethe_prompts_per_s": round(fp32_pps, 4), "ratio": round(fp32_pps / pkg_pps, 2),
            "lethe_bf16_prompts_per_s": round(bf16_pps, 4), "ratio_bf16": round(bf16_pps / pkg_pps, 2),
            "bf16_score_r_min": round(r, 6),
            "lethe_gflop_per_prompt": round(per_prompt / 1e9, 2), "package_gflop_per_prompt": round(pkg_flops / 1e9, 2),
            "mfu": mfu(per_prompt * fp32_pps, 1.0, rates, "32"),
            "mfu_bf16": mfu(per_prompt * bf16_pps, 1.0, rates, "bf16-mixed"),
            "package_mfu": mfu(pkg_flops * pkg_pps, 1.0, rates, "32"), "matmul_rates": rates}


def run(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out = {}
    t0 = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t = time.perf_counter()
        out[name] = run_model(name, args, log)
        out[name]["seconds"] = time.perf_counter() - t
        log(f"{name}: done in {out[name]['seconds']:.0f} s")
    result = {"models": out}
    if args.package_prompts > 0:
        t = time.perf_counter()
        result["package"] = package_comparison(args, log)
        result["package"]["seconds"] = round(time.perf_counter() - t, 1)
    result["seconds"] = time.perf_counter() - t0
    return result
