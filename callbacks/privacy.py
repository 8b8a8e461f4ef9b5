"""Membership inference during training: does the forget set still look like training data?

``MembershipInference`` scores the model every ``every_n_steps`` steps (and at the start and the end) with
lethe.privacy's attacks: each process scores its shard of the forget and holdout sets, and the
``MembershipAUROC`` / mean metrics are reduced across processes, so a DDP run reports the whole sets' AUC.
Rows go to every logger under ``mia/`` (CSV, wandb), the history is checkpointed (a resumed run continues it),
and ``mia.json`` + ``mia.png`` (AUC per attack against step) are written at the end.

The sets default to the datamodule's own: its forget set (members) against its unseen set (never trained on).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric

from callbacks.forgetting import PeriodicEvaluation
from lethe import privacy
from lethe.io import save_png, write_json
from lethe.metrics import MembershipAUROC


class MembershipInference(PeriodicEvaluation):
    """MIA AUC of forget against holdout over training.

    Args:
        forget / holdout: record files or ``tofu:<split>`` names (default: the datamodule's forget and unseen sets).
        kind: the files' record kind (tofu or text).
        reference_model: a model to take the likelihood ratio against (adds the ``reference`` attack).
        every_n_steps: evaluation period in optimizer steps (0: only at the start and the end).
        batch_size: evaluation batch size. at_start: evaluate before the first step.
    """

    def __init__(self, forget: str | None = None, holdout: str | None = None, kind: str = "tofu",
                 reference_model: str | None = None, every_n_steps: int = 10, batch_size: int = 16,
                 at_start: bool = True, report_dir: str | None = None) -> None:
        super().__init__(every_n_steps, at_start)
        if (forget is None) != (holdout is None):
            raise ValueError("MembershipInference: give both forget and holdout, or neither (the datamodule's "
                             "forget and unseen sets)")
        self.forget, self.holdout, self.kind = forget, holdout, kind
        self.reference_model = reference_model
        self.batch_size = batch_size
        self.report_dir = report_dir
        self.sets: dict[str, list[privacy.Example]] = {}
        self.reference_nll: dict[str, list[float]] = {}

    def _prompt_format(self, trainer: L.Trainer) -> str | None:
        dm = getattr(trainer, "datamodule", None)
        return (getattr(dm, "hparams", {}) or {}).get("prompt_format")

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.sets:
            return
        if self.forget is not None:
            from lethe.records import read_records

            dm = getattr(trainer, "datamodule", None)
            subset = (getattr(dm, "hparams", {}) or {}).get("tofu_subset")
            forget = privacy.examples(read_records(self.forget, self.kind, tofu_subset=subset))
            holdout = privacy.examples(read_records(self.holdout, self.kind))
            where = {"forget": self.forget, "holdout": self.holdout}
        else:
            dm = trainer.datamodule
            dm.setup("fit")
            to_ex = lambda e: privacy.Example(e.get("prompt", ""), e["target"] if "target" in e else e["text"])
            forget, holdout = ([to_ex(e) for e in dm.sets.get(k) or []] for k in ("forget", "unseen"))
            where = {"forget": "data.init_args.forget", "holdout": "data.init_args.unseen"}
        privacy.check_sets(forget, holdout, where)
        self.sets = {"forget": forget, "holdout": holdout}

    def _shard(self, trainer: L.Trainer, name: str) -> list[privacy.Example]:
        return self.sets[name][trainer.global_rank::trainer.world_size]

    def _reference(self, trainer: L.Trainer, pl_module) -> dict[str, np.ndarray] | None:
        if self.reference_model is None:
            return None
        if not self.reference_nll:
            from lethe.models import load_model

            ref = load_model(self.reference_model, device=pl_module.device)
            fmt = self._prompt_format(trainer)
            self.reference_nll = {name: privacy.example_stats(ref.model, ref.tokenizer, ref.family,
                                                              self._shard(trainer, name), fmt,
                                                              self.batch_size)["nll"].tolist()
                                  for name in self.sets}
            del ref
        return {k: np.asarray(v) for k, v in self.reference_nll.items()}

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        t0 = time.perf_counter()
        fmt = self._prompt_format(trainer)
        ref = self._reference(trainer, pl_module)
        aucs: dict[str, MembershipAUROC] = {}
        means = {f"{q}_{name}": MeanMetric().to(pl_module.device) for q in ("exact_memorization", "extraction_strength")
                 for name in self.sets}
        with trainer.precision_plugin.forward_context():
            for name in self.sets:
                rows = self._shard(trainer, name)
                stats = privacy.example_stats(pl_module.model, pl_module.tokenizer, pl_module.family, rows, fmt,
                                              self.batch_size)
                scores = privacy.mia_scores(stats, rows, ref[name] if ref else None)
                for attack, values in scores.items():
                    metric = aucs.setdefault(attack, MembershipAUROC().to(pl_module.device))
                    metric.update(torch.as_tensor(values), torch.full((len(values),), name == "forget"))
                for q in ("exact_memorization", "extraction_strength"):
                    means[f"{q}_{name}"].update(torch.as_tensor(stats[q]))
        row: dict[str, Any] = {"step": trainer.global_step}
        row.update({f"{attack}_auc": float(m.compute()) for attack, m in aucs.items()})
        row.update({k: float(m.compute()) for k, m in means.items()})
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row

    prefix = "mia/"

    def finish(self, trainer: L.Trainer, last: dict[str, Any]) -> None:
        self.write_report(trainer)
        print("membership inference: step {}: {}".format(
            last["step"], ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.endswith("_auc"))), flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "reference_nll": self.reference_nll}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.reference_nll = state_dict.get("reference_nll") or {}

    def write_report(self, trainer: L.Trainer) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        root = Path(self.report_dir or trainer.default_root_dir)
        write_json(root / "mia.json", {"n_forget": len(self.sets["forget"]), "n_holdout": len(self.sets["holdout"]),
                                       "history": self.history})
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for key in [k for k in self.history[-1] if k.endswith("_auc")]:
            ax.plot([r["step"] for r in self.history], [r[key] for r in self.history], marker="o", ms=3,
                    label=key[:-4])
        ax.axhline(0.5, ls="--", color="k", lw=0.8)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("MIA ROC-AUC, forget vs holdout")
        ax.legend(fontsize=7)
        png = save_png(fig, root / "mia.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="mia/curves", images=[str(png)])
        return png
