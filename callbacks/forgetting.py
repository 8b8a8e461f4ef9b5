"""Watch forgetting while unlearning runs, stop by Jang et al.'s rule, and draw the curves.

:class:`ForgettingTracker` measures MA, EL_n and perplexity on the datamodule's
``forget``, ``retain`` and ``unseen`` sets at the start of the run and every
``every_n_steps`` optimizer steps (each process scores its own shard; the metrics are
torchmetrics states, so the numbers are the whole set's on any number of processes).

Stopping rule (Knowledge Unlearning, Jang et al. 2022): stop once the forget set's MA and
EL_n are both at or below the unseen text's, measured once at the start of the run
(``thresholds`` in the preset overrides the measurement). The rule is checked after every
``check_every_n_steps`` steps (default 1: every step) on the forget set, or on a fixed probe of
its first ``probe_examples`` examples, so the run stops at the first step where both hold and the
model it keeps is that step's; the step at which each threshold was first crossed is reported
(``crossed``). The full measurement of all three sets stays every ``every_n_steps`` steps and at
the end. History, checks, thresholds, crossings and the stopping step are part of the callback's
checkpoint state, so a resumed run keeps them.

At the end a PNG of the curves (and a JSON of the history) is written to the run folder
and logged to wandb when a WandbLogger is active.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from lethe.io import save_png, write_json
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
        check_every_n_steps: how often the stopping rule is checked (on the forget set or its probe).
        probe_examples: check the rule on the forget set's first N examples (None: all of it).
        el_convention: EL_n's prefix range, "code" (Jang et al.'s implementation) or "paper".
    """

    def __init__(self, every_n_steps: int = 10, n: int = 10, stop: bool = True,
                 thresholds: dict[str, float] | None = None, max_examples: int | None = None,
                 max_prefixes: int | None = None, report_dir: str | None = None, report: bool = True,
                 check_every_n_steps: int = 1, probe_examples: int | None = None,
                 el_convention: str = "code") -> None:
        super().__init__()
        from lethe.metrics import check_convention

        for name, value in (("every_n_steps", every_n_steps), ("check_every_n_steps", check_every_n_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ForgettingTracker.{name}={value!r}: must be an integer >= 1")
        self.every_n_steps = every_n_steps
        self.check_every_n_steps = check_every_n_steps
        self.probe_examples = probe_examples
        self.el_convention = check_convention(el_convention)
        self.n = n
        self.stop = stop
        self.given_thresholds = dict(thresholds) if thresholds else None
        self.thresholds: dict[str, float] | None = self.given_thresholds
        self.max_examples = max_examples
        self.max_prefixes = max_prefixes
        self.report_dir = report_dir
        self.report = report
        self.history: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []  # the stopping rule's measurements (forget set or its probe)
        self.crossed: dict[str, int | None] = {"ma": None, "el": None}
        self.stopped_at: int | None = None

    # ------------------------------------------------------------------ measuring

    def evaluate(self, trainer: L.Trainer, pl_module, sets: tuple[str, ...] = SETS,
                 limit: int | None = None) -> dict[str, Any]:
        dm = trainer.datamodule
        rank, world = trainer.global_rank, trainer.world_size
        family = pl_module.family
        pad = pl_module.tokenizer.pad_token_id
        out: dict[str, Any] = {"step": trainer.global_step}
        for name in sets:
            n_total = len(dm.sets.get(name) or [])
            if not n_total:
                continue
            batches = dm.eval_batches(name, rank, world, limit=limit or self.max_examples)
            dev = pl_module.device
            el = ExtractionLikelihood(self.n, self.el_convention).to(dev) if family == "decoder" else None
            scores = memorisation_scores(pl_module.model, batches, family, self.n, pad,
                                         ma=MemorizationAccuracy().to(dev), el=el, ppl=Perplexity().to(dev),
                                         max_prefixes=self.max_prefixes)
            for k, v in scores.items():
                out[f"{name}/{k}"] = v
        return out

    def _record(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        return record_row(self.history, trainer, lambda: self.evaluate(trainer, pl_module), "forgetting/")

    @property
    def el_key(self) -> str:
        return f"el{self.n}"

    def below(self, row: dict[str, Any]) -> dict[str, bool]:
        """Which thresholds the row's forget set is at or below (EL skipped for non-decoders)."""
        if not self.thresholds or "forget/ma" not in row:
            return {}
        out = {"ma": row["forget/ma"] <= self.thresholds["ma"]}
        if f"forget/{self.el_key}" in row and self.thresholds.get("el") is not None:
            out["el"] = row[f"forget/{self.el_key}"] <= self.thresholds["el"]
        return out

    def reached(self, row: dict[str, Any]) -> bool:
        """Jang et al.'s rule: forget MA and EL_n at or below the thresholds (EL skipped for non-decoders)."""
        below = self.below(row)
        return bool(below) and all(below.values())

    def _check(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        """The rule's measurement at this step: the forget set (or its probe), reusing a full row of this step."""
        step = trainer.global_step
        if self.checks and self.checks[-1]["step"] == step:
            return self.checks[-1]
        if self.probe_examples is None and self.history and self.history[-1]["step"] == step:
            full = self.history[-1]
            row = {k: v for k, v in full.items() if k == "step" or k.startswith("forget/")}
        else:
            row = self.evaluate(trainer, pl_module, ("forget",), self.probe_examples)
            for logger in trainer.loggers:
                logger.log_metrics({f"stop_rule/{k}": v for k, v in row.items() if k != "step"}, step=step)
        self.checks.append(row)
        for key, hit in self.below(row).items():
            if hit and self.crossed.get(key) is None:
                self.crossed[key] = step
        return row

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
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self._record(trainer, pl_module)
        if self.stop and self.stopped_at is not None:
            trainer.should_stop = True
            return
        if self.thresholds is not None and step % self.check_every_n_steps == 0:
            check = self._check(trainer, pl_module)
            if self.stop and self.reached(check):
                self.stopped_at = step
                trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        self._record(trainer, pl_module)
        if self.thresholds is not None:
            check = self._check(trainer, pl_module)
            if self.stop and self.stopped_at is None and self.reached(check):
                self.stopped_at = trainer.global_step
        if trainer.is_global_zero and self.report:
            self.write_report(trainer)
        if trainer.is_global_zero and self.history:
            print(self.summary_line(), flush=True)

    def summary_line(self) -> str:
        """One line for the log: where the run ended against the thresholds, and what the retain set kept."""
        first, last = self.history[0], self.history[-1]
        parts = [f"forgetting: step {last['step']}"
                 + (f" (stop rule, crossed: MA at step {self.crossed.get('ma')}, EL at step {self.crossed.get('el')})"
                    if self.stopped_at is not None else " (no stop)")]
        thr = self.thresholds or {}
        for key, name in (("ma", "MA"), (self.el_key, self.el_key.upper())):
            if f"forget/{key}" in last:
                t = thr.get("ma" if key == "ma" else "el")
                parts.append(f"forget {name} {last[f'forget/{key}']:.3f}" + (f" (threshold {t:.3f})" if t is not None
                                                                             else ""))
        if "retain/ma" in last:
            parts.append(f"retain MA {last['retain/ma']:.3f} (at step 0: {first.get('retain/ma', float('nan')):.3f})")
        return "; ".join(parts)

    # ------------------------------------------------------------------ state & report

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "checks": self.checks, "crossed": self.crossed,
                "thresholds": self.thresholds, "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.checks = list(state_dict.get("checks", []))
        self.crossed = dict(state_dict.get("crossed") or {"ma": None, "el": None})
        self.thresholds = self.given_thresholds or state_dict.get("thresholds")
        self.stopped_at = state_dict.get("stopped_at")

    def summary(self) -> dict[str, Any]:
        first, last = (self.history[0], self.history[-1]) if self.history else ({}, {})
        return {"before": first, "after": last, "thresholds": self.thresholds, "stopped_at": self.stopped_at,
                "crossed": self.crossed, "probe_examples": self.probe_examples, "el_convention": self.el_convention}

    def write_report(self, trainer: L.Trainer) -> Path:
        root = Path(self.report_dir or trainer.default_root_dir)
        png = root / "forgetting.png"
        plot_history(self.history, png, self.thresholds, self.el_key, checks=self.checks)
        write_json(root / "forgetting.json", self.summary() | {"history": self.history, "checks": self.checks})
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="forgetting/curves", images=[str(png)])
        return png


def record_row(history: list[dict[str, Any]], trainer: L.Trainer, evaluate, prefix: str,
               skip: tuple[str, ...] = ("step",)) -> dict[str, Any]:
    """A metrics callback's row for this step: the one already recorded, or ``evaluate()`` appended to ``history``
    and logged to every logger under ``prefix`` (keys in ``skip`` left out) at the row's step."""
    if history and history[-1]["step"] == trainer.global_step:
        return history[-1]
    row = evaluate()
    history.append(row)
    for logger in trainer.loggers:
        logger.log_metrics({f"{prefix}{k}": v for k, v in row.items() if k not in skip}, step=row["step"])
    return row


class PeriodicEvaluation(L.Callback):
    """A callback that scores the model at the start (``at_start``), every ``every_n_steps`` optimizer steps and at
    the end of fit, keeping one row per step in ``history`` (checkpointed) and logging it under ``prefix``.
    Subclasses give ``evaluate(trainer, pl_module) -> row`` and ``finish(trainer, last_row)`` (rank 0, at the end)."""

    prefix = ""
    skip: tuple[str, ...] = ("step",)

    def __init__(self, every_n_steps: int = 10, at_start: bool = True) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"{type(self).__name__}.every_n_steps={every_n_steps!r}: must be an integer >= 0")
        self.every_n_steps, self.at_start = every_n_steps, at_start
        self.history: list[dict[str, Any]] = []

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, trainer: L.Trainer, last: dict[str, Any]) -> None:
        """Rank 0, after the last row: write reports, print a summary."""

    def _record(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        return record_row(self.history, trainer, lambda: self.evaluate(trainer, pl_module), self.prefix, self.skip)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_start and not self.history:
            self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        last = self._record(trainer, pl_module)
        if trainer.is_global_zero:
            self.finish(trainer, last)


def plot_history(history: list[dict[str, Any]], dest: str | Path, thresholds: dict[str, float] | None = None,
                 el_key: str = "el10", title: str | None = None, checks: list[dict[str, Any]] | None = None) -> Path:
    """Curves of MA, EL_n and perplexity for each set over steps, thresholds dashed, the stopping rule's
    per-step forget checks dotted; written atomically."""
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
        pts = [(r["step"], r[f"forget/{key}"]) for r in checks or [] if f"forget/{key}" in r]
        if len(pts) > 1:
            ax.plot(*zip(*pts), ls=":", lw=1, color=colours["forget"], label="forget (stop-rule checks)")
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
    return save_png(fig, dest)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())["history"]

