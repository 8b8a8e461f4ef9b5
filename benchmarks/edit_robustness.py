"""Do edits survive? ROME, MEMIT and MEND edits under quantisation and unrelated fine-tuning (lethe.privacy).

For the world decoder (world facts; editing_mend's held-out split) and SmolLM2-135M-Instruct (the fact bank's
held-out subjects, which the MEND preset never trains on), ``--n`` facts the model knows (and whose neighbour
prompts it gets right) are edited: ROME one after another and MEMIT in one call, all into one model; MEND in
batches of 10, each batch on the unedited model (its world editor trained here as ``benchmarks/editing_mend.py``
trains it, ~40 s; SmolLM2's is the shipped preset's, ``configs/edit/mend_smollm2.yaml``, from lethe's cache or
``--mend-run``, else trained first, ~45 min). Then, each on a copy of the edited model:

- ``quant_8bit`` / ``quant_4bit``: round-to-nearest weight quantisation (group 128, every linear layer but the head);
- ``finetune_20``: 20 AdamW steps (batch 8, bf16 autocast, texts cut to 48 words) on unrelated text: the world's
  own training sentences that name no edited subject (world decoder, lr 1e-4), Python's documentation (SmolLM2,
  lr 2e-5).

Each row holds efficacy / paraphrase / neighbourhood (CounterFact) before and after every attack, and
``old_fact_returns``: the share of the edits that held before the attack whose old fact wins again after it.
On SmolLM2, up to half of the edits move a city or a company to another country, and ``portability`` is the share
of their two-hop probes (``evaluation.portability_probes``: "The official language of the country where Lyon is
located is", with the old and new countries' answers from the fact bank) that follow the edit, of the probes the
unedited model answers with the old country's answer. The world has no two-hop chain (its objects are never
subjects), so it has no portability figure.

    python benchmarks/edit_robustness.py                       # both models, ROME, MEMIT, MEND
    python benchmarks/edit_robustness.py --models lethe:world-decoder --methods rome,memit
    python benchmarks/edit_robustness.py --mend-run lethe:smollm2=runs/mend_smollm2   # a finished preset run

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
MEND_STEPS = {"lethe:world-decoder": 200}  # the world decoder's editor, as benchmarks/editing_mend.py trains it
MEND_PRESET = {"lethe:smollm2": "configs/edit/mend_smollm2.yaml"}  # SmolLM2's: the shipped preset's (mend.json)
HELDOUT = {"lethe:smollm2": "fact_bank:heldout"}  # the MEND preset's held-out subjects (never trained on)
MEND_BATCH = 10


def mend_args(model_name: str, n: int) -> argparse.Namespace:
    """editing_mend's arguments for the world decoder: its held-out split holds the facts edited here (for every
    method), so MEND's hypernetwork never trained on them."""
    import editing_mend

    parser = argparse.ArgumentParser()
    editing_mend.add_arguments(parser)
    args = parser.parse_args(["--model", model_name, "--steps", str(MEND_STEPS.get(model_name, 200)), "--n", str(n)])
    args.quick, args.seed = False, 0
    return args


def pick_requests(loaded, model_name: str, margs: argparse.Namespace, n: int):
    """The first ``n`` held-out requests the unedited model knows, with the neighbour prompts it gets right, none
    of them about another edited subject. Held out: editing_mend's split of the world's facts; for SmolLM2 the
    fact bank's held-out subjects (the MEND preset's ``heldout_source``), in a seeded order (relations mixed)."""
    import editing_mend

    from datamodules.edit_training import split_requests
    from lethe import evaluation as ev
    from lethe.sources import load_requests

    if model_name in HELDOUT:
        source, pool = HELDOUT[model_name], load_requests(HELDOUT[model_name], seed=0)
    else:
        source, heldout, val_size = editing_mend.split_sizes(margs)
        pool = split_requests(source, seed=margs.seed, heldout=heldout, val_size=val_size)[2]
    known = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, pool)["efficacy_per_case"]
    pool = [r for r, e in zip(pool, known) if e == 0.0]
    # up to half of them facts whose object is a country, which two-hop (portability) probes can follow
    two_hop = [r for r in pool if r.relation in ev.TWO_HOP_FIRST][:n // 2] if model_name in HELDOUT else []
    reqs = two_hop + [r for r in pool if r not in two_hop][:n - len(two_hop)]
    reqs, _ = ev.without_edited_neighbours(reqs)
    reqs, _ = ev.known_neighbours_only(loaded.model, loaded.tokenizer, loaded.family, reqs)
    return source, reqs


def known_probes(loaded, reqs) -> tuple[list, dict]:
    """The two-hop probes (``evaluation.portability_probes`` over the fact bank) the unedited model answers with
    the old fact's consequence (each probe's ``case`` indexes ``reqs``), and their counts."""
    from lethe import evaluation as ev
    from lethe.sources import load_requests

    probes = ev.portability_probes(reqs, load_requests("fact_bank"))
    kept, left_out = ev.known_portability_probes(loaded.model, loaded.tokenizer, loaded.family, probes)
    return kept, {"scored": len(kept), "edits_probed": len({p.case for p in kept}),
                  "left_out_unknown_to_the_unedited_model": left_out, "hops": sorted({p.hop for p in kept})}


def mend_editor(model_name: str, margs: argparse.Namespace, mend_run: str | None):
    """MEND's editor for this model, and its training seconds and origin."""
    import editing_mend

    from lethe.mend import MENDEditor

    if model_name in MEND_PRESET:
        path, info = editing_mend.preset_editor("mend", MEND_PRESET[model_name], mend_run)
        return MENDEditor(str(path)), {**info, "preset": MEND_PRESET[model_name]}
    _, _, ckpt, train_s, _ = editing_mend.train_editor("mend", margs)
    return MENDEditor(str(ckpt)), {"train_seconds": round(train_s, 1), "train_steps": margs.steps}


def edited_groups(method: str, model_name: str, reqs, margs: argparse.Namespace, mend_run: str | None = None):
    """Yield (edited model, its requests, edit seconds, extra facts) per group of edits held by one model at once:
    ROME's edits one after another and MEMIT's in one call, all in one model; MEND's in batches of 10, each batch
    on the unedited model (MEND edits are not made to stack: 50 world edits stacked five batches deep kept 24)."""
    from lethe.models import load_model
    from lethe.presets import editor_preset

    loaded = load_model(model_name)
    if method == "mend":
        editor, extra = mend_editor(model_name, margs, mend_run)
        for s in range(0, len(reqs), MEND_BATCH):
            t0 = time.perf_counter()
            art = editor.edit(loaded, reqs[s:s + MEND_BATCH])
            yield loaded, reqs[s:s + MEND_BATCH], time.perf_counter() - t0, {**extra, "batch": MEND_BATCH}
            art.revert(loaded.model)
        return
    _, hp = editor_preset(method, model_name, None)
    t0 = time.perf_counter()
    if method == "rome":
        from lethe.rome import ROMEEditor

        editor = ROMEEditor(hp)
        for r in reqs:
            editor.edit(loaded, [r])
    else:
        from lethe.memit import MEMITEditor

        MEMITEditor(hp).edit(loaded, reqs)
    yield loaded, reqs, time.perf_counter() - t0, {}


def pooled(rows: list[dict]) -> dict:
    """One survival row from several groups' rows: scores weighted by each group's edits, ``old_fact_returns`` by
    the edits that held before the attack."""
    if len(rows) == 1:
        return rows[0]
    out: dict = {"n_edits": sum(r["n_edits"] for r in rows),
                 "edits_holding_before": sum(r["edits_holding_before"] for r in rows), "groups": len(rows)}
    for key, first in rows[0].items():
        if not isinstance(first, dict):
            continue
        row = {}
        for k, v in first.items():
            if k == "old_fact_returns":
                held = [(r[key][k], r["edits_holding_before"]) for r in rows if r[key][k] is not None]
                row[k] = sum(x * w for x, w in held) / max(1, sum(w for _, w in held)) if held else None
            elif isinstance(v, float) and k in ("efficacy", "paraphrase", "neighborhood"):
                row[k] = sum(r[key][k] * r["n_edits"] for r in rows) / out["n_edits"]
            else:
                row[k] = v
        out[key] = row
    return out


FINETUNE_WORDS = 48  # each unrelated text is cut to its first 48 words (~64 SmolLM2 tokens; world sentences are shorter)


def finetune_texts(model_name: str, reqs) -> list[str]:
    """The unrelated text of the fine-tuning attack: the model's corpus without any edited subject, cut to
    ``FINETUNE_WORDS`` words."""
    from lethe.covariance import load_corpus

    _, texts = load_corpus(FINETUNE[model_name]["corpus"])
    subjects = {r.subject for r in reqs}
    return [" ".join(t.split()[:FINETUNE_WORDS]) for t in texts if not any(s in t for s in subjects)][:400]


def attack_edits(job: dict) -> dict:
    """One (model, method) row: the edits applied group by group, each group attacked (``lethe.privacy``)."""
    from lethe import evaluation as ev
    from lethe import privacy

    model_name, method, reqs, probes = job["model"], job["method"], job["reqs"], job["probes"]
    t0 = time.perf_counter()
    print(f"{model_name} {method}: editing {len(reqs)} facts ...", flush=True)
    rows, edit_s, extra, moved = [], 0.0, {}, []
    for loaded, group, secs, extra in edited_groups(method, model_name, reqs, job["margs"], job["mend_run"]):
        edit_s += secs
        in_group = {id(r) for r in group}  # the group is a slice of reqs: its requests are reqs' own objects
        mine = [p for p in probes if id(reqs[p.case]) in in_group]
        moved += ev.portability_scores(loaded.model, loaded.tokenizer, loaded.family, mine) if mine else []
        settings = privacy.AttackSettings(seed=0, bf16=True)
        rows.append(privacy.edit_survival(loaded.model, loaded.tokenizer, loaded.family, group, privacy.EDIT_ATTACKS,
                                          settings, job["texts"], 20, FINETUNE[model_name]["lr"],
                                          progress=lambda msg: print(f"  {model_name} {method}: {msg}", flush=True)))
    row = pooled(rows)
    if probes:
        row["portability"] = sum(moved) / len(moved) if moved else None
    row.update(extra, edit_seconds=round(edit_s, 1), seconds=round(time.perf_counter() - t0, 1))
    b = row["before"]
    print(f"  {model_name} {method} before: {b['efficacy']:.2f} / {b['paraphrase']:.2f} / {b['neighborhood']:.2f}; "
          "old fact returns: " + ", ".join(f"{k} {v['old_fact_returns']:.2f}" for k, v in row.items()
                                           if isinstance(v, dict) and v.get("old_fact_returns") is not None)
          + f" ({row['seconds']} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lethe:world-decoder,lethe:smollm2")
    ap.add_argument("--methods", default="rome,memit,mend")
    ap.add_argument("--n", type=int, default=None, help="edits per model (default: 50 world, 20 SmolLM2)")
    ap.add_argument("--mend-run", action="append", metavar="MODEL=RUN",
                    help="a finished `lethe fit` run of MODEL's MEND preset (e.g. lethe:smollm2=runs/mend_smollm2) "
                         "to take the editor from; it is cached for the next run. Default: the cached editor, else "
                         "a fresh fit of the preset (SmolLM2: ~45 min)")
    ap.add_argument("--workers", type=int, default=2, help="(model, method) pairs run in parallel, one process each")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all (split among the workers)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edit_robustness.json"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")

    import torch

    from lethe.io import write_json
    from lethe.models import load_model

    torch.set_num_threads(max(1, min(torch.get_num_threads(), args.threads)))
    t_all = time.perf_counter()
    result: dict = {"benchmark": "edit_robustness", "attacks": {
        "quantize": "symmetric round-to-nearest, group 128, every linear layer but the head",
        "finetune": {m: {**v, "steps": 20, "batch_size": 8, "words_per_text": FINETUNE_WORDS}
                     for m, v in FINETUNE.items()}, "precision": "fine-tuning steps under bf16 autocast (float32 "
                                                               "weights); CounterFact scores in float32"},
        "models": {}}
    mend_runs = dict(kv.split("=", 1) for kv in args.mend_run or [])
    methods = [m for m in args.methods.split(",") if m]
    jobs = []
    for model_name in [m for m in args.models.split(",") if m]:
        n = args.n or (50 if "world" in model_name else 20)
        margs = mend_args(model_name, n)
        base = load_model(model_name)
        source, reqs = pick_requests(base, model_name, margs, n)
        per_model: dict = {"requests": source, "n_edits": len(reqs)}
        probes: list = []
        if model_name in HELDOUT:
            probes, per_model["portability_probes"] = known_probes(base, reqs)
        else:
            per_model["portability_probes"] = ("none: the world's objects are never subjects of other facts "
                                               "(no two-hop chain exists in it)")
        del base
        result["models"][model_name] = per_model
        texts = finetune_texts(model_name, reqs)
        jobs += [{"model": model_name, "method": method, "reqs": reqs, "texts": texts, "probes": probes,
                  "margs": margs, "mend_run": mend_runs.get(model_name)} for method in methods]
    # the slowest first (SmolLM2's), so the workers finish together
    jobs.sort(key=lambda j: "world" in j["model"])
    from hardware import parallel_map

    workers = max(1, min(args.workers, len(jobs)))
    rows = parallel_map(attack_edits, jobs, workers, args.threads, desc="edit robustness (model, method) jobs")
    for job, row in sorted(zip(jobs, rows), key=lambda jr: methods.index(jr[0]["method"])):
        result["models"][job["model"]][job["method"]] = row
    result["workers"] = workers
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
