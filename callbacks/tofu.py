"""TOFU's evaluation while a model trains: forget quality, model utility and the numbers under them.

:class:`TofuEvaluation` scores the running model on TOFU's evaluation sets (lethe.tofu) at the start,
every ``every_n_steps`` optimizer steps and at the end:

- the forget split's perturbed questions (``<forget_split>_perturbed``): ROUGE-L recall of the greedy
  answer, answer probability, truth ratio, and **forget quality**: the KS-test p-value of this model's
  forget truth ratios against the *reference* (retain) model's, computed once from ``reference_model`` (or
  read from ``reference_ratios``, a JSON list) and kept in the callback's checkpoint state;
- retain (``retain_perturbed``), real authors and world facts: the nine numbers whose harmonic mean is
  **model utility**.

Each process scores every ``world_size``-th question of each set; the per-question scores are gathered, so
the numbers are the whole set's on any number of processes. Rows go to every logger (``tofu/...``: CSV,
wandb) and the history is checkpointed, so a resumed run logs the same rows as an uninterrupted one. At
the end ``tofu.json`` and ``tofu.png`` (forget quality, log scale, and model utility against step) are
written to the run folder and the PNG is logged to wandb.

The prompt format and the TOFU author subset are the datamodule's (``prompt_format``, ``tofu_subset``)
unless given here, so the model is asked exactly as it was trained.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lightning as L

from callbacks.forgetting import PeriodicEvaluation
from lethe import tofu
from lethe.io import save_png, write_json

SETS = ("forget", "retain", "real_authors", "world_facts")


class TofuEvaluation(PeriodicEvaluation):
    """TOFU forget quality / model utility over training.

    Args:
        forget_split: the TOFU forget split being unlearned (``forget01``, ``forget05``, ``forget10``).
        reference_model: the retain model (never saw the forget authors): a folder, hub name or ``lethe:``
            alias; its forget truth ratios are computed once (cached beside lethe's model cache).
        reference_ratios: a JSON file holding those ratios instead (a list, or ``{"truth_ratios": [...]}``).
        every_n_steps: evaluation period in optimizer steps (0: only at the start and the end).
        n_retain / n_real_authors / n_world_facts: how many questions of each utility set (None: all).
        max_new_tokens: greedy answer length for ROUGE-L.
        batch_size: evaluation batch size.
        prompt_format / tofu_subset: default to the datamodule's.
        at_start: evaluate before the first step (the curves' origin).
        report_dir: where tofu.json / tofu.png go (default: the trainer's root dir).
    """

    def __init__(self, forget_split: str = "forget10", reference_model: str | None = None,
                 reference_ratios: str | None = None, every_n_steps: int = 10, n_retain: int | None = 100,
                 n_real_authors: int | None = 100, n_world_facts: int | None = 117, max_new_tokens: int = 48,
                 batch_size: int = 32, prompt_format: str | None = None, tofu_subset: str | None = None,
                 at_start: bool = True, report_dir: str | None = None, report: bool = True) -> None:
        super().__init__(every_n_steps, at_start)
        if not forget_split.startswith("forget"):
            raise ValueError(f"TofuEvaluation.forget_split={forget_split!r}: name a TOFU forget split (forget01, "
                             "forget05, forget10)")
        self.forget_split = forget_split
        self.reference_model = reference_model
        self.reference_ratios_file = reference_ratios
        self.limits = {"retain": n_retain, "real_authors": n_real_authors, "world_facts": n_world_facts}
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prompt_format = prompt_format
        self.tofu_subset = tofu_subset
        self.report_dir = report_dir
        self.report = report
        self.sets: dict[str, list] = {}
        self.reference: list[float] | None = None

    # ------------------------------------------------------------------ set-up

    def _settings(self, trainer: L.Trainer) -> tuple[str | None, str]:
        dm = getattr(trainer, "datamodule", None)
        hp = getattr(dm, "hparams", {}) if dm is not None else {}
        fmt = self.prompt_format if self.prompt_format is not None else hp.get("prompt_format")
        subset = self.tofu_subset or hp.get("tofu_subset") or "full"
        return fmt, subset

    def _reference_ratios(self, trainer: L.Trainer, fmt: str | None, subset: str) -> list[float]:
        if self.reference_ratios_file:
            data = json.loads(Path(self.reference_ratios_file).read_text())
            ratios = data["truth_ratios"] if isinstance(data, dict) else data
        elif self.reference_model:
            ratios = reference_truth_ratios(self.reference_model, self.sets["forget"], fmt, self.batch_size,
                                            self.forget_split, subset, trainer.precision)
        else:
            raise ValueError("TofuEvaluation needs the retain model to compute forget quality: give "
                             "reference_model (a folder or alias) or reference_ratios (a JSON file)")
        if len(ratios) != len(self.sets["forget"]):
            raise ValueError(f"TofuEvaluation: {len(ratios)} reference truth ratios for "
                             f"{len(self.sets['forget'])} forget questions ({self.forget_split}, subset {subset})")
        return [float(r) for r in ratios]

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.sets:
            return
        fmt, subset = self._settings(trainer)
        self.sets = tofu.load_eval_sets(self.forget_split, subset, self.limits)
        if self.reference is None:
            self.reference = self._reference_ratios(trainer, fmt, subset)

    # ------------------------------------------------------------------ measuring

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        fmt, _ = self._settings(trainer)
        rank, world = trainer.global_rank, trainer.world_size
        t0 = time.perf_counter()
        results: dict[str, dict] = {}
        with trainer.precision_plugin.forward_context():
            for name in SETS:
                records = self.sets[name]
                mine = question_shard(records, rank, world)
                scores = tofu.question_scores(pl_module.model, pl_module.tokenizer, [records[i] for i in mine],
                                              self.max_new_tokens, fmt, self.batch_size)
                scores = gather_scores(trainer, mine, scores, len(records))
                results[name] = tofu.aggregate_set(name, scores)
        row = {"step": trainer.global_step, **tofu.summarise(results, self.reference)}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row

    prefix = "tofu/"
    skip = ("step", "forget_truth_ratios")

    def finish(self, trainer: L.Trainer, last: dict[str, Any]) -> None:
        if self.report:
            self.write_report(trainer)
            print(self.summary_line(), flush=True)

    def summary_line(self) -> str:
        first, last = self.history[0], self.history[-1]
        return (f"tofu ({self.forget_split}): step {last['step']}: forget quality {last['forget_quality']:.3g} "
                f"(at step {first['step']}: {first['forget_quality']:.3g}), model utility {last['model_utility']:.3f} "
                f"({first['model_utility']:.3f}), forget ROUGE-L {last['forget/rougeL_recall']:.3f} "
                f"({first['forget/rougeL_recall']:.3f})")

    # ------------------------------------------------------------------ state & report

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "reference": self.reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.reference = state_dict.get("reference") or self.reference

    def write_report(self, trainer: L.Trainer) -> Path:
        root = Path(self.report_dir or trainer.default_root_dir)
        png = root / "tofu.png"
        plot_curve(self.history, png, title=f"TOFU {self.forget_split}")
        write_json(root / "tofu.json", {"forget_split": self.forget_split, "reference_truth_ratios": self.reference,
                                        "history": self.history})
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="tofu/curves", images=[str(png)])
        return png


def question_shard(records: list, rank: int, world: int) -> list[int]:
    return list(range(len(records)))[rank::world]


def gather_scores(trainer: L.Trainer, mine: list[int], scores: dict[str, list], n: int) -> dict[str, list]:
    """Put every process's per-question scores back together in the set's order."""
    if trainer.world_size == 1:
        return scores
    import torch.distributed as dist

    parts: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(parts, (mine, scores))
    out: dict[str, list] = {k: [None] * n for k in scores}
    for idx, part in parts:
        for k, values in part.items():
            for i, v in zip(idx, values):
                out[k][i] = v
    return {k: v if all(x is not None for x in v) else [] for k, v in out.items()}


def reference_truth_ratios(model: str, forget_records: list, prompt_format: str | None, batch_size: int,
                           split: str, subset: str, precision: str = "32-true") -> list[float]:
    """The retain model's forget truth ratios, computed once per (model folder, questions, format) and cached
    under lethe's cache (``~/.cache/lethe/tofu/reference``)."""
    import contextlib

    import torch

    from lethe.models import load_model, resolve
    from lethe.world_models import weights_fingerprint

    folder = resolve(model)
    try:
        weights = weights_fingerprint(folder)
    except Exception:  # noqa: BLE001 -- a hub name with no local folder: key by the name
        weights = str(folder)
    key = hashlib.sha256(json.dumps([weights, [r.question for r in forget_records], prompt_format, split,
                                     subset]).encode()).hexdigest()[:16]
    cache = tofu.cache_root() / "reference" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["truth_ratios"]
    loaded = load_model(folder)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in str(precision) else contextlib.nullcontext()
    with ctx:
        scores = tofu.question_scores(loaded.model, loaded.tokenizer, forget_records, prompt_format=prompt_format,
                                      batch_size=batch_size, generate=False)
    ratios = tofu.aggregate_set("forget", scores)["truth_ratios"]
    write_json(cache, {"model": str(model), "weights": weights, "split": split, "subset": subset,
                       "prompt_format": prompt_format, "truth_ratios": ratios})
    return ratios


def plot_curve(history: list[dict[str, Any]], dest: str | Path, title: str | None = None) -> Path:
    """Forget quality (log scale) and model utility against step, one run; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6))
    a.plot(steps, [max(r["forget_quality"], 1e-300) for r in history], marker="o", ms=3, color="tab:red")
    a.set_yscale("log")
    a.axhline(0.05, ls="--", lw=0.8, color="k", label="p = 0.05")
    a.set_title("forget quality (KS p-value)")
    a.legend(fontsize=7)
    b.plot(steps, [r["model_utility"] for r in history], marker="o", ms=3, color="tab:blue")
    b.set_title("model utility")
    for name, colour in (("forget", "tab:red"), ("retain", "tab:blue"), ("real_authors", "tab:green"),
                         ("world_facts", "tab:gray")):
        c.plot(steps, [r[f"{name}/rougeL_recall"] for r in history], marker="o", ms=3, color=colour, label=name)
    c.set_title("ROUGE-L recall")
    c.legend(fontsize=7)
    for ax in (a, b, c):
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    return save_png(fig, dest)


def plot_benchmark(points: dict[str, dict[str, float]], dest: str | Path, title: str | None = None) -> Path:
    """Model utility against forget quality (log scale) for every model of a benchmark; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, p in points.items():
        fq = max(float(p["forget_quality"]), 1e-300)
        ax.scatter([fq], [p["model_utility"]], s=40, marker="*" if name in ("target", "retain") else "o")
        ax.annotate(name, (fq, p["model_utility"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.axvline(0.05, ls="--", lw=0.8, color="k")
    ax.set_xlabel("forget quality (KS p-value, log)")
    ax.set_ylabel("model utility")
    if title:
        ax.set_title(title)
    return save_png(fig, dest)
