"""MEMIT benchmark: many facts in ONE call, against constrained fine-tuning of the same layers.

    python benchmarks/editing.py --method memit                                  # world decoder, 100 and 1000 edits
    python benchmarks/editing.py --method memit --model lethe:smollm2 --n 100    # real facts
    python benchmarks/editing.py --method memit --model lethe:world-mlm --n 100

Requests: the world's CounterFact cases (``world:train``) for world models, ``real_facts`` otherwise;
only facts the unedited model knows (P(true) > P(new)) are edited, taken round-robin over relations so
that every relation keeps unedited subjects whose prompts can show bleed. With many edits in one batch,
a neighbourhood prompt whose subject is itself edited for the same relation would be *meant* to change,
and one the unedited model already gets wrong holds no knowledge to keep; both kinds are left out of
the neighbourhood score (the JSON counts each, and reports the unedited model's scores on the same
prompts as ``unedited``).

Baseline ("ft"): plain constrained fine-tuning of the same MLP output projections MEMIT edits, on all
rewrite prompts at once (Adam, ``--ft-epochs`` over minibatches, ‖ΔW‖∞ ≤ ``--ft-eps`` after each
step), run in the same process on the same requests. Scores use the CounterFact protocol.
Peak memory: each precision's own peak RSS (``hardware.PeakRSS``: the high-water mark is reset before the
call, so a bf16 run is not charged with the fp32 run before it), the process's peak, and on CUDA
``torch.cuda.max_memory_allocated``. Nothing traces allocations inside a timed region (tracemalloc slowed
the edits by ~15 %).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lethe import evaluation as ev
from lethe.edits import EditArtifact, fingerprint

# The SmolLM2 run beside the embedded decoder (benchmarks/editing.py): 100 real facts in one call.
SMOLLM2_ARGS = {"n": "100", "preset": None, "layers": None, "lam": None, "position": None, "mom2_n": None,
                "requests": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from editing_rome import add_common_arguments

    add_common_arguments(parser, "memit", "L∞ bound on FT's weight delta")
    parser.add_argument("--n", default=None, help="edits per batch, comma list (default: 100,1000 on the world)")
    parser.add_argument("--layers", default=None, help="edited layers, comma list (default: the preset's)")
    parser.add_argument("--lam", type=float, default=None, help="mom2_update_weight λ")
    parser.add_argument("--position", default=None, help="subject_last or prompt_last")
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--device", default=None)


def _load(name: str, device: str):
    from lethe.models import load_model

    loaded = load_model(name)
    loaded.model.to(device)
    return loaded


def spread_over_relations(reqs: list) -> list:
    """``reqs`` reordered round-robin over relations (first of each relation, then second, ...), so any
    prefix edits a share of every relation instead of whole relations."""
    by: dict[str | None, list] = {}
    for r in reqs:
        by.setdefault(r.relation, []).append(r)
    out: list = []
    for i in range(max((len(v) for v in by.values()), default=0)):
        out += [v[i] for v in by.values() if i < len(v)]
    return out


def _scores(loaded, reqs) -> dict:
    cf = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, reqs)
    return {k: (round(cf[k], 4) if cf[k] is not None else None) for k in ("efficacy", "paraphrase", "neighborhood")}


def _mb(x: float) -> float:
    return round(x / 2**20, 1)


def run(args) -> dict:
    from hardware import PeakRSS, count_flops, matmul_rates, mfu

    from lethe.ft import ft_constrained
    from lethe.locate_edit import optimise_values
    from lethe.memit import MEMITEditor
    from lethe.precision import autocast, check
    from lethe.sources import load_requests

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    loaded = _load(args.model, device)
    model, tok, family = loaded.model, loaded.tokenizer, loaded.family
    from lethe.presets import editor_preset

    preset, hparams = editor_preset("memit", args.model, args.preset)
    world = args.model.startswith("lethe:world")
    sizes = [int(x) for x in (args.n or ("100,1000" if world else "100")).split(",")]
    if args.quick:
        sizes = [min(sizes[0], 10)]
    overrides = {"layers": [int(x) for x in args.layers.split(",")] if args.layers else None,
                 "mom2_update_weight": args.lam, "position": args.position, "mom2_n_samples": args.mom2_n}
    if args.quick:
        overrides["mom2_n_samples"] = overrides["mom2_n_samples"] or 500
    editor = MEMITEditor(hparams, cache_dir=args.cache_dir, progress=sys.stderr.isatty(),
                         overrides={k: v for k, v in overrides.items() if v is not None})
    hp = editor.hp
    source = args.requests or ("world:train" if world else "real_facts")
    pool = load_requests(source)
    known = ev.counterfact_scores(model, tok, family, pool)["efficacy_per_case"]
    usable = spread_over_relations([r for r, e in zip(pool, known) if e == 0.0])
    t0 = time.perf_counter()
    layers = editor.validate(loaded, usable[:1])
    for layer in layers:
        editor.covariance(loaded, layer)
    cov_s = time.perf_counter() - t0
    editor.prefixes(loaded)
    names = [loaded.adapter.mlp_out_name(layer, hp.stack) + ".weight" for layer in layers]
    params = [dict(model.named_parameters())[n] for n in names]
    fps = [fingerprint(p) for p in params]

    precisions = [check(p) for p in args.precision.split(",")]
    rates = matmul_rates(device)
    runs = []
    for n in sizes:
        reqs, dropped = ev.without_edited_neighbours(usable[:n])
        reqs, unknown = ev.known_neighbours_only(loaded.model, loaded.tokenizer, loaded.family, reqs)
        row: dict = {"n_edits": len(reqs), "neighbour_prompts_left_out": dropped,
                     "neighbour_prompts_unknown_left_out": unknown,
                     "neighbour_prompts_scored": sum(len(r.neighborhood_prompts) for r in reqs),
                     "unedited": _scores(loaded, reqs)}
        row["by_precision"] = []
        for prec in precisions:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as rss:
                t = time.perf_counter()
                with autocast(prec, device):
                    art = editor.edit(loaded, reqs)
                secs = time.perf_counter() - t
            stats = editor.last_stats
            out = {"precision": prec, **_scores(loaded, reqs), "seconds": round(secs, 2),
                   "seconds_per_edit": round(secs / len(reqs), 4), "z_seconds": round(stats["z_seconds"], 2),
                   "z_final_nll_mean": round(stats["z_final_nll_mean"], 4),
                   "residual_left": round(stats["residual_left"], 4),
                   # this call's own peak (the high-water mark was reset before it, where the OS allows)
                   "peak_rss_mb": rss.mb, "peak_rss_phase_only": rss.phase_only}
            if torch.cuda.is_available():
                out["cuda_peak_mb"] = _mb(torch.cuda.max_memory_allocated())
            art.revert(model)
            # MFU of the value optimisation: its first z batch replayed (untimed) under the FLOP counter, over the
            # seconds that batch took in the timed run
            first = reqs[:hp.z_batch_size]
            with autocast(prec, device):
                _, flops = count_flops(lambda first=first: optimise_values(
                    model, tok, family, first, loaded.adapter.block_name(layers[-1], hp.stack), hp,
                    editor.prefixes(loaded)))
            out["z_gflop_first_batch"] = round(flops / 1e9, 1)
            out["mfu"] = mfu(flops, stats["z_batch_seconds"][0], rates, prec)
            row["by_precision"].append(out)
        row["memit"] = {k: v for k, v in row["by_precision"][0].items()}  # the first precision, as before
        row["revert_exact"] = [fingerprint(p) for p in params] == fps
        if not args.no_ft:
            before = EditArtifact.snapshot(model, names)
            with PeakRSS() as rss:
                t = time.perf_counter()
                ft_constrained(loaded, reqs, params, args.ft_epochs, args.ft_lr, args.ft_eps, seed=args.seed)
                secs = time.perf_counter() - t
            row["ft"] = {**_scores(loaded, reqs), "seconds": round(secs, 2),
                         "seconds_per_edit": round(secs / len(reqs), 4), "peak_rss_mb": rss.mb,
                         "epochs": args.ft_epochs, "lr": args.ft_lr, "linf_eps": args.ft_eps}
            with torch.no_grad():
                for p, name in zip(params, names):
                    p.copy_(before[name])
            row["memit_seconds_over_ft"] = round(row["memit"]["seconds"] / max(row["ft"]["seconds"], 1e-9), 2)
        runs.append(row)
        print(f"[memit] {row}", file=sys.stderr, flush=True)

    return {
        "model": args.model, "family": family, "protocol": "counterfact", "preset": preset, "layers": layers,
        "stack": hp.stack or loaded.adapter.default_stack, "position": hp.position,
        "mom2_update_weight": hp.mom2_update_weight, "clamp_norm_factor": hp.clamp_norm_factor,
        "covariance_corpus": hp.mom2_corpus if isinstance(hp.mom2_corpus, str) else "texts",
        "covariance_samples": hp.mom2_n_samples, "covariance_seconds": round(cov_s, 2),
        "known_facts": len(usable), "requests_source": source, "device": device,
        "matmul_rates": rates, "runs": runs,
        "peak_rss_mb": max([o["peak_rss_mb"] for r in runs for o in r["by_precision"]]
                           + [r["ft"]["peak_rss_mb"] for r in runs if "ft" in r]),
    }
