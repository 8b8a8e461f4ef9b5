"""Lifelong editing benchmark: one stream of edits, batch after batch, for ROME, MEMIT, AlphaEdit and FT-L.

    python benchmarks/sequential_editing.py                          # world decoder, 1000 edits in batches of 50
    python benchmarks/sequential_editing.py --methods alphaedit --n 300 --tune   # the tuning stream

The stream: the world's CounterFact cases (``world:train``, shuffled with ``--seed``) that the unedited
model knows (P(true) > P(new)), taken round-robin over relations; the evaluation stream is the first
``--n`` of them, the tuning stream (``--tune``, where hyperparameters are chosen) the ``--n`` after those,
so no reported fact was used to choose a value. Neighbourhood prompts the unedited model gets wrong hold
no knowledge to keep and are dropped once, up front; a neighbour about a subject the stream has already
edited for the same relation is left out and counted (``lethe.streams``).

Every ``--every`` edits, all edits so far are scored: ``efficacy``, ``paraphrase``, ``neighborhood``
(CounterFact protocol), ``general`` (greedy recall of up to 400 world facts whose subjects no edit of the
stream touches, ``general_unedited`` on the unedited model) and ``seconds`` (editing time so far, without
the evaluations). Each method starts from the unedited weights and uses its preset
(``configs/edit/<method>_decoder.yaml``).

Rollback (``--rollback K --rollback-at N``, AlphaEdit and MEMIT): after N edits, K edits chosen at random
(seeded) are rolled back from the running artifact (``EditArtifact.rollback``); the JSON reports the share
of those facts whose true object wins again, the other edits' efficacy, and general ability, then the
stream continues from the weights before the rollback.

Writes ``benchmarks/results/sequential_editing.json`` and ``sequential_editing.png`` (the curves).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from lethe import evaluation as ev
from lethe import streams
from lethe.edit_cli import build_editor
from lethe.edits import EditArtifact
from lethe.io import write_json
from lethe.presets import editor_preset

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("alphaedit", "memit", "ft", "rome")  # ROME, the slowest, last


def stream_requests(loaded, n: int, seed: int, tune: bool) -> tuple[list, dict]:
    from editing_memit import spread_over_relations

    from lethe.sources import load_requests

    pool = load_requests("world:train", seed=seed)
    known = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, pool)["efficacy_per_case"]
    usable = spread_over_relations([r for r, e in zip(pool, known) if e == 0.0])
    stream = usable[n:2 * n] if tune else usable[:n]  # the tuning stream may be shorter (the facts left)
    if len(stream) < (1 if tune else n):
        raise SystemExit(f"only {len(stream)} known facts for a stream of {n} (the world knows {len(usable)})")
    stream, unknown = ev.known_neighbours_only(loaded.model, loaded.tokenizer, loaded.family, stream)
    return streams.check_stream(stream, 1), {"known_facts": len(usable), "neighbour_prompts_unknown_left_out": unknown}


def editor_for(method: str, model: str, cache_dir: str | None):
    preset, hparams = editor_preset(method, model)
    extra = {} if method == "ft" else {"cache_dir": cache_dir, "progress": False}
    return preset, build_editor(method, {"hparams": hparams, **extra})


def rollback_probe(loaded, total: EditArtifact, stream: list, k: int, seed: int, general) -> dict:
    """Roll back k random edits of ``total`` (every row of each: an edit written at several phrasings has one
    row per phrasing) from the model, score, and put the weights back."""
    params = dict(loaded.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in total.deltas}
    done = {r.case_id for r in total.requests}
    edits = [r for r in stream if r.case_id in done]
    chosen = sorted(random.Random(seed).sample(range(len(edits)), k))
    ids = [edits[i].case_id for i in chosen]
    t = time.perf_counter()
    left = total.rollback(loaded.model, total.find(ids))
    secs = time.perf_counter() - t
    others = [r for r in edits if r.case_id not in set(ids)]
    back = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, [edits[i] for i in chosen])
    rest = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, others)
    out = {"n_edits": len(edits), "rolled_back": k, "rolled_back_case_ids": ids,
           "rows_rolled_back": len(total.requests) - len(left.requests),
           # the unedited model preferred each true object: efficacy 0 = all of them restored
           "restored_share": round(1.0 - back["efficacy"], 4),
           "others_efficacy": round(rest["efficacy"], 4), "others_paraphrase": round(rest["paraphrase"], 4),
           "general": round(general(loaded), 4), "seconds": round(secs, 3)}
    with torch.no_grad():
        for n, t0 in saved.items():
            params[n].copy_(t0)
    return out


def run_method(method: str, loaded, stream: list, args, general, original: dict) -> dict:
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            p.copy_(original[n])
    preset, editor = editor_for(method, args.model, args.cache_dir)
    if hasattr(editor, "resume_stream"):
        editor.resume_stream(None)
    # statistics first (covariance, AlphaEdit's preserved keys), so "seconds" counts editing alone
    if hasattr(editor, "prepare"):
        editor.prepare(loaded)
    elif hasattr(editor, "covariance"):
        for layer in (editor.hp.layers if hasattr(editor.hp, "layers") else [editor.hp.layer]):
            editor.covariance(loaded, layer)
    rows, arts, rollback = [], [], None
    secs = 0.0
    for s in range(0, len(stream), args.batch):
        t = time.perf_counter()
        arts.append(editor.edit(loaded, stream[s:s + args.batch]))
        secs += time.perf_counter() - t
        done = s + args.batch
        if done % args.every == 0 or done >= len(stream):
            row = streams.stream_row(loaded, stream[:done], general)
            row["seconds"] = round(secs, 2)
            rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            print(f"[{method}] {rows[-1]}", file=sys.stderr, flush=True)
        if args.rollback and done == args.rollback_at and method in ("alphaedit", "memit", "rome"):
            rollback = rollback_probe(loaded, EditArtifact.combine(arts), stream, args.rollback, args.seed,
                                      general)
            print(f"[{method}] rollback {rollback}", file=sys.stderr, flush=True)
    hp = getattr(editor, "hp", None)
    import dataclasses

    return {"preset": preset, "hparams": dataclasses.asdict(hp) if hp is not None else None, "rows": rows,
            **({"rollback": rollback} if rollback else {})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lethe:world-decoder")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n", type=int, default=1000, help="edits in the stream")
    parser.add_argument("--batch", type=int, default=50, help="edits per editor call")
    parser.add_argument("--every", type=int, default=100, help="score all edits so far every this many edits")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tune", action="store_true", help="use the tuning stream (the n facts after the evaluation stream)")
    parser.add_argument("--rollback", type=int, default=10, help="edits rolled back (0: none)")
    parser.add_argument("--rollback-at", type=int, default=500)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS / "sequential_editing.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    torch.manual_seed(args.seed)
    from lethe.models import load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    stream, info = stream_requests(loaded, args.n, args.seed, args.tune)
    pairs = streams.untouched_world_facts(stream)

    def general(m):
        return streams.recall(m, pairs)

    original = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    unedited = streams.stream_row(loaded, stream, general)
    print(f"[unedited] {unedited}", file=sys.stderr, flush=True)
    key = args.model.removeprefix("lethe:").replace("-", "_")
    out = Path(args.out)
    methods: dict = {}
    for m in args.methods.split(","):
        methods[m] = run_method(m, loaded, stream, args, general, original)
        result = summary(args, key, info, pairs, unedited, methods, t0)
        if not args.tune:  # after every method, so a long run keeps what it has measured
            write_json(out, {**(json.loads(out.read_text()) if out.is_file() else {}), **result})
    if not args.tune:
        streams.plot_stream({m: r["rows"] for m, r in methods.items()}, out.with_suffix(".png"),
                            title=f"{args.model}: {args.n} sequential edits in batches of {args.batch}",
                            reference={"general": unedited["general"]})
    print(json.dumps(result))
    return result


def summary(args, key, info, pairs, unedited, methods, t0) -> dict:
    return {key: {"model": args.model, "stream": "tuning" if args.tune else "evaluation", "n_edits": args.n,
                    "batch_size": args.batch, "every": args.every, "seed": args.seed, **info,
                    "general_metric": "greedy recall of world facts whose subjects no edit touches",
                    "general_facts": len(pairs), "general_unedited": round(unedited["general"], 4),
                    "unedited": {k: unedited[k] for k in ("efficacy", "paraphrase", "neighborhood")},
                    "methods": methods, "seconds": round(time.perf_counter() - t0, 1),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}


if __name__ == "__main__":
    main()
