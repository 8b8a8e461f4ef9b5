"""The edit job as a LightningModule, run by ``trainer.test``: Lightning's progress bar, loggers and
callbacks (the edit-evaluation callback) serve every editing method.

Each test batch is one call of the editor. ``sequential=True`` keeps every edit (the model
accumulates them; after every ``save_every`` batches, once the batch is scored, the running sum
and the edited parameters' values are saved as an artifact, so a crash loses at most those batches
and the same command resumes after the last saved one, to the weights an uninterrupted run
reaches); ``sequential=False`` reverts each edit after it has been evaluated, so every batch meets
the original model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lethe.edit_cli import build_editor
from lethe.edits import ARTIFACT_DIR, MODEL_DIR, EditArtifact, restore_edited
from lethe.io import write_json
from lethe.models import LoadedModel
from lethe.precision import fresh_weights
from lightning_modules.base import ModelModule


class EditingModule(ModelModule):
    """Args: model — what to edit; editor / editor_args — the method; sequential — keep edits (True) or
    revert each after evaluation; evaluate — EditEvaluation's arguments; save_model — save the edited
    model at the end; save_every — artifact checkpoint period in batches; resume — continue a sequential
    run from the run folder's artifact."""

    def __init__(self, model: str, editor: str = "rome", editor_args: dict | None = None, sequential: bool = True,
                 evaluate: dict | None = None, save_model: bool = True, save_every: int = 1, resume: bool = True,
                 dtype: str = "float32", trust_remote_code: bool = False, tokenizer: str | None = None) -> None:
        super().__init__(model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        self.save_hyperparameters()
        self.editor = build_editor(editor, editor_args)
        self.sequential = sequential
        self.artifacts: list[EditArtifact] = []
        self.total: EditArtifact | None = None
        self._done_batches = 0
        self._pending_revert: EditArtifact | None = None
        self._saved_through = 0  # batches included in the artifact on disk
        self.automatic_optimization = False

    @property
    def loaded(self) -> LoadedModel:
        return LoadedModel(self.model, self.tokenizer, self.adapter, self.family, self.model_source)

    def configure_callbacks(self):
        from callbacks.edit_eval import EditEvaluation

        if any(isinstance(c, EditEvaluation) for c in self.trainer.callbacks):
            return []
        return [EditEvaluation(**(self.hparams.evaluate or {}))]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # requests are text

    def out_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def skip_batch(self, batch_idx: int) -> bool:
        return batch_idx < self._done_batches

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision not in ("32-true", "32", "bf16-mixed"):
            raise ValueError(f"trainer.precision={precision!r}: lethe edit runs in 32 or bf16-mixed (bf16 autocast of "
                             "the value optimisation; keys and solves stay float32/float64). Weights cast to 16 bits "
                             "would round away updates smaller than their last bit")

    def on_test_start(self) -> None:
        if hasattr(self.editor, "prepare"):  # statistics of the unedited model, before a resumed run's weights
            self.editor.prepare(self.loaded)
        path = self.out_dir() / ARTIFACT_DIR
        if self.sequential and self.hparams.resume and path.is_dir():
            total = EditArtifact.load(path)
            if total.meta.get("model_source") not in (None, self.model_source) or \
                    total.meta.get("editor") != self.hparams.editor:
                raise ValueError(f"{path} holds a run of another model or editor; remove it or set resume=false")
            total.check(self.model)
            changed = total.changed_bases(self.model)
            if changed:
                raise ValueError(f"{path} was made on other weights of {changed} than {self.model_source} has now; "
                                 "remove it or set model.init_args.resume=false")
            restore_edited(total, self.model, path)
            self.total = total
            self._done_batches = self._saved_through = int(total.meta.get("completed_batches", 0))
            print(f"resuming a sequential edit run: {self._done_batches} batches already applied from {path}")
        self._sync_editor()
        self._check_all_requests()

    def _sync_editor(self) -> None:
        """Editors with a stream state (AlphaEdit's earlier keys) take it from the edits the model holds."""
        if hasattr(self.editor, "resume_stream"):
            self.editor.resume_stream(self.total if self.sequential else None)

    def _check_all_requests(self) -> None:
        """Every request of the run checked before the first (or next) edit, so a bad record far down a stream
        stops the run before anything is applied, not after hours of edits."""
        requests = getattr(getattr(self.trainer, "datamodule", None), "requests", None)
        if requests and hasattr(self.editor, "check_requests"):
            self.editor.check_requests(self.loaded, requests)

    def test_step(self, batch, batch_idx):
        if self.skip_batch(batch_idx):
            return
        with fresh_weights(self.device):  # edits change weights in place: no stale bf16 copies within the step
            art = self.editor.edit(self.loaded, batch)
        if self.sequential:
            self.artifacts.append(art)
            self.total = art if self.total is None else EditArtifact.combine([self.total, art])
            self._done_batches = batch_idx + 1
        else:
            self._pending_revert = art
            self.artifacts.append(art)
        return

    def on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # runs after the callbacks' on_test_batch_end, i.e. after the edit was evaluated (and its scores saved)
        if self.sequential and self._saved_through < self._done_batches == batch_idx + 1 \
                and self._done_batches % max(1, self.hparams.save_every) == 0:
            self._save_total()
        if self._pending_revert is not None:
            self._pending_revert.revert(self.model)
            self._pending_revert = None
            self._sync_editor()

    def _save_total(self) -> None:
        if self.total is None or not self.trainer.is_global_zero:
            return
        self.total.meta.update(completed_batches=self._done_batches, editor=self.hparams.editor,
                               model_source=self.model_source)
        params = dict(self.model.named_parameters())
        self.total.save(self.out_dir() / ARTIFACT_DIR, weights={n: params[n] for n in self.total.deltas})
        self._saved_through = self._done_batches

    def on_test_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        out = self.out_dir()
        if self.sequential:
            self._save_total()
            if self.hparams.save_model and self.total is not None:
                self.save_model(out / MODEL_DIR)
        else:
            for i, art in enumerate(self.artifacts):
                art.meta.update(editor=self.hparams.editor, model_source=self.model_source)
                art.save(out / "edit_artifacts" / f"{i:05d}")
        write_json(out / "edit_job.json", {"editor": self.hparams.editor, "model": self.model_source,
                                           "sequential": self.sequential, "batches": len(self.artifacts)})

    def configure_optimizers(self):
        return None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return super().forward(batch)
