"""Progress lines for runs whose output is not a terminal (a log file, a scheduler's output).

Lightning's progress bar redraws one line with carriage returns: in a file that is unreadable, so
this callback prints a plain line every N batches (or at least every ``seconds``) with the rate and
the time left, for training steps and for edit / evaluation batches. On a terminal it stays silent and
the bar does the job. ``lethe fit`` and ``lethe edit`` add it to every run.
"""

from __future__ import annotations

import sys

import lightning as L

from lethe.progress import Progress, is_terminal


class LineProgress(L.Callback):
    def __init__(self, every_n: int | None = None, seconds: float = 30.0, force: bool = False) -> None:
        self.every_n, self.seconds, self.force = every_n, seconds, force
        self._bar: Progress | None = None

    def _start(self, total: int | None, desc: str, done: int = 0) -> None:
        if not (self.force or not is_terminal(sys.stdout)):
            self._bar = None
            return
        self._bar = Progress(total, desc, every=self.every_n, seconds=self.seconds, stream=sys.stdout)
        self._bar.n = done

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            try:
                total = int(trainer.estimated_stepping_batches)
            except (TypeError, ValueError, RuntimeError):
                total = None
        self._start(total, "training steps", trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is not None and trainer.is_global_zero:
            self._bar.update()

    def on_test_start(self, trainer, pl_module) -> None:
        batches = trainer.num_test_batches
        self._start(int(sum(batches)) if batches and all(b != float("inf") for b in batches) else None,
                    "test batches (edits)")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._bar is not None and trainer.is_global_zero:
            self._bar.update()
