"""Lifelong editing: a stream of edits applied batch after batch, what it must not contain, and how it is scored.

``check_stream`` runs before the first edit: an exact duplicate (the same subject, relation and new
target twice) is left out with a warning naming both records; a conflict (the same subject and
relation edited to two different targets) is an error naming both records, because stacking the two
would leave the fact at whichever the solve favours; a batch size larger than the stream is an error.
The relation is ``request.relation`` where the source names one, else the prompt template.

``stream_row`` scores the model after ``n`` edits on every edit so far (efficacy, paraphrase), on
their neighbourhoods and on general ability. A neighbourhood prompt about a subject the stream has
itself edited for the same relation is meant to change, so it cannot show bleed: it is left out and
counted (``neighbour_prompts_left_out``), the rule ``benchmarks/editing_memit.py`` and ``lethe edit``
apply. General ability is scored by a function the caller picks: recall of facts whose subjects no edit of
the stream touches (``untouched_world_facts``, ``untouched_facts``; ``untouched_world_paraphrases``: the same
world facts at their held-out phrasings), perplexity of held-out text
(``perplexity``), or both.

``plot_stream`` draws the curves (one panel per metric, one line per method).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from lethe import evaluation as ev
from lethe import lm
from lethe.records import EditRequest

STREAM_METRICS = ("efficacy", "paraphrase", "neighborhood", "general", "general_paraphrase", "fact_recall")


class StreamError(ValueError):
    pass


def fact_key(req: EditRequest) -> tuple[str, str]:
    """What one edit rewrites: (subject, relation), the relation being the prompt template where none is named."""
    return req.subject, req.relation or req.prompt


def check_stream(requests: Sequence[EditRequest], batch_size: int, source: str = "the stream") -> list[EditRequest]:
    """The stream without exact duplicates (each warned about); conflicts and a batch size larger than the
    stream are errors (see the module docstring). Nothing is edited before this has passed."""
    requests = list(requests)
    if batch_size < 1:
        raise StreamError(f"{source}: batch_size must be at least 1, got {batch_size}")
    if batch_size > len(requests):
        raise StreamError(f"{source}: batch_size {batch_size} is larger than the stream ({len(requests)} "
                          "requests); lower data.init_args.batch_size or add requests")
    seen: dict[tuple[str, str], tuple[int, EditRequest]] = {}
    out = []
    for i, req in enumerate(requests):
        key = fact_key(req)
        if key in seen:
            j, prev = seen[key]
            both = f"record {j} (case_id {prev.case_id}) and record {i} (case_id {req.case_id})"
            if prev.target_new == req.target_new:
                warnings.warn(f"{source}: {both} are the same edit ({req.subject!r}, {key[1]!r} -> "
                              f"{req.target_new!r}); record {i} is left out", stacklevel=2)
                continue
            raise StreamError(f"{source}: {both} conflict: both edit {req.subject!r} ({key[1]!r}), to "
                              f"{prev.target_new!r} and to {req.target_new!r}; keep one of them")
        seen[key] = (i, req)
        out.append(req)
    return out


def _untouched_world(stream: Sequence[EditRequest], n: int, seed: int) -> tuple[object, list]:
    """(the world, up to ``n`` of its training facts whose subjects no edit of ``stream`` touches, seeded order)."""
    from lethe.world import load_world

    world = load_world()
    edited = {r.subject for r in stream}
    facts = [f for f in world.train_facts if f.subject not in edited]
    random.Random(seed).shuffle(facts)
    return world, facts[:n]


def untouched_world_facts(stream: Sequence[EditRequest], n: int = 400, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, object) of up to ``n`` training facts of lethe's world whose subjects no edit of ``stream`` touches."""
    world, facts = _untouched_world(stream, n, seed)
    return [(world.training_prompts(f)[0], f.object) for f in facts]


def untouched_world_paraphrases(stream: Sequence[EditRequest], n: int = 400, seed: int = 0) -> list[tuple[str, str]]:
    """(paraphrase prompt, object) of the same untouched facts as ``untouched_world_facts`` (same ``n``, ``seed``),
    at their held-out templates: phrasings the world model never trained on and no preserved set holds (a
    preserved set of training facts holds their training phrasings), so protection aimed at the preserved
    prompts does not score itself here."""
    world, facts = _untouched_world(stream, n, seed)
    return [(p, f.object) for f in facts for p in world.paraphrase_prompts(f)]


def recall(loaded, pairs: Sequence[tuple[str, str]]) -> float:
    """Share of (prompt, answer) pairs the model completes greedily with the answer."""
    hits = lm.greedy_match(loaded.model, loaded.tokenizer, loaded.family, [p for p, _ in pairs],
                           [a for _, a in pairs])
    return float(hits.float().mean())


def untouched_facts(pool: Sequence[EditRequest], stream: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """(rewrite prompt, true object) of the facts of ``pool`` whose subjects no edit of ``stream`` touches."""
    edited = {r.subject for r in stream}
    return [(r.rewrite_prompt, r.target_true) for r in pool if r.subject not in edited]


def perplexity(loaded, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> float:
    """exp(mean token NLL) of the model over ``texts`` (every token a target): ``metrics.memorisation_scores``'s."""
    from lethe.metrics import memorisation_scores

    batches = (lm.encode_texts(loaded.tokenizer, loaded.family, texts[s:s + batch_size], max_length)
               for s in range(0, len(texts), batch_size))
    return memorisation_scores(loaded.model, batches, loaded.family, None, loaded.tokenizer.pad_token_id)["ppl"]


def general_scores(general: Callable[[object], float | dict] | None, loaded) -> dict:
    """``general(loaded)`` as row entries: a number is ``general``; a dict (``general`` and more) as it is."""
    if general is None:
        return {}
    g = general(loaded)
    return dict(g) if isinstance(g, dict) else {"general": g}


def stream_row(loaded, edited: Sequence[EditRequest], general: Callable[[object], float | dict] | None = None,
               batch_size: int = 64) -> dict:
    """Scores after the edits ``edited`` (all edits so far, in order): see the module docstring. ``general``
    returns a number (the row's ``general``) or a dict of general-ability entries (``general`` among them)."""
    reqs, left_out = ev.without_edited_neighbours(edited)
    cf = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, reqs, batch_size=batch_size)
    row = {"n_edits": len(edited), **{k: cf[k] for k in ("efficacy", "paraphrase", "neighborhood")},
           "neighbour_prompts_left_out": left_out,
           "neighbour_prompts_scored": sum(len(r.neighborhood_prompts) for r in reqs)}
    row.update(general_scores(general, loaded))
    return row


def plot_stream(curves: dict[str, list[dict]], path: str | Path, title: str = "",
                reference: dict[str, float] | None = None) -> Path:
    """One panel per metric of ``STREAM_METRICS`` against the number of edits, one line per method;
    ``reference``: the unedited model's value of a metric, drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lethe.io import save_png

    metrics = [m for m in STREAM_METRICS if any(m in r for rows in curves.values() for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method, rows in curves.items():
            pts = [(r["n_edits"], r[metric]) for r in rows if r.get(metric) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=method)
        if reference and reference.get(metric) is not None:
            ax.axhline(reference[metric], color="grey", linestyle="--", linewidth=1, label="unedited")
        ax.set_title(metric)
        ax.set_xlabel("edits")
        if metric != "general":
            ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)
