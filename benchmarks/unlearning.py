"""Knowledge Unlearning benchmark: GA, GradDiff and NPO on the embedded world decoder, plus SmolLM2.

World decoder: the forget set is the training sentences of 32 facts the model learned
(``datamodules.forget_retain.builtin_sets("world")``), retain = sentences of 256 other
training facts, unseen = sentences of 64 held-out facts. Each method runs under
Lightning with the ForgettingTracker's stopping rule (forget MA and EL_10 at or below the
unseen set's, measured at step 0). Reported per method: forget MA / EL_10 before and
after, the unseen thresholds, retain MA before/after, the step it stopped at, and
training throughput (tokens/s) of Lightning vs a plain PyTorch loop running the same
steps on the same batches in this process (their ratio; best of ``--repeats``). GradDiff and
NPO pair each forget sentence with 4 retain sentences (``retain_per_forget``). Where the
retain MA goes: ``retain_object_accuracy`` (object tokens of the retain facts, split by whether a
forget fact has the same relation and object). Whether the kept knowledge reaches beyond the
retain set: ``untouched_train_ma`` (MA on 256 further training facts, in neither set).

SmolLM2: passages it memorised in pre-training (``lethe/data/memorised_passages.json``,
the ``selected`` ones) unlearned with NPO through a LoRA adapter; forget MA / EL_10 before
and after against unseen text; real-fact accuracy (CounterFact protocol: share of
``lethe/data/real_facts.json`` facts with P(true) > P(counterfactual) on the rewrite
prompt) before and after.

    python benchmarks/unlearning.py [--methods ga,graddiff,npo] [--no-smollm2]

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L
import torch

from callbacks.forgetting import ForgettingTracker
from datamodules.forget_retain import ForgetRetainDataModule
from lethe.sources import builtin_sets, fact_sentences, world_split
from lightning_modules.unlearning import UnlearningModule

# Per-method settings on the world decoder are the presets' (configs/unlearn/world_decoder_<method>.yaml),
# read from those files, never copied here. They were chosen so that the stopping rule is reached in tens of
# steps on 2 CPU cores; GradDiff and NPO see 4 retain sentences per forget sentence (a retain batch of 128
# next to 32 forget sentences). Retain MA drop in points when the rule stopped the run (step), with ONE
# retain sentence per forget sentence: GradDiff lr 3e-4 rw 4: 10.8 (72); rw 10: 14.5 (102); lr 1e-3 rw 4:
# 12.1 (30). NPO lr 3e-4 retain NLL rw 4: 11.3 (74); rw 10: 6.4 (84); rw 20: 6.7 (126); retain KL rw 4:
# 10.3 (74); lr 1e-4 rw 10: 5.9 (212). With 4 per forget sentence: GradDiff rw 4: 0.2 (72); NPO rw 10: -0.3
# (82); with 8 per forget sentence, GradDiff rw 1: 8.0 (52). The lost retain MA was on object tokens shared
# with forget facts (retain_object_accuracy); a larger retain batch holds them.
DATA_KEYS = ("retain_per_forget",)  # what the benchmark takes from a preset's data section


def world_method(name: str) -> tuple[dict, dict]:
    """(UnlearningModule arguments, datamodule arguments) of ``configs/unlearn/world_decoder_<name>.yaml``."""
    from lethe.presets import read_preset

    cfg = read_preset(f"unlearn/world_decoder_{name}.yaml")
    settings = {k: v for k, v in cfg["model"]["init_args"].items() if k not in ("model", "save_dir")}
    data = {k: v for k, v in (cfg["data"].get("init_args") or {}).items() if k in DATA_KEYS}
    return settings, data


def _tokens(batch: dict) -> int:
    return int(sum(b["attention_mask"].sum() for b in batch.values()))


class _TrainClock(L.Callback):
    """Wall time and tokens of the training loop only (from on_train_start to on_train_end)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += _tokens(batch)

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._t0


def _datamodule(module, texts: dict, batch_size: int, seed: int, data: dict | None = None) -> ForgetRetainDataModule:
    return ForgetRetainDataModule(forget_texts=texts["forget"], retain_texts=texts["retain"] or None,
                                  unseen_texts=texts["unseen"], batch_size=batch_size, eval_batch_size=128, seed=seed,
                                  **(data or {}))


def _trainer(max_steps: int, callbacks: list, root: Path) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     default_root_dir=str(root), num_sanity_val_steps=0)


def plain_loop(module: UnlearningModule, dm: ForgetRetainDataModule, steps: int) -> tuple[int, float]:
    """The same optimisation with nothing but PyTorch: same batches, same loss function, same AdamW."""
    dm.tokenizer, dm.family = module.tokenizer, module.family
    dm.setup("fit")
    loader = dm.train_dataloader()
    opt = module.configure_optimizers()
    module.model.train()
    done, tokens, epoch = 0, 0, 0
    t0 = time.perf_counter()
    while done < steps:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss, _ = module.compute_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tokens += _tokens(batch)
            done += 1
            if done == steps:
                break
        epoch += 1
    return tokens, time.perf_counter() - t0


def throughput(model_src: str, settings: dict, texts: dict, steps: int, repeats: int, batch_size: int,
               root: Path, data: dict | None = None) -> dict:
    """tokens/s of Lightning and of the plain loop (best of ``repeats`` each, interleaved)."""
    best_l, best_p = 0.0, 0.0
    for _ in range(repeats):
        torch.manual_seed(0)
        m = UnlearningModule(model_src, **settings)
        tok, sec = plain_loop(m, _datamodule(m, texts, batch_size, 0, data), steps)
        best_p = max(best_p, tok / sec)
        torch.manual_seed(0)
        m = UnlearningModule(model_src, **settings)
        clock = _TrainClock()
        _trainer(steps, [clock], root).fit(m, _datamodule(m, texts, batch_size, 0, data))
        best_l = max(best_l, clock.tokens / clock.seconds)
    return {"lightning_tokens_per_s": round(best_l, 1), "plain_tokens_per_s": round(best_p, 1),
            "ratio": round(best_l / best_p, 3), "steps": steps}


def unlearn(model_src: str, settings: dict, texts: dict, max_steps: int, every: int, batch_size: int,
            root: Path, max_prefixes: int | None = None, data: dict | None = None, check_every: int = 1,
            ) -> tuple[UnlearningModule, ForgettingTracker]:
    """Full measurements every ``every`` steps; the stopping rule checked every ``check_every`` steps."""
    L.seed_everything(0, verbose=False)
    module = UnlearningModule(model_src, **settings)
    tracker = ForgettingTracker(every_n_steps=every, n=10, stop=True, report_dir=str(root),
                                max_prefixes=max_prefixes, check_every_n_steps=check_every)
    _trainer(max_steps, [tracker], root).fit(module, _datamodule(module, texts, batch_size, 0, data))
    return module, tracker


@torch.no_grad()
def retain_object_accuracy(model, tokenizer, split: dict) -> dict:
    """Where retain MA is lost: top-1 accuracy on the retain facts' OBJECT tokens (teacher-forced after
    each training prompt), for retain facts whose (relation, object) is also a forget fact's and for the
    rest. The world has few objects per relation, so unlearning "Ruvix is based in Corvia" can take
    Corvia away from every subject based there."""
    from lethe import evaluation as ev

    was_training = model.training
    model.eval()
    forget_objects = {(f.relation, f.object) for f in split["forget"]}
    world = split["world"]
    rows = {"shared_object": [], "other_object": []}
    for f in split["retain"]:
        key = "shared_object" if (f.relation, f.object) in forget_objects else "other_object"
        rows[key] += [(p, f.object) for p in world.training_prompts(f)]
    out = {}
    for key, pairs in rows.items():
        acc = ev.token_accuracy(ev.teacher_forced_predictions(model, tokenizer, "decoder", pairs))
        out[key] = {"accuracy": _r(acc), "n_prompts": len(pairs)}
    model.train(was_training)
    return out


@torch.no_grad()
def untouched_train_ma(model, tokenizer, texts: list[str]) -> float:
    """MA on training facts that are in neither the forget nor the retain set: knowledge the retain loss never
    saw, i.e. whether what is kept generalises beyond the anchored examples."""
    from lethe import lm
    from lethe.metrics import memorisation_scores

    batches = [lm.encode_texts(tokenizer, "decoder", texts[s:s + 128]) for s in range(0, len(texts), 128)]
    return _r(memorisation_scores(model, batches, "decoder", None, tokenizer.pad_token_id)["ma"])


def _r(x):
    return None if x is None else round(float(x), 4)


def summarise(tracker: ForgettingTracker) -> dict:
    first, last = tracker.history[0], tracker.history[-1]
    out = {
        "forget_ma_before": _r(first["forget/ma"]), "forget_ma_after": _r(last["forget/ma"]),
        "forget_el10_before": _r(first.get("forget/el10")), "forget_el10_after": _r(last.get("forget/el10")),
        "unseen_ma_threshold": _r(tracker.thresholds["ma"]),
        "unseen_el10_threshold": _r(tracker.thresholds.get("el")),
        "unseen_ma_after": _r(last.get("unseen/ma")),
        "steps_to_stop": tracker.stopped_at,
        "reached_thresholds": tracker.stopped_at is not None,
    }
    if "retain/ma" in first:
        out["retain_ma_before"] = _r(first["retain/ma"])
        out["retain_ma_after"] = _r(last["retain/ma"])
        out["retain_ma_drop_points"] = _r(100 * (first["retain/ma"] - last["retain/ma"]))
    return out


# ---------------------------------------------------------------------- SmolLM2


def real_fact_accuracy(model, tokenizer) -> dict:
    """CounterFact protocol: share of real facts with P(true) > P(counterfactual) on the rewrite prompt."""
    from lethe import lm
    from lethe.io import REAL_FACTS

    if not REAL_FACTS.is_file():
        return {"accuracy": None, "note": f"{REAL_FACTS.name} not found"}
    from lethe.records import read_records

    reqs = read_records(REAL_FACTS, "counterfact")
    prompts = [r.rewrite_prompt for r in reqs]
    was = model.training
    model.eval()
    p_true = lm.target_probability(model, tokenizer, "decoder", prompts, [r.target_true for r in reqs], 32)
    p_new = lm.target_probability(model, tokenizer, "decoder", prompts, [r.target_new for r in reqs], 32)
    model.train(was)
    return {"accuracy": round(float((p_true > p_new).float().mean()), 4), "n": len(reqs),
            "protocol": "counterfact P(true)>P(new)"}


def smollm2_run(args, root: Path) -> dict:
    from lethe.models import ModelLoadError, load_model

    try:
        source = load_model("lethe:smollm2").source
    except (ModelLoadError, OSError) as err:
        return {"skipped": f"SmolLM2 unavailable: {err}"}
    texts = builtin_sets("memorised_passages")
    settings = {"method": "npo", "lr": args.smollm2_lr, "method_args": {"beta": 0.1},
                "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}}
    probe = UnlearningModule(source, method="ga")
    before = real_fact_accuracy(probe.model, probe.tokenizer)
    del probe
    t0 = time.perf_counter()
    module, tracker = unlearn(source, settings, texts, args.smollm2_steps, args.smollm2_every, len(texts["forget"]),
                              root / "smollm2", max_prefixes=4)
    merged = module.merged_model()
    after = real_fact_accuracy(merged, module.tokenizer)
    s = summarise(tracker)
    s.update({
        "n_forget_passages": len(texts["forget"]), "n_unseen_passages": len(texts["unseen"]),
        "real_fact_accuracy_before": before["accuracy"], "real_fact_accuracy_after": after["accuracy"],
        "real_fact_drop_points": None if before["accuracy"] is None else _r(
            100 * (before["accuracy"] - after["accuracy"])),
        "real_fact_protocol": before.get("protocol") or before.get("note"),
        "unseen_ppl_before": _r(tracker.history[0].get("unseen/ppl")),
        "unseen_ppl_after": _r(tracker.history[-1].get("unseen/ppl")),
        "method": "npo+LoRA(r=8)", "seconds": round(time.perf_counter() - t0, 1),
        "el10_prefixes_per_passage": 4,
    })
    return s


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ga,graddiff,npo")
    p.add_argument("--model", default="lethe:world-decoder")
    p.add_argument("--max-steps", type=int, default=120)
    p.add_argument("--every", type=int, default=2,
                   help="measure all three sets every N steps (the stopping rule is checked every step)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--throughput-steps", type=int, default=150,
                   help="steps per timed run (60-step runs last ~3 s: one hiccup moved the ratio by 0.08)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-smollm2", action="store_true")
    p.add_argument("--no-world", action="store_true", help="only the SmolLM2 run")
    # lr 1e-3 overshot (forget MA 0.23 against the unseen 0.31 at the step-15 check; real facts -6.0 points);
    # 5e-4 stops at step 35 on the threshold with real facts -4.4 points
    p.add_argument("--smollm2-steps", type=int, default=40)
    p.add_argument("--smollm2-every", type=int, default=5,
                   help="SmolLM2: measure all three sets every N steps (the stopping rule is checked every step)")
    p.add_argument("--smollm2-lr", type=float, default=5e-4)
    p.add_argument("--out", default="runs/benchmark_unlearning")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(args.out)
    from lethe.models import load_model

    texts = builtin_sets("world", 32, 256, 64, seed=0)
    split = world_split(32, 256, 64, seed=0)
    # the same shuffle, 256 further training facts: in neither the forget nor the retain set
    untouched = fact_sentences(split["world"], world_split(32, 512, 64, seed=0)["retain"][256:])
    result: dict = {"benchmark": "unlearning", "model": args.model,
                    "forget": "32 world training facts (their training-template sentences)",
                    "n_forget_sentences": len(texts["forget"]), "n_retain_sentences": len(texts["retain"]),
                    "n_unseen_sentences": len(texts["unseen"]), "methods": {}}
    original = None if args.no_world else load_model(args.model)
    model_src = None if original is None else original.source
    if original is not None:
        result["retain_object_accuracy_before"] = retain_object_accuracy(original.model, original.tokenizer, split)
        result["untouched_train_ma_before"] = untouched_train_ma(original.model, original.tokenizer, untouched)
        result["n_untouched_train_sentences"] = len(untouched)
    for name in [] if args.no_world else args.methods.split(","):
        settings, data = world_method(name)
        t0 = time.perf_counter()
        module, tracker = unlearn(model_src, settings, texts, args.max_steps, args.every, args.batch_size,
                                  root / name, data=data)
        row = summarise(tracker)
        row["retain_object_accuracy_after"] = retain_object_accuracy(module.model, module.tokenizer, split)
        row["untouched_train_ma_after"] = untouched_train_ma(module.model, module.tokenizer, untouched)
        row["settings"] = {**settings, "data": data or {}}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["throughput"] = throughput(model_src, settings, texts, args.throughput_steps, args.repeats,
                                       args.batch_size, root / f"{name}_throughput", data=data)
        row["report_png"] = str(root / name / "forgetting.png")
        result["methods"][name] = row
        print(name, json.dumps(row), flush=True)
    if not args.no_smollm2:
        result["smollm2_memorised_passages"] = smollm2_run(args, root)
    from lethe.world_models import world_builds

    if not args.no_world:
        result["world_build"] = world_builds([args.model])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
