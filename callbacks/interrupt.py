"""Save the run when it is told to stop (SIGTERM from a scheduler, ``kill``), so it resumes where it stopped.

Lightning finishes the training step in progress when SIGTERM arrives and then leaves the fit loop with
``SIGTERMException``; this callback writes ``last.ckpt`` at that point (the state after the last completed
step), and ``lethe`` exits with code 143 (128 + SIGTERM) instead of 0, so a scheduler sees the job did not
finish. ``lethe fit ... --ckpt_path last`` continues from that step.

Ctrl+C (SIGINT) takes the same path: the first one lets the step in progress finish, saves it and exits
with 130 (a second Ctrl+C aborts at once, without saving).

It also makes a checkpoint taken when an epoch has just ended resume at the next epoch's first batch:
Lightning keeps that epoch's per-epoch batch counters in the checkpoint, and a resumed run then ended
the next epoch after one batch (a different shuffle from there on: weights off by ~1e-3).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lethe.interrupts import mark_sigint, sigint_received


def _zero_current(progress: dict) -> None:
    for key, value in progress.items():
        if key == "current" and isinstance(value, dict):
            progress[key] = dict.fromkeys(value, 0)
        elif key == "is_last_batch":
            progress[key] = False
        elif isinstance(value, dict):
            _zero_current(value)


class SaveOnInterrupt(L.Callback):
    _previous = None

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigint(signum, frame):
            if mark_sigint():  # the second Ctrl+C: stop now
                raise KeyboardInterrupt
            print("\nlethe: Ctrl+C: finishing this step, saving it, then stopping (Ctrl+C again aborts without "
                  "saving)", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own graceful stop (after the step in progress)

        self._previous = signal.signal(signal.SIGINT, on_sigint)

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.is_global_zero:  # the metrics up to this checkpoint reach the disk with it (a kill -9 loses none)
            for logger in trainer.loggers:
                logger.save()
        fit = checkpoint.get("loops", {}).get("fit_loop")
        if not fit or "epoch_progress" not in fit:
            return
        epochs = fit["epoch_progress"]["current"]
        batches = fit.get("epoch_loop.batch_progress", {}).get("current", {}).get("completed", 0)
        # the epoch ran all its batches and was closed: the next one starts from batch 0 (a run that stopped at
        # max_steps part-way through an epoch keeps its counters: it resumes inside that epoch)
        if epochs["completed"] == epochs["ready"] and batches >= trainer.num_training_batches:
            for key, value in fit.items():
                if key.startswith("epoch_loop.") and key.endswith("progress") and isinstance(value, dict):
                    _zero_current(value)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if ckpt is None or ckpt.dirpath is None:
            return
        path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        # recorded as the checkpoint callback's own last save, so the resumed run keeps writing last.ckpt
        # (not last-v1.ckpt beside it)
        ckpt.last_model_path = str(path)
        trainer.save_checkpoint(path)  # every rank takes part (the strategy gathers), rank 0 writes
        if trainer.is_global_zero:
            what = "Ctrl+C" if sigint_received() else "SIGTERM"
            print(f"lethe: {what}: saved step {trainer.global_step} to {path}; resume with --ckpt_path last",
                  flush=True)
