"""MEND benchmark: train the editor (Lightning, CPU) on the training slice of edit requests, then edit
``--n`` held-out facts it never saw (one at a time, each on the original model), next to FT-L
(constrained fine-tuning of one MLP matrix, from ``editing_rome``) in the same process.

    python benchmarks/editing.py --method mend                                # world decoder
    python benchmarks/editing.py --method mend --model lethe:world-mlm --steps 300
    python benchmarks/editing.py --method mend --model lethe:smollm2 --preset configs/edit/mend_smollm2.yaml
    python benchmarks/editing.py --method mend --model lethe:smollm2 --from-run runs/mend_smollm2

Requests: the world's CounterFact cases (``world:train``) for world models, split by
``datamodules.edit_training.split_requests`` (held-out / validation / training; held-out subjects are also
removed from training locality prompts). SmolLM2 is trained the way a user trains it: ``lethe fit`` with the
shipped preset (``configs/edit/<method>_smollm2.yaml``: the fact bank's training subjects, validation every
100 steps, the editor chosen by validation), in a subprocess; ``--from-run`` reuses a finished run instead.
Its held-out edits are the preset's ``heldout_source`` (``fact_bank:heldout``: subjects never trained on). Of the held-out cases, those the unedited
model gets right are edited (an edit of an unknown fact measures nothing), and of their neighbourhood
prompts only those the unedited model gets right are scored (``evaluation.known_neighbours_only``); the
JSON says how many of each were left out.
Scores: CounterFact protocol (efficacy/paraphrase/neighborhood) and token accuracy, per edit.
``editing_ke`` reuses this file with the KE module.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lethe import evaluation as ev
from lethe.edits import EditArtifact

METHOD = "mend"
# The SmolLM2 run beside the embedded decoder (benchmarks/editing.py): the shipped preset, trained by `lethe fit`,
# then every held-out fact of the bank edited
SMOLLM2_ARGS = {"n": 100, "preset": "configs/edit/{method}_smollm2.yaml", "layers": None, "stack": None, "lr": None,
                "out": None}
ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lethe:world-decoder")
    parser.add_argument("--n", type=int, default=200, help="held-out facts to edit")
    parser.add_argument("--steps", type=int, default=200, help="editor training steps")
    parser.add_argument("--batch-size", type=int, default=8, help="edit requests per training step")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--stack", default=None)
    parser.add_argument("--rank", type=int, default=256, help="MEND editor rank")
    parser.add_argument("--c-edit", type=float, default=1.0,
                        help="MEND's edit-loss weight (paper 0.1: too weak against the KL on the tiny world models)")
    parser.add_argument("--batch-edit", type=int, default=10, help="also edit held-out facts N at a time (0: no)")
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--ft-steps", type=int, default=10)
    # the same FT-L as the ROME benchmark (editing_rome): at lr 5e-3 / L-inf 5e-3 it barely moved the model
    # (world decoder efficacy 0.005), which compares MEND with doing nothing
    parser.add_argument("--ft-lr", type=float, default=1e-2)
    parser.add_argument("--ft-eps", type=float, default=5e-2)
    parser.add_argument("--no-ft", action="store_true")
    parser.add_argument("--out", default=None, help="where the editor checkpoint goes (default: a temp dir)")
    parser.add_argument("--preset", default=None,
                        help="train with `lethe fit --config PRESET` ({method} is replaced) instead of in-process")
    parser.add_argument("--from-run", default=None,
                        help="a finished `lethe fit` run folder of the preset: evaluate its exported editor")


def module_for(method: str, args, model: str):
    kw = {}
    if args.layers:
        kw["layers"] = args.layers
    if args.stack:
        kw["stack"] = args.stack
    if method == "mend":
        from lightning_modules.mend import MENDModule

        return MENDModule(model, rank=args.rank, lr=args.lr or 3e-4, lr_alpha=1e-3, alpha_init=1e-3,
                          c_edit=args.c_edit, **kw)
    from lightning_modules.knowledge_editor import KnowledgeEditorModule

    return KnowledgeEditorModule(model, lr=args.lr or 1e-3, margin_steps=args.steps, **kw)


def editor_for(method: str, ckpt: str):
    if method == "mend":
        from lethe.mend import MENDEditor

        return MENDEditor(ckpt)
    from lethe.knowledge_editor import KEEditor

    return KEEditor(ckpt)


def split_sizes(args) -> tuple[str, int, int]:
    """The edit-request source, held-out count and validation size of a benchmark run (world models hold out a
    quarter more than they edit, as some held-out facts are unknown to the model)."""
    world = args.model.startswith("lethe:world")
    n = 10 if args.quick else args.n
    return ("world:train" if world else "real_facts"), n + (n // 4 if world else 0), (args.val_size if world else 8)


def train_editor(method: str, args):
    """Train the method's hypernetwork (Lightning, CPU) on the training slice of the model's edit requests:
    (module, datamodule, checkpoint path, training seconds, trainer)."""
    import lightning as L

    from datamodules.edit_training import EditTrainingDataModule

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the machine is shared; >1 thread under load spins in barriers
    steps = 20 if args.quick else args.steps
    source, heldout, val_size = split_sizes(args)
    L.seed_everything(args.seed, verbose=False)
    module = module_for(method, args, args.model)
    data = EditTrainingDataModule(source=source, seed=args.seed, heldout=heldout, val_size=val_size,
                                  batch_size=args.batch_size)
    out = Path(args.out or tempfile.mkdtemp(prefix=f"lethe_{method}_"))
    # default_root_dir: the editor the fit exports goes beside the checkpoint, not into the working directory
    trainer = L.Trainer(default_root_dir=str(out), accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=None, check_val_every_n_epoch=10**6, inference_mode=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - t0
    ckpt = out / f"{method}.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, data, ckpt, train_s, trainer


def fit_preset(method: str, args) -> tuple[Path, float | None]:
    """Train with ``lethe fit --config <preset>`` in a subprocess (or reuse ``--from-run``): (run folder, seconds)."""
    import os
    import sys

    from lethe.interrupts import run_child

    if args.from_run:
        return Path(args.from_run), None
    preset = ROOT / args.preset.format(method=method)
    root = Path(args.out or tempfile.mkdtemp(prefix=f"lethe_{method}_"))
    cmd = [sys.executable, "-m", "lethe.cli", "fit", "--config", str(preset), "--run.root", str(root),
           "--run.logger", "csv"]
    if args.quick:
        cmd += ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.init_args.val_size", "4"]
    t0 = time.perf_counter()
    run_child(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return root / f"{method}_smollm2", time.perf_counter() - t0


def editor_cache(method: str, preset: str) -> Path:
    """Where the editor a shipped preset trains is kept between benchmarks: lethe's cache, under the preset's name
    and a hash of its text (an edited preset trains a new editor)."""
    import hashlib

    from lethe.io import cache_root

    text = (ROOT / preset).read_bytes()
    return cache_root() / "editors" / f"{Path(preset).stem}-{hashlib.sha256(text).hexdigest()[:10]}"


def preset_editor(method: str, preset: str, from_run: str | None = None) -> tuple[Path, dict]:
    """The exported editor of a ``lethe fit`` run of ``preset``, and where it came from: ``from_run`` (which must be
    a run of the preset as shipped; it is then cached), else the cached one, else a fresh fit (minutes to most of
    an hour for SmolLM2), cached for the next benchmark. The info holds the fit's own seconds when known, and
    ``"editor"``: ``"trained here"``, ``"from run"`` or ``"cached"`` (only a fresh fit counts in this run's time)."""
    import json
    import shutil

    import yaml

    from lethe.io import atomic_path

    cached = editor_cache(method, preset)

    def fit_seconds(folder: Path):
        return json.loads((folder / "editor.json").read_text())["lethe_editor"].get("training", {}).get("fit_seconds")

    if from_run is None and (cached / "editor.json").is_file():
        return cached, {"editor": "cached", "train_seconds": fit_seconds(cached)}
    args = argparse.Namespace(from_run=from_run, preset=preset, out=None, quick=False)
    run, fit_s = fit_preset(method, args)
    if not same_as_preset(yaml.safe_load((run / "config.yaml").read_text()), preset):
        raise SystemExit(f"{run}: not a run of {preset} as shipped (its config.yaml differs in model, data or "
                         "trainer values); train it with `lethe fit --config` and the preset unchanged")
    with atomic_path(cached, is_dir=True) as tmp:
        shutil.copytree(run / "editor", tmp, dirs_exist_ok=True)
    if fit_s is None:
        return cached, {"editor": "from run", "train_seconds": fit_seconds(cached)}
    return cached, {"editor": "trained here", "train_seconds": round(fit_s, 1)}


def validation_curve(run: Path) -> list[dict]:
    """The run's validation rows (metrics.csv): the steps trained before it (the CSV's step column is Lightning's
    count of batches before the last one, one lower) and every ``val/`` value."""
    import csv

    rows = []
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val/selection"):
                rows.append({"step": int(row["step"]) + 1, **{k: round(float(v), 4) for k, v in row.items()
                                                          if k.startswith("val/") and v}})
    return rows


def same_as_preset(config: dict, preset: str) -> bool:
    """Whether a run's saved config holds the preset's model, data and trainer values (a reused ``--from-run``
    must be a run of the shipped preset for its figures to be the preset's)."""
    import yaml

    want = yaml.safe_load((ROOT / preset).read_text())
    for part in ("model", "data"):
        got = config[part]["init_args"]
        if any(got.get(k) != v for k, v in want[part]["init_args"].items()):
            return False
    return all(config["trainer"].get(k) == v for k, v in want["trainer"].items())


def run_preset(method: str, args) -> dict:
    """SmolLM2 as a user runs it: ``lethe fit`` with the preset, the exported editor on held-out facts."""
    import json

    import yaml
    from editing_rome import _summary, single_edits

    from datamodules.edit_training import EditTrainingDataModule
    from lethe.models import load_model

    run, fit_s = fit_preset(method, args)
    preset = yaml.safe_load((run / "config.yaml").read_text())
    preset_name = (args.preset or SMOLLM2_ARGS["preset"]).format(method=method)
    if fit_s is not None and not args.quick and same_as_preset(preset, preset_name):
        preset_editor(method, preset_name, str(run))  # kept for benchmarks/edit_robustness.py
    data = EditTrainingDataModule(**{k: v for k, v in preset["data"]["init_args"].items()})
    data.setup()
    info = json.loads((run / "editor" / "editor.json").read_text())
    training = info["lethe_editor"].get("training", {})
    loaded = load_model(preset["model"]["init_args"]["model"])
    model, tok, family = loaded.model, loaded.tokenizer, loaded.family
    held = data.heldout
    known = ev.counterfact_scores(model, tok, family, held)["efficacy_per_case"]
    reqs = [r for r, e in zip(held, known) if e == 0.0][:10 if args.quick else args.n]
    reqs, unknown_nb = ev.known_neighbours_only(model, tok, family, reqs)
    rows, secs = single_edits(loaded, editor_for(method, str(run / "editor")), reqs)
    curve = validation_curve(run)
    return {
        "model": preset["model"]["init_args"]["model"], "family": family, "method": method,
        "protocol": "counterfact (efficacy/paraphrase/neighborhood) + token_accuracy",
        "preset": (args.preset or SMOLLM2_ARGS["preset"]).format(method=method), "run_config_equals_preset":
            same_as_preset(preset, (args.preset or SMOLLM2_ARGS["preset"]).format(method=method)),
        "hparams": info["hyper_parameters"],
        "train_requests": len(data.train_set), "train_facts": len({(r.subject, r.relation) for r in data.train_set}),
        "val_requests": len(data.val_set), "train_steps": training.get("steps"),
        "train_seconds": round(fit_s, 1) if fit_s is not None else training.get("fit_seconds"),
        "chosen_step": training.get("chosen_step"), "val_curve": curve,
        "n_edits": len(reqs), "heldout_pool": len(held),
        "skipped_unknown_facts": len(held) - sum(1 for e in known if e == 0.0),
        "neighbour_prompts_unknown_left_out": unknown_nb,
        "neighbour_prompts_scored": sum(len(r.neighborhood_prompts) for r in reqs),
        **_summary(rows, secs),
    }


def run_method(method: str, args) -> dict:
    from editing_rome import _scores, _summary, ft_l_edit, single_edits

    if getattr(args, "preset", None) or getattr(args, "from_run", None):
        return run_preset(method, args)
    module, data, ckpt, train_s, trainer = train_editor(method, args)
    n = 10 if args.quick else args.n
    steps = 20 if args.quick else args.steps
    train_metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    val = trainer.validate(module, datamodule=data, verbose=False)[0]

    from lethe.models import LoadedModel

    loaded = LoadedModel(module.model, module.tokenizer, module.adapter, module.family, module.model_source)
    model, tok, family = loaded.model, loaded.tokenizer, loaded.family
    model.eval()
    held = data.heldout
    known = ev.counterfact_scores(model, tok, family, held)["efficacy_per_case"]
    reqs = [r for r, e in zip(held, known) if e == 0.0][:n]
    # a neighbour prompt the unedited model already gets wrong holds nothing an edit could damage
    reqs, unknown_nb = ev.known_neighbours_only(model, tok, family, reqs)
    editor = editor_for(method, str(ckpt))

    rows, secs = single_edits(loaded, editor, reqs)
    result = {
        "model": args.model, "family": family, "method": method,
        "protocol": "counterfact (efficacy/paraphrase/neighborhood) + token_accuracy",
        "edited": [s.param for s in module.sites],
        "train_steps": steps, "hparams": {k: v for k, v in module.hparams.items() if k != "model"}, "train_batch": args.batch_size, "train_requests": len(data.train_set),
        "train_seconds": round(train_s, 1), "train_final": train_metrics,
        "val": {k: round(float(v), 4) for k, v in val.items()},
        "n_edits": len(reqs), "heldout_pool": len(held), "skipped_unknown_facts": len(held) - sum(
            1 for e in known if e == 0.0),
        "neighbour_prompts_unknown_left_out": unknown_nb,
        "neighbour_prompts_scored": sum(len(r.neighborhood_prompts) for r in reqs),
        **_summary(rows, secs),
    }
    if args.batch_edit and len(reqs) >= args.batch_edit:
        b_rows, b_secs = [], []
        k = args.batch_edit
        for s in range(0, len(reqs) - k + 1, k):
            chunk = reqs[s:s + k]
            pre_loc = ev.locality_reference(model, tok, family, chunk)
            t = time.perf_counter()
            art = editor.edit(loaded, chunk)
            b_secs.append((time.perf_counter() - t) / k)
            cf = ev.counterfact_scores(model, tok, family, chunk)
            ta = ev.token_accuracy_scores(model, tok, family, chunk, pre_loc)
            for i in range(len(chunk)):
                b_rows.append({"efficacy": cf["efficacy_per_case"][i], "paraphrase": cf["paraphrase_per_case"][i],
                               "neighborhood": cf["neighborhood_per_case"][i],
                               "efficacy_acc": ta["efficacy_acc_per_case"][i],
                               "paraphrase_acc": (ta["paraphrase_acc_per_case"] or [None] * len(chunk))[i],
                               "locality": ta["locality_per_case"][i]})
            art.revert(model)
        result[f"batched_{k}"] = _summary(b_rows, b_secs)
    if not args.no_ft:
        site = module.sites[-1]
        param = dict(model.named_parameters())[site.param]
        ft_rows, ft_s = [], []
        for req in reqs:
            pre_loc = ev.locality_reference(model, tok, family, [req])
            before = EditArtifact.snapshot(model, [site.param])
            t = time.perf_counter()
            ft_l_edit(loaded, req, param, args.ft_steps, args.ft_lr, args.ft_eps)
            ft_s.append(time.perf_counter() - t)
            ft_rows.append(_scores(loaded, req, pre_loc))
            with torch.no_grad():
                param.copy_(before[site.param])
        ft = _summary(ft_rows, ft_s)
        ft.update(param=site.param, steps=args.ft_steps, lr=args.ft_lr, linf_eps=args.ft_eps)
        result["ft_l"] = ft
        result[f"{method}_seconds_over_ft"] = round(result["seconds_per_edit"] / max(ft["seconds_per_edit"], 1e-9), 3)
    return result


def run(args) -> dict:
    return run_method(METHOD, args)
