"""Do edits survive? ROME, MEMIT and MEND edits under quantisation and unrelated fine-tuning (lethe.privacy).

For the world decoder (world facts) and SmolLM2-135M-Instruct (the real-fact set), ``--n`` facts the model knows
(and whose neighbour prompts it gets right) are edited into one model: ROME one after another, MEMIT in one call,
MEND (its hypernetwork trained first, as ``benchmarks/editing_mend.py`` does) in one batch. Then, each on a
copy of the edited model:

- ``quant_8bit`` / ``quant_4bit``: round-to-nearest weight quantisation (group 128, every linear layer but the head);
- ``finetune_20``: 20 AdamW steps (batch 8) on unrelated text: the world's own training sentences that name no
  edited subject (world decoder, lr 1e-4), Python's documentation (SmolLM2, lr 2e-5).

Each row holds efficacy / paraphrase / neighbourhood (CounterFact) before and after every attack, and
``old_fact_returns``: the share of the edits that held before the attack whose old fact wins again after it.

    python benchmarks/edit_robustness.py                       # both models, ROME, MEMIT, MEND
    python benchmarks/edit_robustness.py --models lethe:world-decoder --methods rome,memit

Prints one JSON line and stores ``benchmarks/results/edit_robustness.json``.
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

FINETUNE = {"lethe:world-decoder": {"corpus": "world", "lr": 1e-4}, "lethe:smollm2": {"corpus": "pydoc", "lr": 2e-5}}
MEND_STEPS = {"lethe:world-decoder": 200, "lethe:smollm2": 100}  # as benchmarks/editing_mend.py


def mend_args(model_name: str, n: int) -> argparse.Namespace:
    """editing_mend's arguments for this model: its held-out split holds the facts edited here (for every method),
    so MEND's hypernetwork never trained on them."""
    import editing_mend

    parser = argparse.ArgumentParser()
    editing_mend.add_arguments(parser)
    world = model_name.startswith("lethe:world")
    args = parser.parse_args(["--model", model_name, "--steps", str(MEND_STEPS[model_name]),
                              "--n", str(n if world else 2 * n)])
    args.quick, args.seed = False, 0
    return args


def pick_requests(loaded, margs: argparse.Namespace, n: int):
    """The first ``n`` held-out requests (editing_mend's split) the unedited model knows, with the neighbour prompts
    it gets right, none of them about another edited subject."""
    import editing_mend

    from datamodules.edit_training import split_requests
    from lethe import evaluation as ev

    source, heldout, val_size = editing_mend.split_sizes(margs)
    pool = split_requests(source, seed=margs.seed, heldout=heldout, val_size=val_size)[2]
    known = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, pool)["efficacy_per_case"]
    reqs = [r for r, e in zip(pool, known) if e == 0.0][:n]
    reqs, _ = ev.without_edited_neighbours(reqs)
    reqs, _ = ev.known_neighbours_only(loaded.model, loaded.tokenizer, loaded.family, reqs)
    return source, reqs


def apply_edits(method: str, model_name: str, reqs, margs: argparse.Namespace):
    """The edited model, the seconds the edits took, and what else the method reports."""
    from lethe.models import load_model
    from lethe.presets import editor_preset

    if method == "mend":
        import editing_mend

        _, _, ckpt, train_s, _ = editing_mend.train_editor("mend", margs)
        from lethe.mend import MENDEditor

        loaded = load_model(model_name)
        editor = MENDEditor(str(ckpt))
        t0 = time.perf_counter()
        for s in range(0, len(reqs), 10):  # batches of 10, one after another (editing_mend's batched_10)
            editor.edit(loaded, reqs[s:s + 10])
        return loaded, time.perf_counter() - t0, {"train_seconds": round(train_s, 1)}
    loaded = load_model(model_name)
    _, hp = editor_preset(method, model_name, None)
    if method == "rome":
        from lethe.rome import ROMEEditor

        editor = ROMEEditor(hp)
        t0 = time.perf_counter()
        for r in reqs:
            editor.edit(loaded, [r])
    else:
        from lethe.memit import MEMITEditor

        editor = MEMITEditor(hp)
        t0 = time.perf_counter()
        editor.edit(loaded, reqs)
    return loaded, time.perf_counter() - t0, {}


def finetune_texts(model_name: str, reqs) -> list[str]:
    from lethe.covariance import load_corpus

    _, texts = load_corpus(FINETUNE[model_name]["corpus"])
    subjects = {r.subject for r in reqs}
    return [t for t in texts if not any(s in t for s in subjects)][:400]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lethe:world-decoder,lethe:smollm2")
    ap.add_argument("--methods", default="rome,memit,mend")
    ap.add_argument("--n", type=int, default=None, help="edits per model (default: 50 world, 10 SmolLM2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edit_robustness.json"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")

    import torch

    from lethe import privacy
    from lethe.io import write_json
    from lethe.models import load_model

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t_all = time.perf_counter()
    result: dict = {"benchmark": "edit_robustness", "attacks": {
        "quantize": "symmetric round-to-nearest, group 128, every linear layer but the head",
        "finetune": {m: {**v, "steps": 20, "batch_size": 8} for m, v in FINETUNE.items()}}, "models": {}}
    for model_name in [m for m in args.models.split(",") if m]:
        n = args.n or (50 if "world" in model_name else 10)
        margs = mend_args(model_name, n)
        base = load_model(model_name)
        source, reqs = pick_requests(base, margs, n)
        texts = finetune_texts(model_name, reqs)
        del base
        per_model: dict = {"requests": source, "n_edits": len(reqs)}
        for method in [m for m in args.methods.split(",") if m]:
            t0 = time.perf_counter()
            print(f"{model_name} {method}: editing {len(reqs)} facts ...", flush=True)
            loaded, edit_s, extra = apply_edits(method, model_name, reqs, margs)
            settings = privacy.AttackSettings(seed=0)
            row = privacy.edit_survival(loaded.model, loaded.tokenizer, loaded.family, reqs, privacy.EDIT_ATTACKS,
                                        settings, texts, 20, FINETUNE[model_name]["lr"],
                                        progress=lambda msg: print(f"  {msg}", flush=True))
            row.update(extra, edit_seconds=round(edit_s, 1), seconds=round(time.perf_counter() - t0, 1))
            per_model[method] = row
            b = row["before"]
            print(f"  before: {b['efficacy']:.2f} / {b['paraphrase']:.2f} / {b['neighborhood']:.2f}; old fact returns: "
                  + ", ".join(f"{k} {v['old_fact_returns']:.2f}" for k, v in row.items()
                              if isinstance(v, dict) and "old_fact_returns" in v), flush=True)
            del loaded
        result["models"][model_name] = per_model
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    from lethe.world_models import world_builds

    builds = world_builds(result["models"])
    if builds:
        result["world_build"] = builds
    if not args.no_save:
        write_json(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
