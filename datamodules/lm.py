"""A datamodule of language-model examples: plain documents or (prompt, target) pairs.

Records come from files (read and validated by ``lethe.records``: text, TOFU,
CounterFact, zsRE) or inline lists in the preset. The tokenizer and the model
family come from the running LightningModule, so a preset names the model once;
pass ``tokenizer``/``family`` to use the datamodule on its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial

import lightning as L
from torch.utils.data import DataLoader, Dataset

from lethe import lm


class ExampleDataset(Dataset):
    def __init__(self, examples: Sequence[dict]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {**self.examples[i], "index": i}


def examples_from_records(records) -> list[dict]:
    """Turn typed records into LM examples: TextRecord → text; QA / edit records → (prompt, target)."""
    out = []
    for r in records:
        if hasattr(r, "text"):
            out.append({"text": r.text})
        elif hasattr(r, "question"):
            out.append({"prompt": r.question, "target": r.answer})
        elif hasattr(r, "rewrite_prompt"):
            out.append({"prompt": r.rewrite_prompt, "target": r.target_true})
        else:
            raise TypeError(f"cannot make a language-model example from {type(r).__name__}")
    return out


def load_examples(paths: str | Sequence[str] | None, kind: str, texts: Sequence[str] | None = None,
                  pairs: Sequence[Sequence[str]] | None = None, tofu_subset: str | None = None) -> list[dict]:
    examples: list[dict] = []
    if paths:
        from lethe.records import read_records

        for p in [paths] if isinstance(paths, str) else paths:
            examples += examples_from_records(read_records(p, kind, tofu_subset=tofu_subset))
    examples += [{"text": t} for t in texts or []]
    examples += [{"prompt": p, "target": t} for p, t in pairs or []]
    return examples


def world_examples(split: str | None) -> list[dict]:
    if split is None:
        return []
    from lethe.world import load_world

    world = load_world()
    corpora = {"train": world.training_corpus, "unseen": world.unseen_corpus}
    if split not in corpora:
        raise ValueError(f"data.init_args.world={split!r}: use 'train' or 'unseen'")
    return [{"text": t} for t in corpora[split]()]


def collate_examples(items: list[dict], tokenizer, family: str, max_length: int | None, seed: int,
                     add_eos: bool = True, prompt_format: str | None = None) -> dict:
    if all("text" in it for it in items):
        # Masks for MLM depend on the examples' indices only: the same batch always gets the same masks,
        # so a resumed run sees exactly what an uninterrupted one would.
        batch = lm.encode_texts(tokenizer, family, [it["text"] for it in items], max_length=max_length,
                                seed=seed + sum(it["index"] for it in items))
    elif all("prompt" in it for it in items):
        batch = lm.encode_pairs(tokenizer, family, [it["prompt"] for it in items],
                                [it["target"] for it in items], max_length=max_length, add_eos=add_eos,
                                prompt_format=prompt_format)
    else:
        raise ValueError("a batch mixes plain texts and prompt/target pairs; keep one kind per dataset")
    batch["index"] = __import__("torch").tensor([it["index"] for it in items])
    return batch


def _token_length(tokenizer, example: dict, prompt_format: str | None = None) -> int:
    if "text" in example:
        return len(tokenizer(example["text"], add_special_tokens=True)["input_ids"])
    prompt = lm.format_prompt(tokenizer, example["prompt"], prompt_format) if example["prompt"] else ""
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) + len(
        tokenizer(lm.target_text(example["target"], prompt), add_special_tokens=False)["input_ids"]) + 1


def check_lengths(examples: list[dict], tokenizer, max_len: int | None, prompt_format: str | None, on_long: str,
                  where: str) -> None:
    """Examples longer than ``max_len`` tokens: warn how many (they are cut: a pair loses its oldest prompt
    tokens, a text its end) or, with ``on_long="error"``, refuse them, naming the set, the first record and how
    many there are."""
    if max_len is None:
        return
    long = [i for i, e in enumerate(examples) if _token_length(tokenizer, e, prompt_format) > max_len]
    if not long:
        return
    field = "answer" if "target" in examples[long[0]] else "text"
    msg = (f"{where}: {len(long)} of {len(examples)} examples are longer than max_length={max_len} tokens (first: "
           f"record {long[0]}, field '{field}', {_token_length(tokenizer, examples[long[0]], prompt_format)} tokens)")
    if on_long == "error":
        raise ValueError(msg + "; raise max_length or set on_long: truncate")
    warnings.warn(msg + f": {len(long)} were cut to fit", stacklevel=3)


class ModelDataModule(L.LightningDataModule):
    """A datamodule that tokenises for the model it feeds: the tokenizer and family come from the running
    lethe LightningModule (a preset names the model once), or from ``tokenizer=`` / ``family=``.

    Args (shared by every lethe datamodule; a subclass passes them on with ``**kwargs``, and the preset
    and ``--print_config`` list them with the subclass's own):
        batch_size: training batch size.
        seed: shuffling and sampling seed.
        num_workers: DataLoader worker processes.
        tokenizer: a tokenizer to load instead of the running module's.
        family: the model family (decoder / mlm / seq2seq) instead of the running module's.
        prompt_format: how a question / prompt is put to the model: None (as it is), ``chat`` (the tokenizer's
            chat template, one user turn) or a format string holding ``{prompt}`` (lethe.lm.format_prompt).
        tofu_subset: which TOFU authors ``tofu:<split>`` records keep (lethe.records.TOFU_SUBSETS: ``full``, ``cpu40``).
    """

    tokenizer = None
    family: str | None = None

    def __init__(self, batch_size: int = 8, seed: int = 0, num_workers: int = 0, tokenizer: str | None = None,
                 family: str | None = None, prompt_format: str | None = None, tofu_subset: str = "full") -> None:
        super().__init__()
        self.tokenizer = None
        self.family = family
        if prompt_format and prompt_format != "chat" and "{prompt}" not in prompt_format:
            from lethe.lm import PROMPT_FORMATS

            raise ValueError(f"data.init_args.prompt_format={prompt_format!r}: use {PROMPT_FORMATS}")
        from lethe.records import subset_authors

        try:
            subset_authors(tofu_subset)
        except ValueError as err:
            raise ValueError(f"data.init_args.{err}") from None
        self._shared = {"batch_size": batch_size, "seed": seed, "num_workers": num_workers, "tokenizer": tokenizer,
                        "family": family, "prompt_format": prompt_format, "tofu_subset": tofu_subset}

    def save_all_hyperparameters(self) -> None:
        """``save_hyperparameters`` for the subclass's own arguments and the shared ones above (whether they
        came in ``**kwargs`` or took their defaults)."""
        import inspect

        self.save_hyperparameters(frame=inspect.currentframe().f_back)
        for key, value in self._shared.items():
            self.hparams.setdefault(key, value)

    def resolve_tokenizer(self):
        """Set ``self.tokenizer`` and ``self.family``; return the running module (None outside a trainer)."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if self.tokenizer is None:
            if self.hparams.get("tokenizer"):
                from lethe.models import load_tokenizer

                self.tokenizer = load_tokenizer(self.hparams.tokenizer)
            elif module is not None:
                self.tokenizer = module.tokenizer
        if module is not None:
            self.family = self.family or module.family
        if self.tokenizer is None or self.family is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer and a family: run it with a lethe module, "
                             "or pass tokenizer= and family=")
        return module


class LMDataModule(ModelDataModule):
    """Train/val/test splits of LM examples.

    Args:
        train, val, test: file path(s) of records of ``kind``.
        kind: "text", "tofu", "counterfact" or "zsre".
        world: "train" or "unseen": add the sentences of lethe's world (its training facts / held-out facts).
        texts, val_texts: inline documents (added to the files' examples).
        pairs, val_pairs: inline ``[prompt, target]`` pairs.
        add_eos: end pair targets with EOS (what a generator should learn to stop on).
        on_long: examples longer than ``max_length``: "truncate" (warn how many were cut) or "error".
    """

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        kind: str = "text",
        world: str | None = None,
        texts: list[str] | None = None,
        val_texts: list[str] | None = None,
        pairs: list[list[str]] | None = None,
        val_pairs: list[list[str]] | None = None,
        eval_batch_size: int | None = None,
        max_length: int | None = 256,
        add_eos: bool = True,
        on_long: str = "truncate",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)  # batch_size, seed, num_workers, tokenizer, family (ModelDataModule)
        self.save_all_hyperparameters()
        if on_long not in ("truncate", "error"):
            raise ValueError(f"data.init_args.on_long={on_long!r}: use 'truncate' or 'error'")
        self.splits: dict[str, ExampleDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        self.resolve_tokenizer()
        h = self.hparams
        if "train" not in self.splits:
            train = load_examples(h.train, h.kind, h.texts, h.pairs, h.tofu_subset) + world_examples(h.world)
            if stage in (None, "fit") and not train:
                raise ValueError("the training set is empty: give train files, texts or pairs")
            check_lengths(train, self.tokenizer, h.max_length, h.prompt_format, h.on_long,
                          f"data.init_args.train ({h.train or 'texts/pairs'})")
            self.splits["train"] = ExampleDataset(train)
            self.splits["val"] = ExampleDataset(load_examples(h.val, h.kind, h.val_texts, h.val_pairs, h.tofu_subset))
            self.splits["test"] = ExampleDataset(load_examples(h.test, h.kind, tofu_subset=h.tofu_subset))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        h = self.hparams
        collate = partial(collate_examples, tokenizer=self.tokenizer, family=self.family,
                          max_length=h.max_length, seed=h.seed, add_eos=h.add_eos, prompt_format=h.prompt_format)
        bs = h.batch_size if split == "train" else (h.eval_batch_size or h.batch_size)
        return DataLoader(self.splits[split], batch_size=bs, shuffle=shuffle, collate_fn=collate,
                          num_workers=h.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False) if len(self.splits.get("val", [])) else []

    def test_dataloader(self):
        split = "test" if len(self.splits.get("test", [])) else "val"
        return self._loader(split, shuffle=False)
