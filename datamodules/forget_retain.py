"""Forget / retain data for unlearning: plain texts or QA records, batched together.

A training batch is ``{"forget": lm-batch, "retain": lm-batch}``; its length is the
forget set's. Forget example i is paired with the ``k = retain_per_forget`` retain examples
``perm[(i*k + j) mod R]``, j < k (R = retain size, ``perm`` a permutation fixed by
``seed``), so a batch is a pure function of the forget indices: the shuffled order comes
from the (distributed) sampler, which Lightning seeds and shards under DDP, and a resumed
run sees exactly the batches an uninterrupted one would. QA records train on their answer
tokens (the question is context).

Evaluation sets for the forgetting callback: ``forget``, ``retain`` and ``unseen``
(held-out text the model never saw -- the reference level for the stopping rule), each
encoded the same way as training data.

Bad input: an empty forget set is an error; forget/retain overlap is warned about with
its size (and optionally removed from retain); sequences longer than ``max_length`` (or
the model's context) are truncated with a warning, or rejected with ``on_long: error``.
"""

from __future__ import annotations

import random
import warnings
from functools import partial

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.lm import ExampleDataset, ModelDataModule, check_lengths, collate_examples, load_examples
from lethe.sources import builtin_sets, fact_sentences, world_split  # noqa: F401 -- their former home


def _key(example: dict) -> tuple:
    return (example.get("text"), example.get("prompt"), example.get("target"))


class PairedDataset(Dataset):
    """Forget example i with its ``per_forget`` fixed retain partners (or alone)."""

    def __init__(self, forget: list[dict], retain: list[dict], seed: int, per_forget: int = 1) -> None:
        self.forget, self.retain, self.per_forget = forget, retain, per_forget
        self.perm = list(range(len(retain)))
        random.Random(seed).shuffle(self.perm)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict:
        item = {"forget": {**self.forget[i], "index": i}}
        if self.retain:
            k, r = self.per_forget, len(self.retain)
            item["retain"] = [{**self.retain[j], "index": j}
                              for j in (self.perm[(i * k + t) % r] for t in range(k))]
        return item


class ResumableSampler(DistributedSampler):
    """A seeded, epoch-wise shuffling sampler that can start an epoch part-way (for resumed runs)."""

    skip = 0

    def __iter__(self):
        idx = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(idx[skip:])


class ResumableLoader(DataLoader):
    """Counts the batches it served this epoch and, restored from a checkpoint, skips them.

    Lightning saves ``state_dict()`` of a stateful train loader into the checkpoint and calls
    ``load_state_dict`` on resume, so a run killed mid-epoch continues with the very batch an
    uninterrupted run would have seen next.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._resume = 0

    def __iter__(self):
        skip, self._resume = self._resume, 0
        self.sampler.skip = skip * self.batch_size
        self._served = skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        # a checkpoint taken on an epoch's last batch resumes at the NEXT epoch's first batch: skipping a full
        # epoch's worth there would run one epoch too far
        return {"batches_served": self._served if self._served < len(self) else 0}

    def load_state_dict(self, state: dict) -> None:
        self._resume = int(state.get("batches_served", 0))


def collate_paired(items: list[dict], tokenizer, family: str, max_length: int | None, seed: int,
                   add_eos: bool, prompt_format: str | None = None) -> dict:
    enc = partial(collate_examples, tokenizer=tokenizer, family=family, max_length=max_length, seed=seed,
                  add_eos=add_eos, prompt_format=prompt_format)
    batch = {"forget": enc([it["forget"] for it in items])}
    if "retain" in items[0]:
        batch["retain"] = enc([r for it in items for r in it["retain"]])
    return batch


class ForgetRetainDataModule(ModelDataModule):
    """Forget (+ retain, + unseen) examples for unlearning.

    Args:
        forget, retain, unseen: file path(s) of records of ``kind`` ("text", "tofu", "counterfact", "zsre").
        forget_texts / retain_texts / unseen_texts: inline documents.
        forget_pairs / retain_pairs / unseen_pairs: inline ``[prompt, target]`` pairs (QA).
        batch_size: forget examples per step.
        retain_per_forget: retain examples paired with each forget example (a step's retain batch is
            ``batch_size * retain_per_forget``): a larger retain batch anchors more of the retained
            knowledge per step.
        eval_batch_size: batch size of the evaluation sets.
        max_length: token limit (None: the model's context); longer sequences follow ``on_long``.
        on_long: "truncate" (warn) or "error".
        drop_overlap: remove retain examples that are also forget examples (always warned about).
        add_eos: end QA answers with EOS (what a generator learned to stop on).
        seed: retain pairing, MLM masks and the built-in sets' sampling.
        builtin: ``"world"`` (forget = the sentences of ``n_forget`` training facts of lethe's world,
            retain = those of ``n_retain`` other training facts, unseen = ``n_unseen`` held-out facts')
            or ``"memorised_passages"`` (texts SmolLM2 memorised in pre-training vs unseen text).
    """

    def __init__(
        self,
        forget: str | list[str] | None = None,
        retain: str | list[str] | None = None,
        unseen: str | list[str] | None = None,
        kind: str = "text",
        forget_texts: list[str] | None = None,
        retain_texts: list[str] | None = None,
        unseen_texts: list[str] | None = None,
        forget_pairs: list[list[str]] | None = None,
        retain_pairs: list[list[str]] | None = None,
        unseen_pairs: list[list[str]] | None = None,
        retain_per_forget: int = 1,
        eval_batch_size: int = 32,
        max_length: int | None = None,
        on_long: str = "truncate",
        drop_overlap: bool = False,
        add_eos: bool = False,
        builtin: str | None = None,
        n_forget: int = 32,
        n_retain: int = 256,
        n_unseen: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)  # batch_size, seed, num_workers, tokenizer, family (ModelDataModule)
        self.save_all_hyperparameters()
        if on_long not in ("truncate", "error"):
            raise ValueError(f"data.init_args.on_long={on_long!r}: use 'truncate' or 'error'")
        from lethe.records import RECORD_KINDS

        if kind not in RECORD_KINDS:
            raise ValueError(f"data.init_args.kind={kind!r}: expected one of {', '.join(RECORD_KINDS)}")
        if retain_per_forget < 1:
            raise ValueError(f"data.init_args.retain_per_forget={retain_per_forget}: must be >= 1")
        self.max_len: int | None = max_length
        self.sets: dict[str, list[dict]] = {}

    # ------------------------------------------------------------------ set-up

    def _resolve(self) -> None:
        if self.tokenizer is not None and self.family is not None:
            return
        module = self.resolve_tokenizer()
        if module is not None:
            ctx = _context_length(module.model)
            if ctx is not None and (self.max_len is None or self.max_len > ctx):
                if self.max_len is not None:
                    warnings.warn(f"max_length={self.max_len} exceeds the model's context ({ctx}); using {ctx}",
                                  stacklevel=2)
                self.max_len = ctx

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        self._resolve()
        h = self.hparams
        forget = load_examples(h.forget, h.kind, h.forget_texts, h.forget_pairs, h.tofu_subset)
        retain = load_examples(h.retain, h.kind, h.retain_texts, h.retain_pairs, h.tofu_subset)
        unseen = load_examples(h.unseen, h.kind, h.unseen_texts, h.unseen_pairs, h.tofu_subset)
        if h.builtin:
            sets = builtin_sets(h.builtin, h.n_forget, h.n_retain, h.n_unseen, h.seed)
            forget += [{"text": t} for t in sets["forget"]]
            retain += [{"text": t} for t in sets["retain"]]
            unseen += [{"text": t} for t in sets["unseen"]]
        if not forget:
            raise ValueError("the forget set is empty: give data.init_args.forget (files), forget_texts, "
                             "forget_pairs or builtin")
        keys = {_key(e) for e in forget}
        overlap = [e for e in retain if _key(e) in keys]
        if overlap:
            action = "removed from retain" if h.drop_overlap else "kept (set drop_overlap: true to remove them)"
            warnings.warn(f"{len(overlap)} of {len(retain)} retain examples also appear in the forget set; "
                          f"{action}", stacklevel=2)
            if h.drop_overlap:
                retain = [e for e in retain if _key(e) not in keys]
        for name, examples in (("forget", forget), ("retain", retain), ("unseen", unseen)):
            self._check_lengths(name, examples)
        self.sets = {"forget": forget, "retain": retain, "unseen": unseen}

    def _check_lengths(self, name: str, examples: list[dict]) -> None:
        source = self.hparams.get(name) or f"{name}_texts/{name}_pairs"
        check_lengths(examples, self.tokenizer, self.max_len, self.hparams.prompt_format, self.hparams.on_long,
                      f"data.init_args.{name} ({source})")

    @property
    def has_retain(self) -> bool:
        return bool(self.sets.get("retain"))

    # ------------------------------------------------------------------ loaders

    def _collate(self):
        h = self.hparams
        return partial(collate_examples, tokenizer=self.tokenizer, family=self.family, max_length=self.max_len,
                       seed=h.seed, add_eos=h.add_eos, prompt_format=h.prompt_format)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        ds = PairedDataset(self.sets["forget"], self.sets["retain"], h.seed, h.retain_per_forget)
        collate = partial(collate_paired, tokenizer=self.tokenizer, family=self.family, max_length=self.max_len,
                          seed=h.seed, add_eos=h.add_eos, prompt_format=h.prompt_format)
        # A DistributedSampler even on one process: its order is a function of (seed, epoch) -- Lightning calls
        # set_epoch -- so a resumed run replays the same epochs, and under DDP each rank gets its own shard.
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=h.seed)
        return ResumableLoader(ds, batch_size=h.batch_size, sampler=sampler, collate_fn=collate,
                               num_workers=h.num_workers)

    def eval_batches(self, name: str, rank: int = 0, world_size: int = 1, limit: int | None = None) -> list[dict]:
        """This process's shard (every world_size-th example, no duplicates) of an evaluation set, batched."""
        self.setup()
        examples = (self.sets.get(name) or [])[:limit]
        mine = [{**e, "index": i} for i, e in enumerate(examples)][rank::world_size]
        collate = self._collate()
        bs = self.hparams.eval_batch_size
        return [collate(mine[s:s + bs]) for s in range(0, len(mine), bs)]

    def eval_loader(self, name: str) -> DataLoader:
        return DataLoader(ExampleDataset(self.sets[name]), batch_size=self.hparams.eval_batch_size,
                          collate_fn=self._collate())


def _context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    from lethe.adapters import unwrap

    cfg = getattr(unwrap(model), "config", cfg)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None

