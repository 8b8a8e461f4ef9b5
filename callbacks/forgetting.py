"""Watch forgetting while unlearning runs, stop by Jang et al.'s rule, and draw the curves.

:class:`ForgettingTracker` measures MA, EL_n and perplexity on the datamodule's
``forget``, ``retain`` and ``unseen`` sets at the start of the run and every
``every_n_steps`` optimizer steps (each process scores its own shard; the metrics are
torchmetrics states, so the numbers are the whole set's on any number of processes).

Stopping rule (Knowledge Unlearning, Jang et al. 2022): stop once the forget set's MA and
EL_n are both at or below the unseen text's, measured once at the start of the run
(``thresholds`` in the preset overrides the measurement). The history, the thresholds and
the stopping step are part of the callback's checkpoint state, so a resumed run keeps them.

At the end a PNG of the curves (and a JSON of the history) is written to the run folder
and logged to wandb when a WandbLogger is active.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from lethe.io import atomic_path, write_json
from lethe.metrics import ExtractionLikelihood, MemorizationAccuracy, Perplexity, memorisation_scores

SETS = ("forget", "retain", "unseen")


class ForgettingTracker(L.Callback):
    """MA / EL_n / perplexity of forget, retain and unseen text over training, with the stopping rule.

    Args:
        every_n_steps: evaluation period in optimizer steps.
        n: the n of EL_n (10 in the paper).
        stop: apply the stopping rule.
        thresholds: ``{"ma": x, "el": y}`` to use instead of measuring the unseen set at the start.
        max_examples: evaluate at most this many examples of each set (None: all).
        max_prefixes: EL_n from at most this many evenly spaced prefixes per sequence (long passages).
        report_dir: where the PNG/JSON go (default: the trainer's root dir).
    """

    def __init__(self, every_n_steps: int = 10, n: int = 10, stop: bool = True,
                 thresholds: dict[str, float] | None = None, max_examples: int | None = None,
                 max_prefixes: int | None = None, report_dir: str | None = None, report: bool = True) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.n = n
        self.stop = stop
        self.given_thresholds = dict(thresholds) if thresholds else None
        self.thresholds: dict[str, float] | None = self.given_thresholds
        self.max_examples = max_examples
        self.max_prefixes = max_prefixes
        self.report_dir = report_dir
        self.report = report
        self.history: list[dict[str, Any]] = []
        self.stopped_at: int | None = None

    # ------------------------------------------------------------------ measuring

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        dm = trainer.datamodule
        rank, world = trainer.global_rank, trainer.world_size
        family = pl_module.family
        pad = pl_module.tokenizer.pad_token_id
        out: dict[str, Any] = {"step": trainer.global_step}
        for name in SETS:
            n_total = len(dm.sets.get(name) or [])
            if not n_total:
                continue
            batches = dm.eval_batches(name, rank, world, limit=self.max_examples)
            dev = pl_module.device
            el = ExtractionLikelihood(self.n).to(dev) if family == "decoder" else None
            scores = memorisation_scores(pl_module.model, batches, family, self.n, pad,
                                         ma=MemorizationAccuracy().to(dev), el=el, ppl=Perplexity().to(dev),
                                         max_prefixes=self.max_prefixes)
            for k, v in scores.items():
                out[f"{name}/{k}"] = v
        return out

    def _record(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return self.history[-1]
        row = self.evaluate(trainer, pl_module)
        self.history.append(row)
        for logger in trainer.loggers:
            logger.log_metrics({f"forgetting/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        return row

    @property
    def el_key(self) -> str:
        return f"el{self.n}"

    def reached(self, row: dict[str, Any]) -> bool:
        """Jang et al.'s rule: forget MA and EL_n at or below the thresholds (EL skipped for non-decoders)."""
        if not self.thresholds or "forget/ma" not in row:
            return False
        ok = row["forget/ma"] <= self.thresholds["ma"]
        if f"forget/{self.el_key}" in row and self.thresholds.get("el") is not None:
            ok = ok and row[f"forget/{self.el_key}"] <= self.thresholds["el"]
        return ok

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        trainer.datamodule.setup("fit")
        if not self.history:
            row = self._record(trainer, pl_module)
            if self.thresholds is None and "unseen/ma" in row:
                self.thresholds = {"ma": row["unseen/ma"], "el": row.get(f"unseen/{self.el_key}")}
        if self.stop and self.thresholds is None:
            raise ValueError("the stopping rule needs unseen text (data.init_args.unseen / unseen_texts) or "
                             "thresholds in the ForgettingTracker preset")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        row = self._record(trainer, pl_module)
        if self.stop and self.stopped_at is None and self.reached(row):
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
        elif self.stop and self.stopped_at is not None:
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        row = self._record(trainer, pl_module)
        if self.stop and self.stopped_at is None and self.reached(row):
            self.stopped_at = trainer.global_step
        if trainer.is_global_zero and self.report:
            self.write_report(trainer)

    # ------------------------------------------------------------------ state & report

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "thresholds": self.thresholds, "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.thresholds = self.given_thresholds or state_dict.get("thresholds")
        self.stopped_at = state_dict.get("stopped_at")

    def summary(self) -> dict[str, Any]:
        first, last = (self.history[0], self.history[-1]) if self.history else ({}, {})
        return {"before": first, "after": last, "thresholds": self.thresholds, "stopped_at": self.stopped_at}

    def write_report(self, trainer: L.Trainer) -> Path:
        root = Path(self.report_dir or trainer.default_root_dir)
        png = root / "forgetting.png"
        plot_history(self.history, png, self.thresholds, self.el_key)
        write_json(root / "forgetting.json", self.summary() | {"history": self.history})
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="forgetting/curves", images=[str(png)])
        return png


def plot_history(history: list[dict[str, Any]], dest: str | Path, thresholds: dict[str, float] | None = None,
                 el_key: str = "el10", title: str | None = None) -> Path:
    """Curves of MA, EL_n and perplexity for each set over steps, thresholds dashed; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ma", "memorisation accuracy"), (el_key, el_key.upper().replace("EL", "EL_")), ("ppl", "perplexity")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = {"forget": "tab:red", "retain": "tab:blue", "unseen": "tab:gray"}
    for ax, (key, label) in zip(axes, panels):
        for name in SETS:
            pts = [(r["step"], r[f"{name}/{key}"]) for r in history if f"{name}/{key}" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name, color=colours[name])
        thr = (thresholds or {}).get("el" if key == el_key else key)
        if thr is not None and key != "ppl":
            ax.axhline(thr, ls="--", color="k", lw=0.8, label="threshold")
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return dest


def read_history(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())["history"]

