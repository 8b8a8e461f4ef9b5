"""Lifelong editing benchmark: one stream of edits, batch after batch, for ROME, MEMIT, AlphaEdit and FT-L.

    python benchmarks/sequential_editing.py                          # both models (world decoder, then SmolLM2)
    python benchmarks/sequential_editing.py --models lethe:smollm2 --methods alphaedit,memit   # more methods
    python benchmarks/sequential_editing.py --models lethe:smollm2 --methods alphaedit --tune   # tuning stream

By default the world decoder runs every method (with the rollback probe) and SmolLM2 runs AlphaEdit alone
(~45 min here; the world decoder ~5 min), so the whole benchmark fits in an hour on a 2-core CPU.

Streams, per model (``SETUPS``):

- world decoder: 1000 of the world's CounterFact cases (``world:train``, shuffled with ``--seed``) in batches
  of 50; general ability = greedy recall of up to 400 world facts whose subjects no edit of the stream touches
  (``general``, at each fact's first training phrasing) and of the same facts at their held-out paraphrases
  (``general_paraphrase``: phrasings never trained on, which no preserved set holds).
- SmolLM2: 500 counterfactual edits of real subjects from lethe's fact bank (``fact_bank``, every split: 725
  facts generated from templates over 553 subjects and 16 relations, kept only where SmolLM2 prefers the true
  object) in batches of 50, edited in bf16 autocast; general ability = perplexity of 100 held-out Python-doc
  passages (``general``; the covariance's corpus takes the first 200, these are the last 100) and greedy recall
  of the bank's facts whose subjects no edit touches (``fact_recall``).

In both, only facts the unedited model knows (P(true) > P(new)) are used, taken round-robin over relations; the
evaluation stream is the first ``--n`` of them (at most the model's stream length), the tuning stream (``--tune``,
where hyperparameters are chosen) ``--n`` of the facts after the model's whole evaluation stream (1000 world facts,
500 SmolLM2 facts), so no reported fact was used to choose a value. Neighbourhood prompts the unedited model
gets wrong hold no knowledge to keep and are dropped once, up front; a neighbour about a subject the stream has
already edited for the same relation is left out and counted (``lethe.streams``).

Every ``--every`` edits, all edits so far are scored: ``efficacy``, ``paraphrase``, ``neighborhood``
(CounterFact protocol), ``general`` (and ``general_paraphrase`` on the world decoder, ``fact_recall`` on
SmolLM2; the unedited model's values are
``general_unedited`` / ``unedited``) and ``seconds`` (editing time so far, without the evaluations). Each method
starts from the unedited weights and uses its preset (``configs/edit/<method>_{decoder,smollm2}.yaml``).

Rollback (``--rollback K --rollback-at N``, AlphaEdit, MEMIT and ROME): after N edits, K edits chosen at random
(seeded) are rolled back from the running artifact (``EditArtifact.rollback``); the JSON reports the share
of those facts whose true object wins again, the other edits' efficacy, and general ability, then the
stream continues from the weights before the rollback. ``rollback.repaired`` holds the same figures for the
same edits rolled back with ``repair=True`` (``EditArtifact.rollback``: the remaining edits' change at the
rolled-back keys undone by a least-squares correction that holds the remaining edits' keys).

Writes ``benchmarks/results/sequential_editing.json`` (one block per model, written after every method) and
``sequential_editing.png`` / ``sequential_editing_smollm2.png`` (the curves).
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
from lethe.precision import autocast
from lethe.presets import editor_preset

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("alphaedit", "memit", "ft", "rome")  # ROME, the slowest, last


# per model: the requests, the stream length, the editing precision, what general ability is
SETUPS = {
    "lethe:world-decoder": {"source": "world:train", "n": 1000, "precision": "32", "methods": ",".join(METHODS),
                            "rollback": 10,
                            "general_metric": "greedy recall of world facts whose subjects no edit touches"},
    # AlphaEdit alone by default (~45 min here); ROME, MEMIT and FT-L on this stream: --methods
    "lethe:smollm2": {"source": "fact_bank", "n": 500, "precision": "bf16-mixed", "methods": "alphaedit",
                      "rollback": 0,
                      "general_metric": "perplexity of 100 held-out Python-doc passages (fact_recall: greedy recall "
                                        "of the bank's facts whose subjects no edit touches)"},
}


def stream_requests(loaded, source: str, n: int, seed: int, tune: bool, evaluation_n: int) -> tuple[list, list, dict]:
    """(stream, every known fact, info): the evaluation stream (the first ``n`` known facts) or the tuning stream
    (the ``n`` after the model's ``evaluation_n``-fact evaluation stream, so the two never share a fact)."""
    from editing_memit import spread_over_relations

    from lethe.sources import load_requests

    pool = load_requests(source, seed=seed)
    known = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, pool)["efficacy_per_case"]
    usable = spread_over_relations([r for r, e in zip(pool, known) if e == 0.0])
    if not tune and n > evaluation_n:
        raise SystemExit(f"--n {n}: the evaluation stream has at most {evaluation_n} edits here; the known facts "
                         f"after those are the tuning stream")
    stream = usable[evaluation_n:evaluation_n + n] if tune else usable[:n]  # tuning: may be shorter (the facts left)
    if len(stream) < (1 if tune else n):
        raise SystemExit(f"only {len(stream)} known facts for a stream of {n} ({source} has {len(usable)})")
    stream, unknown = ev.known_neighbours_only(loaded.model, loaded.tokenizer, loaded.family, stream)
    return (streams.check_stream(stream, 1), usable,
            {"source": source, "known_facts": len(usable), "neighbour_prompts_unknown_left_out": unknown})


def general_for(model: str, stream: list, usable: list):
    """(general-ability function, what it scores) for a model's stream (module docstring)."""
    if model == "lethe:smollm2":
        from lethe.covariance import pydoc_texts

        texts = pydoc_texts()[-100:]
        facts = streams.untouched_facts(usable, stream)

        def general(m):
            return {"general": streams.perplexity(m, texts), "fact_recall": streams.recall(m, facts)}

        return general, {"general_texts": len(texts), "general_facts": len(facts)}
    pairs = streams.untouched_world_facts(stream)
    held = streams.untouched_world_paraphrases(stream)

    def general(m):
        return {"general": streams.recall(m, pairs), "general_paraphrase": streams.recall(m, held)}

    return general, {"general_facts": len(pairs), "general_paraphrase_prompts": len(held)}


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
    others = [r for r in edits if r.case_id not in set(ids)]

    def probe(repair: bool) -> dict:
        t = time.perf_counter()
        left = total.rollback(loaded.model, total.find(ids), repair=repair)
        secs = time.perf_counter() - t
        back = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, [edits[i] for i in chosen])
        rest = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, others)
        row = {"rows_rolled_back": len(total.requests) - len(left.requests),
               # the unedited model preferred each true object: efficacy 0 = all of them restored
               "restored_share": round(1.0 - back["efficacy"], 4),
               "others_efficacy": round(rest["efficacy"], 4), "others_paraphrase": round(rest["paraphrase"], 4),
               **{g: round(v, 4) for g, v in streams.general_scores(general, loaded).items()},
               "seconds": round(secs, 3)}
        with torch.no_grad():
            for n, t0 in saved.items():
                params[n].copy_(t0)
        return row

    out = {"n_edits": len(edits), "rolled_back": k, "rolled_back_case_ids": ids, **probe(False)}
    if all("k" in f for f in total.factors.values()):
        out["repaired"] = probe(True)  # EditArtifact.rollback(repair=True): the remaining edits' leak undone
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
        with autocast(args.precision):
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

    # AlphaEdit: layer -> [null-space dimension, key dimension, largest eigenvalue of C] at the last call
    null = {"null_space": {str(k): v for k, v in editor.null_space_dims.items()}} if hasattr(editor, "null_space_dims") else {}
    return {"preset": preset, "hparams": dataclasses.asdict(hp) if hp is not None else None, "rows": rows, **null,
            **({"rollback": rollback} if rollback else {})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SETUPS), help=f"comma list of {', '.join(SETUPS)}")
    parser.add_argument("--methods", default=None,
                        help="comma list of " + ", ".join(METHODS) + " (default: every one on the world decoder, "
                             "alphaedit on SmolLM2, so both models fit in an hour here)")
    parser.add_argument("--n", type=int, default=None, help="edits in the stream (default: the model's, SETUPS)")
    parser.add_argument("--batch", type=int, default=50, help="edits per editor call")
    parser.add_argument("--every", type=int, default=100, help="score all edits so far every this many edits")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tune", action="store_true", help="use the tuning stream (the n facts after the evaluation stream)")
    parser.add_argument("--rollback", type=int, default=None,
                        help="edits rolled back (0: none; default: 10 on the world decoder, 0 on SmolLM2)")
    parser.add_argument("--rollback-at", type=int, default=500)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS / "sequential_editing.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    out = Path(args.out)
    result: dict = {}
    for model in args.models.split(","):
        if model not in SETUPS:
            raise SystemExit(f"--models: unknown model {model!r} (known: {', '.join(SETUPS)})")
        result.update(run_model(model, args, out))
    print(json.dumps(result))
    return result


def run_model(model: str, args, out: Path) -> dict:
    from lethe.models import load_model

    setup = SETUPS[model]
    margs = argparse.Namespace(**{**vars(args), "model": model, "n": args.n or setup["n"],
                                  "precision": setup["precision"], "methods": args.methods or setup["methods"],
                                  "rollback": setup["rollback"] if args.rollback is None else args.rollback})
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    loaded = load_model(model)
    stream, usable, info = stream_requests(loaded, setup["source"], margs.n, args.seed, args.tune, setup["n"])
    general, general_info = general_for(model, stream, usable)
    info.update(general_info, general_metric=setup["general_metric"], precision=setup["precision"])
    from lethe.world_models import world_builds

    if builds := world_builds([model]):  # world models: which build (weights fingerprint) the stream ran on
        info["world_build"] = builds
    original = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    unedited = streams.stream_row(loaded, stream, general)
    print(f"[{model} unedited] {unedited}", file=sys.stderr, flush=True)
    key = model.removeprefix("lethe:").replace("-", "_")
    methods: dict = {}
    result: dict = {}
    for m in margs.methods.split(","):
        methods[m] = run_method(m, loaded, stream, margs, general, original)
        result = summary(margs, key, info, unedited, methods, t0)
        if not args.tune:  # after every method, so a long run keeps what it has measured
            write_json(out, {**(json.loads(out.read_text()) if out.is_file() else {}), **result})
    png = out.with_suffix(".png") if key == "world_decoder" else out.with_name(f"{out.stem}_{key}.png")
    if not args.tune:
        streams.plot_stream({m: r["rows"] for m, r in methods.items()}, png,
                            title=f"{model}: {margs.n} sequential edits in batches of {args.batch}",
                            reference={k: unedited[k] for k in ("general", "general_paraphrase", "fact_recall")
                                       if k in unedited})
    return result


def summary(args, key, info, unedited, methods, t0) -> dict:
    extra = {k: round(unedited[k], 4) for k in ("fact_recall", "general_paraphrase") if k in unedited}
    return {key: {"model": args.model, "stream": "tuning" if args.tune else "evaluation", "n_edits": args.n,
                  "batch_size": args.batch, "every": args.every, "seed": args.seed, **info,
                  "general_unedited": round(unedited["general"], 4),
                  "unedited": {**{k: unedited[k] for k in ("efficacy", "paraphrase", "neighborhood")}, **extra},
                  "methods": methods, "seconds": round(time.perf_counter() - t0, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}


if __name__ == "__main__":
    main()
