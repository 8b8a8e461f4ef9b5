"""TOFU end to end on CPU: fine-tune, retain model, unlearn forget10 (GA, GradDiff, NPO), evaluate.

The model is lethe's embedded tiny decoder recipe (GPT-2 shape: 4 blocks, width 128) with a
word-level tokenizer built over the TOFU texts (the world decoder's vocabulary cannot
spell TOFU's authors), trained from scratch -- it will not be fluent; the pipeline and the
metrics are what is exercised. To fit a few CPU minutes the default run SUBSAMPLES TOFU:
``--forget-authors`` of forget10's 20 authors (20 QA each) and ``--retain-authors`` of
retain90's 180 (plus the retain_perturbed questions evaluated), ``--eval-n`` questions
per evaluation set; the output says so. ``--forget-authors 20 --retain-authors 180
--eval-n 0`` is the full benchmark.

1. fine-tune on forget+retain ("full"); 2. fine-tune a retain model on retain only;
3. unlearn the forget authors from (1) with GA / GradDiff / NPO (``--unlearn-epochs``);
4. TOFU metrics (lethe.tofu): forget quality (KS p-value against the retain model's
forget-set truth ratios) and model utility (harmonic mean over retain / real authors /
world facts) for every model. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L
import torch

from lethe import tofu
from lethe.io import tofu_dir
from lethe.records import read_records

TOFU = tofu_dir()


def load_subsample(data: Path, forget_authors: int, retain_authors: int, eval_n: int) -> dict:
    rd = lambda name: read_records(data / name, "tofu")
    forget10, retain90 = rd("forget10.json"), rd("retain90.json")
    forget_pert, retain_pert = rd("forget10_perturbed.json"), rd("retain_perturbed.json")
    forget = forget10[: 20 * forget_authors]
    fq = {r.question for r in forget}
    n = eval_n or None
    retain_eval = retain_pert[:n]
    keep = {r.question for r in retain_eval}
    retain = [r for i, r in enumerate(retain90) if i < 20 * retain_authors or r.question in keep]
    return {
        "forget": forget, "retain": retain,
        "eval": {"forget": [r for r in forget_pert if r.question in fq][:n], "retain": retain_eval,
                 "real_authors": rd("real_authors_perturbed.json")[:n],
                 "world_facts": rd("world_facts_perturbed.json")[:n]},
    }


def build_model(dest: Path, texts: list[str], seed: int = 0) -> str:
    """A fresh tiny GPT-2 (the world decoder's recipe) with a word-level tokenizer over ``texts``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lethe.io import save_pretrained
    from lethe.tokenizers import build_world_tokenizer

    tok = build_world_tokenizer(texts, "gpt2")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=128, n_layer=4, n_head=4, n_inner=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return str(save_pretrained(GPT2LMHeadModel(cfg), tok, dest))


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=True, num_sanity_val_steps=0, **kw)


def finetune(model_dir: str, records, epochs: int, lr: float, dest: Path) -> str:
    from datamodules.lm import LMDataModule
    from lightning_modules.lm import LanguageModelModule

    L.seed_everything(0, verbose=False)
    module = LanguageModelModule(model_dir, lr=lr, warmup_steps=20)
    dm = LMDataModule(pairs=[[r.question, r.answer] for r in records], batch_size=32, max_length=128, add_eos=True)
    _trainer(max_epochs=epochs).fit(module, dm)
    return str(module.save_model(dest))


def unlearn(model_dir: str, method: str, forget, retain, epochs: int, lr: float, dest: Path) -> str:
    from datamodules.forget_retain import ForgetRetainDataModule
    from lightning_modules.unlearning import UnlearningModule

    L.seed_everything(0, verbose=False)
    module = UnlearningModule(model_dir, method=method, lr=lr)
    dm = ForgetRetainDataModule(forget_pairs=[[r.question, r.answer] for r in forget],
                                retain_pairs=[[r.question, r.answer] for r in retain], batch_size=16,
                                max_length=128, add_eos=True)
    _trainer(max_epochs=epochs).fit(module, dm)
    return str(module.save_result(dest, "full"))


def evaluate(model_dir: str, sets: dict) -> dict:
    from lethe.models import load_model

    loaded = load_model(model_dir)
    return {name: tofu.evaluate_set(loaded.model, loaded.tokenizer, recs, name) for name, recs in sets.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(TOFU))
    p.add_argument("--forget-authors", type=int, default=4)
    p.add_argument("--retain-authors", type=int, default=36)
    p.add_argument("--eval-n", type=int, default=60)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--unlearn-epochs", type=int, default=5)
    p.add_argument("--unlearn-lr", type=float, default=1e-4)
    p.add_argument("--methods", default="ga,graddiff,npo")
    p.add_argument("--out", default="runs/benchmark_tofu")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    t0 = time.perf_counter()
    data = load_subsample(Path(args.data), args.forget_authors, args.retain_authors, args.eval_n)
    texts = [s for recs in [data["forget"], data["retain"], *data["eval"].values()] for r in recs
             for s in [r.question, r.answer, r.paraphrased_answer or "", *(r.perturbed_answer or [])]]
    base = build_model(out / "init", texts)
    models = {"finetuned": finetune(base, data["forget"] + data["retain"], args.epochs, args.lr, out / "finetuned"),
              "retain": finetune(base, data["retain"], args.epochs, args.lr, out / "retain")}
    for method in args.methods.split(","):
        models[method] = unlearn(models["finetuned"], method, data["forget"], data["retain"], args.unlearn_epochs,
                                 args.unlearn_lr, out / method)
    results = {name: evaluate(path, data["eval"]) for name, path in models.items()}
    retain_ratios = results["retain"]["forget"]["truth_ratios"]
    summary = {}
    for name, res in results.items():
        summary[name] = {
            "forget_quality": tofu.forget_quality(res["forget"]["truth_ratios"], retain_ratios),
            "model_utility": tofu.model_utility(res),
            "forget_prob": res["forget"]["prob"], "forget_rougeL_recall": res["forget"]["rougeL_recall"],
            "forget_truth_ratio": res["forget"]["truth_ratio"],
            **{f"{s}_{k}": res[s][k] for s in tofu.UTILITY_SETS for k in ("prob", "rougeL_recall", "truth_ratio")},
        }
        # forget quality is a p-value (TOFU plots it on a log scale): 3 significant digits, not 4 decimals
        summary[name] = {k: float(f"{v:.3g}") if k == "forget_quality" else round(v, 4)
                         for k, v in summary[name].items()}
        print(name, json.dumps(summary[name]), "| e.g.", json.dumps(res["forget"]["examples"][0]), flush=True)
    result = {
        "benchmark": "tofu", "model": "tiny GPT-2 (world-decoder recipe, TOFU word-level vocabulary), from scratch",
        "subsampled": {"forget_authors": args.forget_authors, "forget_qa": len(data["forget"]),
                       "retain_authors": args.retain_authors, "retain_qa": len(data["retain"]),
                       "eval_questions_per_set": {k: len(v) for k, v in data["eval"].items()},
                       "finetune_epochs": args.epochs, "unlearn_epochs": args.unlearn_epochs,
                       "note": "subsample of TOFU forget10/retain90 for CPU; not comparable to published numbers"},
        "models": summary, "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
