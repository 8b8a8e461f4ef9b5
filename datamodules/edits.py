"""Edit requests as a datamodule, so ``lethe edit`` reads them like any Lightning job reads data.

Sources:
- a file of records (``kind``: counterfact or zsre; validated by ``lethe.records``, errors name
  the file, record and field);
- ``world`` / ``world:<split>``: the synthetic world's CounterFact-style requests
  (``lethe.world.load_world().to_counterfact(split)``), or its zsRE form with kind=zsre;
- ``real_facts``: the bundled real facts (``lethe/data/real_facts.json``) for real models.

Each batch is a plain list of ``EditRequest`` (the editor needs the text, not tensors).
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from lethe.records import EditRequest
from lethe.sources import load_requests


def _as_list(items: list) -> list:
    return list(items)


class EditDataModule(L.LightningDataModule):
    """Batches of edit requests for ``trainer.test`` (one batch = the requests of one editor call).

    Args:
        source: a record file, ``world[:split]`` or ``real_facts``.
        kind: counterfact or zsre (how a file is read; with the world, which form is built).
        limit / offset / seed: take ``limit`` requests from ``offset`` (after a seeded shuffle if given).
        batch_size: requests per editor call (1 = one edit at a time).
        check: check the requests as a stream (``lethe.streams.check_stream``): a batch size larger than
            the stream or two records editing the same subject and relation to different targets are
            errors naming the records; an exact duplicate is left out with a warning.
    """

    def __init__(self, source: str = "world:train", kind: str = "counterfact", limit: int | None = None,
                 offset: int = 0, seed: int | None = None, batch_size: int = 1, check: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.requests: list[EditRequest] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.requests:
            h = self.hparams
            requests = load_requests(h.source, h.kind, h.limit, h.offset, h.seed)
            if h.check:
                from lethe.streams import check_stream

                requests = check_stream(requests, h.batch_size, source=h.source)
            self.requests = requests

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.requests, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=_as_list)

    predict_dataloader = test_dataloader
