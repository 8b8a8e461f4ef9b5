"""Edit requests for TRAINING an editor hypernetwork (MEND, KE): train / validation / held-out requests.

``datamodules.edits.EditDataModule`` serves ``lethe edit`` (test loop only); an editor also needs
train and validation loaders, and a benchmark needs facts the editor never saw. Two ways to split:

- one source, split here: after a seeded shuffle the first ``heldout`` requests are reserved (never
  served; the benchmarks edit them), the next ``val_size`` validate, the rest train;
- a source split already (``fact_bank:train`` with ``val_source: fact_bank:validation`` and
  ``heldout_source: fact_bank:heldout``, split by subject when the bank was built): each is used as given,
  and a training request about a validation or held-out subject is refused.

Either way a training request's neighbourhood prompts that mention a held-out subject are dropped, so
held-out facts do not even appear as locality inputs. ``counterfactuals: k`` turns each training fact into
k requests with different new objects (other objects of its relation), so an editor learns the relation's
edits rather than one target per subject (MEND trains on ~10^5 zsRE edits; SmolLM2's bank has 529 facts).
"""

from __future__ import annotations

import dataclasses
import random

import lightning as L
from torch.utils.data import DataLoader, Sampler

from lethe.records import EditRequest
from lethe.sources import load_requests


def split_requests(source: str = "world:train", kind: str = "counterfact", seed: int = 0, heldout: int = 250,
                   val_size: int = 64, train_limit: int | None = None
                   ) -> tuple[list[EditRequest], list[EditRequest], list[EditRequest]]:
    """(train, validation, held-out) requests; deterministic for the seed."""
    reqs = list(load_requests(source, kind))
    random.Random(seed).shuffle(reqs)
    if heldout + val_size >= len(reqs):
        raise ValueError(f"{source} has {len(reqs)} requests: too few for heldout={heldout} + val_size={val_size} "
                         "and a training set")
    held, val, train = reqs[:heldout], reqs[heldout:heldout + val_size], reqs[heldout + val_size:]
    if train_limit is not None:
        train = train[:train_limit]
    banned = {r.subject for r in held}
    return [_without(r, banned) for r in train], [_without(r, banned) for r in val], held


def presplit_requests(source: str, val_source: str, heldout_source: str | None, kind: str = "counterfact",
                      val_size: int | None = None, train_limit: int | None = None
                      ) -> tuple[list[EditRequest], list[EditRequest], list[EditRequest]]:
    """(train, validation, held-out) from sources split already; refuses a subject shared across them."""
    train = list(load_requests(source, kind))
    val = list(load_requests(val_source, kind))[:val_size]
    held = list(load_requests(heldout_source, kind)) if heldout_source else []
    for name, other in ((val_source, val), (heldout_source, held)):
        shared = sorted({r.subject for r in train} & {r.subject for r in other})
        if shared:
            raise ValueError(f"edit training data: {source} and {name} share subjects ({', '.join(shared[:5])}"
                             f"{', ...' if len(shared) > 5 else ''}): held-out edits would not be held out")
    if train_limit is not None:
        train = train[:train_limit]
    banned = {r.subject for r in held}
    return [_without(r, banned) for r in train], [_without(r, banned) for r in val], held


def with_counterfactuals(requests: list[EditRequest], k: int, seed: int = 0) -> list[EditRequest]:
    """Each request followed by k - 1 copies whose ``target_new`` is another object of the same relation (drawn,
    seeded, from the objects the requests name: their true and new targets and their neighbours'), never the
    fact's true object; a relation with too few objects gives fewer copies. k = 1: the requests unchanged."""
    if k <= 1:
        return list(requests)
    objects: dict[str | None, set[str]] = {}
    for r in requests:
        pool = objects.setdefault(r.relation, set())
        pool.update(x for x in (r.target_true, r.target_new, *(r.neighborhood_targets or [])) if x)
    rng = random.Random(seed)
    out = []
    for r in requests:
        out.append(r)
        others = sorted(objects[r.relation] - {r.target_true, r.target_new})
        for j, obj in enumerate(rng.sample(others, min(k - 1, len(others))), start=1):
            out.append(dataclasses.replace(r, target_new=obj, case_id=f"{r.case_id}/cf{j}"))
    return out


def _without(req: EditRequest, subjects: set[str]) -> EditRequest:
    keep = [i for i, p in enumerate(req.neighborhood_prompts) if not any(s in p for s in subjects)]
    if len(keep) == len(req.neighborhood_prompts):
        return req
    targets = list(getattr(req, "neighborhood_targets", None) or [])
    return dataclasses.replace(req, neighborhood_prompts=[req.neighborhood_prompts[i] for i in keep],
                               neighborhood_targets=[targets[i] for i in keep] if targets else [])


def _as_list(items: list) -> list:
    return list(items)


class GlobalBatchSampler(Sampler[int]):
    """This process's share of one seeded global order: global batch k = every rank's batch k together.

    So N processes with ``batch_size`` B/N train on exactly the batches one process sees with B (Lightning's
    own DistributedSampler shuffles by rank instead; presets set ``trainer.use_distributed_sampler: false``).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        g = self.batch_size * self.world
        for k in range(self.n // g):
            yield from order[k * g + self.rank * self.batch_size: k * g + (self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return (self.n // (self.batch_size * self.world)) * self.batch_size


def rank_and_world(trainer) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


class EditTrainingDataModule(L.LightningDataModule):
    """Batches (lists) of edit requests for training and validating an editor.

    Args:
        source / kind: as ``EditDataModule`` (``world[:split]``, ``real_facts``, ``fact_bank[:split]`` or a record
            file).
        val_source / heldout_source: validation and held-out requests split already (e.g.
            ``fact_bank:validation`` / ``fact_bank:heldout``); then ``source`` is the training set as it is, and
            ``heldout`` is ignored. Without ``val_source`` the source is split here (seeded shuffle).
        seed: the split's shuffle seed. heldout / val_size / train_limit: the split's sizes (``val_size`` cuts
            ``val_source`` too).
        counterfactuals: training requests per training fact, each with another new object (see
            ``with_counterfactuals``).
        batch_size: requests per training step (per process); shuffle: reshuffle every epoch (seeded; one
            global order split across processes, see ``GlobalBatchSampler``).
    """

    def __init__(self, source: str = "world:train", kind: str = "counterfact", seed: int = 0, heldout: int = 250,
                 val_size: int | None = 64, train_limit: int | None = None, batch_size: int = 8, shuffle: bool = True,
                 val_batch_size: int | None = None, val_source: str | None = None, heldout_source: str | None = None,
                 counterfactuals: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: list[EditRequest] = []
        self.val_set: list[EditRequest] = []
        self.heldout: list[EditRequest] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.train_set:
            h = self.hparams
            if h.val_source:
                train, self.val_set, self.heldout = presplit_requests(h.source, h.val_source, h.heldout_source,
                                                                      h.kind, h.val_size, h.train_limit)
            else:
                train, self.val_set, self.heldout = split_requests(h.source, h.kind, h.seed, h.heldout,
                                                                   h.val_size or 0, h.train_limit)
            self.train_set = with_counterfactuals(train, h.counterfactuals, h.seed)
            if len(self.train_set) < h.batch_size:
                raise ValueError(f"edit training data: {h.source} leaves {len(self.train_set)} training requests, "
                                 f"fewer than one batch (data.init_args.batch_size={h.batch_size}); lower "
                                 "data.init_args.batch_size or heldout / val_size")

    def train_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(getattr(self, "trainer", None))
        sampler = GlobalBatchSampler(len(self.train_set), self.hparams.batch_size, rank, world, self.hparams.seed,
                                     self.hparams.shuffle)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=_as_list, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
                          shuffle=False, collate_fn=_as_list)
