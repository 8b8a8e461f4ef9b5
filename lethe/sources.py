"""Where edit requests come from, named one way for every command: ``world[:split]`` (lethe's synthetic
world, CounterFact or zsRE form), ``real_facts`` (the bundled facts SmolLM2 knows) or a records file."""

from __future__ import annotations

from pathlib import Path

from lethe.io import REAL_FACTS
from lethe.records import EditRequest, read_records


def load_requests(source: str, kind: str = "counterfact", limit: int | None = None, offset: int = 0,
                  seed: int | None = None) -> list[EditRequest]:
    """Requests from a file, the world (``world[:split]``) or ``real_facts``; optionally shuffled, then cut."""
    if source == "world" or source.startswith("world:"):
        from lethe.world import load_world

        split = source.split(":", 1)[1] if ":" in source else "train"
        world = load_world()
        reqs = world.to_zsre(split) if kind == "zsre" else world.to_counterfact(split)
    elif source == "real_facts":
        reqs = read_records(REAL_FACTS, "counterfact")
    else:
        if not Path(source).exists():
            raise FileNotFoundError(f"edit requests: {source} does not exist (a file of {kind} records, "
                                    "'world[:split]' or 'real_facts')")
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
