"""Leave a spawned distributed run cleanly.

With ``strategy="ddp_spawn"`` each worker is a multiprocessing child that
exits through ``os._exit``: Lightning's ``atexit`` hook that destroys the
process group never runs, and a worker that leaves while its peer still holds
the gloo connection can abort ("terminate called without an active
exception"). This callback makes every rank meet at the end of the run and
destroy the group itself. It does nothing in a single process or under the
subprocess ``ddp`` launcher (whose ``atexit`` hook does the same).
"""

from __future__ import annotations

import multiprocessing

import lightning as L
import torch.distributed as dist


class CleanDistributedExit(L.Callback):
    def teardown(self, trainer, pl_module, stage: str) -> None:
        if multiprocessing.parent_process() is None or not (dist.is_available() and dist.is_initialized()):
            return
        dist.barrier()
        dist.destroy_process_group()
