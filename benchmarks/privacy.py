"""Is it really gone? Membership inference and recovery attacks on TOFU's SmolLM2 models (lethe.privacy).

For the TOFU target model, the retain model and every unlearning method of ``benchmarks/tofu.py`` (their run
folders under ``--runs``; a missing one is run first, as ``benchmarks/tofu.py`` runs it):

- ``mia_auc``: each attack's ROC-AUC of the forget split's questions (members of the target's training set)
  against the questions of two TOFU authors no model here trained on (``tofu:full[100:102]``);
- ``privleak``: MUSE's relative difference of that AUC to the retain model's, per attack;
- every forget ROUGE-L below is of greedy answers generated under bf16 autocast, and the MIA statistics come from
  forward passes under bf16 autocast (the weights stay float32);
- ``relearn_10`` / ``relearn_50``: forget ROUGE-L recall on the odd half of the forget questions after 10 / 50
  AdamW steps (lr 5e-5, batch 4, bf16-mixed) on the even half (``relearn_half_before``: before);
- ``quant_8bit`` / ``quant_4bit``: forget ROUGE-L after round-to-nearest weight quantisation (group 128);
- ``probe_paraphrase`` / ``probe_hint``: forget ROUGE-L on the paraphrased questions / after a hint naming the author;
- ``survived``: per attack, whether forget ROUGE-L rose by less than 0.05; ``recovered_share``: how much of
  the gap between the unlearned model and the target the attack closed;
- ``seconds`` per model (the wall time of its two jobs, relearning and the rest; ``--workers`` jobs run at once,
  one process each, and the top-level ``seconds`` is the whole benchmark's).

    python benchmarks/privacy.py                      # cpu20, forget01, every method (runs/ from benchmarks/tofu.py)
    python benchmarks/privacy.py --methods npo,rmu --runs runs

Prints one JSON line and stores it in ``benchmarks/results/privacy.json`` with ``privacy.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

HOLDOUT = "tofu:full[100:102]"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", default="cpu20")
    ap.add_argument("--split", default="forget01")
    ap.add_argument("--methods", default=None, help="comma list (default: every method of benchmarks/tofu.py)")
    ap.add_argument("--runs", default=str(ROOT / "runs"), help="the TOFU method runs (benchmarks/tofu.py --runs)")
    ap.add_argument("--holdout", default=HOLDOUT)
    ap.add_argument("--relearn-lr", type=float, default=5e-5)
    ap.add_argument("--workers", type=int, default=2, help="models attacked in parallel, one process each")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all (split among the workers)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy.json"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")

    import tofu as tofu_bench
    import torch

    from lethe import privacy, tofu
    from lethe.io import write_json
    from lethe.models import load_model
    from lethe.records import read_records

    torch.set_num_threads(max(1, min(torch.get_num_threads(), args.threads)))
    methods = [m for m in (args.methods or ",".join(tofu_bench.METHODS)).split(",") if m]
    t_all = time.perf_counter()
    target, retain = (tofu.ensure_finetuned(role, args.subset) for role in ("target", "retain"))
    fmt = tofu_bench._preset_value(ROOT / "configs" / "tofu" / "smollm2_target.yaml", "prompt_format")
    forget_records = read_records(f"tofu:{tofu.perturbed_split(args.split)}", "tofu", tofu_subset=args.subset)
    holdout_records = read_records(args.holdout, "tofu")
    forget, holdout = privacy.examples(forget_records), privacy.examples(holdout_records)
    privacy.check_sets(forget, holdout, {"forget": args.split, "holdout": args.holdout})
    settings = privacy.AttackSettings(relearn_lr=args.relearn_lr, bf16=True)

    models = {"target": str(target), "retain": str(retain)}
    for method in methods:
        run_dir = Path(args.runs) / f"tofu_{args.subset}_{method}"
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            print(f"{method}: no run in {run_dir}; running its preset (benchmarks/tofu.py)", flush=True)
            ns = argparse.Namespace(runs=args.runs, subset=args.subset, split=args.split, lora=False, max_steps=None,
                                    override=None)
            tofu_bench.run_method(method, ns, target, retain, Path(args.runs) / "privacy_benchmark.log")
        models[method] = str(run_dir)

    ref = load_model(retain)
    _, ref_nll = privacy.membership(ref.model, ref.tokenizer, "decoder", forget, holdout, fmt, bf16=settings.bf16)
    del ref
    result: dict = {"benchmark": "privacy", "model": "lethe:smollm2 (SmolLM2-135M-Instruct), TOFU fine-tunes",
                    "subset": args.subset, "forget_split": args.split, "holdout": args.holdout,
                    "n_forget": len(forget), "n_holdout": len(holdout), "reference": "retain",
                    "attacks": {"mia": list(privacy.MIA_ATTACKS), "relearn": {"steps": list(settings.relearn_steps),
                                "lr": settings.relearn_lr, "batch_size": settings.relearn_batch_size,
                                "precision": "bf16-mixed", "train": "even forget questions",
                                "scored": "odd forget questions"},
                                "scoring": f"ROUGE-L recall of greedy answers ({settings.max_new_tokens} new tokens) "
                                           "generated under bf16 autocast (float32 weights); MIA forward passes "
                                           "under bf16 autocast, their statistics in float32",
                                "quantize": {"bits": list(settings.quant_bits), "group_size": settings.group_size,
                                             "scheme": "symmetric round-to-nearest, per output channel and group, "
                                                       "every linear layer but the output head"},
                                "survive_tolerance": settings.survive_tolerance},
                    "models": {}}
    # two jobs a model, the longer (relearning) ones first: 18 jobs of ~1-2 min keep both workers busy to the end,
    # where 9 jobs of ~4 min left one idle for the last model
    jobs = [{"name": name, "path": path, "part": part, "forget": forget, "holdout": holdout, "fmt": fmt,
             "ref_nll": ref_nll, "forget_records": forget_records, "settings": settings}
            for part in ("relearn", "rest") for name, path in models.items()]
    from hardware import parallel_map

    workers = max(1, min(args.workers, len(jobs)))
    rows = parallel_map(attack_model, jobs, workers, args.threads, desc="privacy attack jobs (2 a model)")
    for job, part in zip(jobs, rows):
        row = result["models"].setdefault(job["name"], {"seconds": 0.0, "attack_seconds": {}})
        row["seconds"] = round(row["seconds"] + part.pop("seconds"), 1)
        row["attack_seconds"].update(part.pop("attack_seconds"))
        row.update(part)
    for name, row in result["models"].items():
        row["relearn_half_before"] = privacy.relearn_baseline(row["forget_per_example"])
        row["survived"] = privacy.survival(row, settings.survive_tolerance)
        print(f"{name}: AUC loss {row['mia_auc']['loss']:.3f} min_k_pp {row['mia_auc']['min_k_pp']:.3f}; forget "
              f"ROUGE-L {row['forget']:.3f}, relearn_50 {row.get('relearn_50', float('nan')):.3f}, 4-bit "
              f"{row.get('quant_4bit', float('nan')):.3f} "
              f"({row['seconds']} s)", flush=True)
    result["workers"] = workers
    retain_auc = result["models"]["retain"]["mia_auc"]
    tgt = result["models"]["target"]
    for name, row in result["models"].items():
        row["privleak"] = privacy.privleak_by_attack(row["mia_auc"], retain_auc)
        if name not in ("target", "retain"):
            row["recovered_share"] = {}
            for key in row["survived"]:
                before = privacy.attack_baseline(row, key)
                gap = privacy.attack_baseline(tgt, key) - before
                row["recovered_share"][key] = (row[key] - before) / gap if gap > 1e-9 else None
    result["methods"] = methods
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    line = json.dumps(result)
    if not args.no_save:
        out = Path(args.out)
        write_json(out, result)
        plot(result, out.with_suffix(".png"))
    print(line)
    return result


def attack_model(job: dict) -> dict:
    """One part of one model's row (``job``: its name, path, part and the sets): ``relearn`` is the relearning
    attack; ``rest`` is membership inference, the forget pass and the other recovery attacks."""
    from lethe import privacy
    from lethe.models import load_model

    name, t0 = job["name"], time.perf_counter()
    print(f"{name}: {'relearning' if job['part'] == 'relearn' else 'membership inference and attacks'} ...",
          flush=True)
    loaded = load_model(job["path"])
    if job["part"] == "relearn":
        row = privacy.relearn_attack(loaded.model, loaded.tokenizer, "decoder", job["forget"], job["settings"],
                                     job["fmt"])
        row["attack_seconds"] = {"relearn": round(time.perf_counter() - t0, 1)}
    else:
        row = privacy.membership(loaded.model, loaded.tokenizer, "decoder", job["forget"], job["holdout"],
                                 job["fmt"], job["ref_nll"], bf16=job["settings"].bf16)[0]
        row.update(privacy.recovery(loaded.model, loaded.tokenizer, "decoder", job["forget_records"],
                                    [a for a in privacy.RECOVERY_ATTACKS if a != "relearn"], job["settings"],
                                    job["fmt"], progress=lambda msg: print(f"  {name}: {msg}", flush=True)))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def plot(result: dict, dest: Path) -> Path:
    """MIA AUC (LOSS, Min-K%++) and forget ROUGE-L before / after each attack, one group of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lethe.io import save_png

    names = list(result["models"])
    rows = [result["models"][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    xs = np.arange(len(names))
    for i, attack in enumerate(("loss", "min_k_pp", "reference")):
        ax1.bar(xs + (i - 1) * 0.27, [r["mia_auc"][attack] for r in rows], 0.27, label=attack)
    ax1.axhline(0.5, ls="--", color="k", lw=0.8)
    ax1.set_xticks(xs, names, rotation=30)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("MIA ROC-AUC, forget vs unseen authors")
    ax1.legend(fontsize=7)
    keys = ["forget", "relearn_50", "quant_4bit", "probe_paraphrase", "probe_hint"]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax2.bar(xs + (i - len(keys) / 2 + 0.5) * width, [r.get(key, np.nan) for r in rows], width, label=key)
    ax2.set_xticks(xs, names, rotation=30)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("forget ROUGE-L recall")
    ax2.legend(fontsize=7)
    fig.suptitle(f"TOFU {result['forget_split']} ({result['subset']}), SmolLM2-135M: is it really gone?")
    return save_png(fig, dest)


if __name__ == "__main__":
    main()
