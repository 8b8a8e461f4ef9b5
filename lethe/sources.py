"""Where edit requests come from, named one way for every command: ``world[:split]`` (lethe's synthetic
world, CounterFact or zsRE form), ``real_facts`` (the bundled facts SmolLM2 knows), ``fact_bank[:split]`` (the
larger bank of real facts SmolLM2 knows, for long edit streams and hypernetwork training: ``train``,
``validation`` or ``heldout``, split by subject; ``scripts/score_real_facts.py --bank``) or a records file; and the
built-in forget / retain / unseen text sets of unlearning (``builtin_sets``: the world's facts, memorised
passages)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lethe.io import FACT_BANK, MEMORISED_PASSAGES, REAL_FACTS
from lethe.records import EditRequest, read_records


def load_requests(source: str, kind: str = "counterfact", limit: int | None = None, offset: int = 0,
                  seed: int | None = None) -> list[EditRequest]:
    """Requests from a file, the world (``world[:split]``), ``real_facts`` or ``fact_bank[:split]``; optionally
    shuffled, then cut."""
    if source == "world" or source.startswith("world:"):
        from lethe.world import load_world

        split = source.split(":", 1)[1] if ":" in source else "train"
        world = load_world()
        reqs = world.to_zsre(split) if kind == "zsre" else world.to_counterfact(split)
    elif source == "real_facts":
        reqs = read_records(REAL_FACTS, "counterfact")
    elif source == "fact_bank" or source.startswith("fact_bank:"):
        split = source.split(":", 1)[1] if ":" in source else None
        splits = [r["split"] for r in json.loads(FACT_BANK.read_text())]
        if split is not None and split not in set(splits):
            raise ValueError(f"edit requests: {source}: the fact bank's splits are {', '.join(sorted(set(splits)))}")
        reqs = [r for r, s in zip(read_records(FACT_BANK, "counterfact"), splits) if split in (None, s)]
    else:
        if not Path(source).exists():
            raise FileNotFoundError(f"edit requests: {source} does not exist (a file of {kind} records, "
                                    "'world[:split]', 'real_facts' or 'fact_bank[:split]')")
        reqs = read_records(source, kind)
    if seed is not None:
        import random

        reqs = list(reqs)
        random.Random(seed).shuffle(reqs)
    reqs = list(reqs)[offset:]
    if limit is not None:
        reqs = reqs[:limit]
    if not reqs:
        raise ValueError(f"edit requests: {source} gave no requests (offset={offset}, limit={limit})")
    return reqs


def world_split(n_forget: int = 32, n_retain: int = 256, n_unseen: int = 64, seed: int = 0) -> dict[str, list]:
    """Disjoint fact samples of lethe's world: forget/retain from training facts, unseen from held-out ones."""
    from lethe.world import load_world

    world = load_world()
    train = list(world.train_facts)
    rng = random.Random(seed)
    rng.shuffle(train)
    unseen = list(world.unseen_facts)
    rng.shuffle(unseen)
    if n_forget + n_retain > len(train):
        raise ValueError(f"n_forget + n_retain = {n_forget + n_retain} > {len(train)} training facts")
    return {"world": world, "forget": train[:n_forget], "retain": train[n_forget:n_forget + n_retain],
            "unseen": unseen[:n_unseen]}


def fact_sentences(world, facts) -> list[str]:
    """A fact's sentences: the fact completed in each of its training templates."""
    return [world.sentence(p, f.object) for f in facts for p in world.training_prompts(f)]


def builtin_sets(name: str, n_forget: int = 32, n_retain: int = 256, n_unseen: int = 64,
                 seed: int = 0) -> dict[str, list[str]]:
    """Texts of a built-in forget/retain/unseen set (see ForgetRetainDataModule's ``builtin``)."""
    if name == "world":
        split = world_split(n_forget, n_retain, n_unseen, seed)
        return {k: fact_sentences(split["world"], split[k]) for k in ("forget", "retain", "unseen")}
    if name == "memorised_passages":
        data = json.loads(MEMORISED_PASSAGES.read_text())
        return {"forget": [x["text"] for x in data["memorised"] if x.get("selected")], "retain": [],
                "unseen": [x["text"] for x in data["unseen"]]}
    raise ValueError(f"data.init_args.builtin={name!r}: use 'world' or 'memorised_passages'")
