"""ROME benchmark: N single edits, each on the original model (restored by reverting the artifact), scored
with the CounterFact and token-accuracy protocols, against constrained fine-tuning of the same layer
(ROME paper's FT-L: Adam steps on the target NLL of the rewrite prompt, the weight delta clamped to an
L∞ ball after every step) run in the same process on the same requests.

    python benchmarks/editing.py --method rome                                  # world decoder, 50 edits
    python benchmarks/editing.py --method rome --model lethe:world-mlm
    python benchmarks/editing.py --method rome --model lethe:smollm2            # real facts

Requests: the world's CounterFact cases (``world:train``) for world models, ``real_facts`` otherwise;
only cases the unedited model gets right (P(true) > P(new)) are kept, as an edit of a fact the model
does not know measures nothing; the JSON line says how many were skipped.
Covariance corpus: the world's training text for world models (their own distribution); for real
models TOFU + Python's documentation topics ("tofu+pydoc"), natural English available offline.
Peak memory: each precision's own peak RSS (``hardware.PeakRSS``), and the largest over the run. Nothing
traces allocations inside a timed region (tracemalloc slowed the edits by ~15 %).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lethe import evaluation as ev
from lethe.edits import EditArtifact, fingerprint
from lethe.ft import ft_constrained
from lethe.models import load_model

# The SmolLM2 run beside the embedded decoder (benchmarks/editing.py): real facts, its own preset.
SMOLLM2_ARGS = {"n": 20, "preset": None, "layer": None, "requests": None, "set": "{}", "mom2_n": None}


def add_common_arguments(parser: argparse.ArgumentParser, method: str, ft_help: str) -> None:
    """The options the ROME and MEMIT benchmarks share."""
    parser.add_argument("--model", default="lethe:world-decoder")
    parser.add_argument("--preset", default=None,
                        help=f"preset file or name under configs/ (default: configs/edit/{method}_<model>.yaml)")
    parser.add_argument("--mom2-n", type=int, default=None, help="covariance sample count (texts)")
    parser.add_argument("--requests", default=None, help="world:train, real_facts or a CounterFact file")
    parser.add_argument("--ft-lr", type=float, default=1e-2)
    parser.add_argument("--ft-eps", type=float, default=5e-2, help=ft_help)
    parser.add_argument("--no-ft", action="store_true")
    parser.add_argument("--cache-dir", default=None, help="covariance cache (default: lethe's cache)")
    parser.add_argument("--precision", default="32,bf16-mixed",
                        help="comma list of precisions to edit in (32, bf16-mixed); each gets its own row with "
                             "seconds_per_edit and mfu (FLOP/s over this process's measured matmul rate)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "rome", "L-inf bound on FT-L's weight delta (as MEMIT's)")
    parser.add_argument("--n", type=int, default=50, help="number of single edits")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--ft-steps", type=int, default=10)
    parser.add_argument("--set", default="{}", help='JSON of ROME hyperparameter overrides, e.g. \'{"v_steps": 40}\'')


def _scores(loaded, req, pre_loc) -> dict:
    cf = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, [req])
    ta = ev.token_accuracy_scores(loaded.model, loaded.tokenizer, loaded.family, [req], pre_loc)
    return {"efficacy": cf["efficacy"], "paraphrase": cf["paraphrase"], "neighborhood": cf["neighborhood"],
            "efficacy_acc": ta["efficacy_acc"], "paraphrase_acc": ta["paraphrase_acc"], "locality": ta["locality"]}


def _mean(rows: list[dict], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def _summary(rows: list[dict], seconds: list[float]) -> dict:
    out = {k: _mean(rows, k) for k in ("efficacy", "paraphrase", "neighborhood")}
    out["token_accuracy"] = {k: _mean(rows, k) for k in ("efficacy_acc", "paraphrase_acc", "locality")}
    out["seconds_per_edit"] = round(sum(seconds) / max(1, len(seconds)), 4)
    return out


def single_edits(loaded, editor, reqs) -> tuple[list[dict], list[float]]:
    """Each request edited alone on the original model (reverted after scoring): scores and seconds per edit."""
    rows, secs = [], []
    for req in reqs:
        pre_loc = ev.locality_reference(loaded.model, loaded.tokenizer, loaded.family, [req])
        t = time.perf_counter()
        art = editor.edit(loaded, [req])
        secs.append(time.perf_counter() - t)
        rows.append(_scores(loaded, req, pre_loc))
        art.revert(loaded.model)
    return rows, secs


def edits_by_precision(loaded, editor, reqs, precisions: list[str], flop_sample: int = 3) -> list[dict]:
    """The same single edits under each precision: scores, seconds per edit and MFU. FLOPs are counted by
    replaying the first ``flop_sample`` edits under torch's FLOP counter (untimed); MFU is their FLOPs over
    their timed seconds, as a share of this process's matmul rate for that precision."""
    from hardware import PeakRSS, count_flops, matmul_rates, mfu

    from lethe.precision import autocast, check

    rates = matmul_rates(next(loaded.model.parameters()).device)
    out = []
    for prec in precisions:
        prec = check(prec)
        with PeakRSS() as rss, autocast(prec, next(loaded.model.parameters()).device):
            rows, secs = single_edits(loaded, editor, reqs)
            flops = 0
            for req in reqs[:flop_sample]:
                art, f = count_flops(lambda req=req: editor.edit(loaded, [req]))
                art.revert(loaded.model)
                flops += f
        k = min(flop_sample, len(secs))
        out.append({"precision": prec, **_summary(rows, secs),
                    "gflop_per_edit": round(flops / max(1, k) / 1e9, 2),
                    "mfu": mfu(flops, sum(secs[:k]), rates, prec), "peak_rss_mb": rss.mb, "matmul_rates": rates})
    return out


def ft_l_edit(loaded, req, param: torch.nn.Parameter, steps: int, lr: float, eps: float) -> None:
    """FT-L: ``steps`` Adam steps on the target NLL of one rewrite prompt, only ``param`` trained, and
    ‖ΔW‖∞ ≤ eps enforced after each step."""
    ft_constrained(loaded, [req], [param], steps, lr, eps, batch_size=1)


def run(args) -> dict:
    from lethe.rome import ROMEEditor
    from lethe.sources import load_requests

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    loaded = load_model(args.model)
    model, tok, family = loaded.model, loaded.tokenizer, loaded.family
    from lethe.presets import editor_preset

    preset, hparams = editor_preset("rome", args.model, args.preset)
    overrides = {**json.loads(args.set), "layer": args.layer, "mom2_n_samples": args.mom2_n}
    if args.quick:
        overrides.setdefault("mom2_n_samples", None)
        overrides["mom2_n_samples"] = overrides["mom2_n_samples"] or 500
    editor = ROMEEditor(hparams, cache_dir=args.cache_dir, progress=sys.stderr.isatty(),
                        overrides={k: v for k, v in overrides.items() if v is not None})
    source = args.requests or ("world:train" if args.model.startswith("lethe:world") else "real_facts")
    n = 5 if args.quick else args.n
    candidates = load_requests(source)
    # keep facts the unedited model knows; look at a few more than needed
    pool = candidates[: max(4 * n, n + 20)]
    known = ev.counterfact_scores(model, tok, family, pool)["efficacy_per_case"]
    reqs = [r for r, e in zip(pool, known) if e == 0.0][:n]

    layer = loaded.adapter.check_layer(model, editor.hp.layer, editor.hp.stack)
    t0 = time.perf_counter()
    editor.covariance(loaded, layer)
    cov_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    editor.prefixes(loaded)
    prefix_s = time.perf_counter() - t0

    pname = loaded.adapter.mlp_out_name(layer, editor.hp.stack) + ".weight"
    param = dict(model.named_parameters())[pname]
    fp0 = fingerprint(param)
    precisions = edits_by_precision(loaded, editor, reqs, args.precision.split(","))
    revert_exact = fingerprint(param) == fp0

    ft_rows, ft_s = [], []
    if not args.no_ft:
        for req in reqs:
            pre_loc = ev.locality_reference(model, tok, family, [req])
            before = EditArtifact.snapshot(model, [pname])
            t = time.perf_counter()
            ft_l_edit(loaded, req, param, args.ft_steps, args.ft_lr, args.ft_eps)
            ft_s.append(time.perf_counter() - t)
            ft_rows.append(_scores(loaded, req, pre_loc))
            with torch.no_grad():
                param.copy_(before[pname])

    first = precisions[0]
    rome = {k: v for k, v in first.items() if k != "matmul_rates"}  # the first precision's row, at the top level
    result = {
        "model": args.model,
        "family": family,
        "protocol": "counterfact (efficacy/paraphrase/neighborhood) + token_accuracy",
        "n_edits": len(reqs),
        "skipped_unknown_facts": len(pool) - sum(1 for e in known if e == 0.0),
        "layer": layer,
        "stack": editor.hp.stack or loaded.adapter.default_stack,
        "preset": preset,
        "covariance_corpus": editor.hp.mom2_corpus if isinstance(editor.hp.mom2_corpus, str) else "texts",
        "covariance_samples": editor.hp.mom2_n_samples,
        **{k: v for k, v in rome.items()},
        "covariance_seconds": round(cov_s, 2),
        "context_prefix_seconds": round(prefix_s, 2),
        "peak_rss_mb": max(p["peak_rss_mb"] for p in precisions),
        "revert_exact": revert_exact,
        "by_precision": precisions,
    }
    if ft_rows:
        ft = _summary(ft_rows, ft_s)
        ft.update(steps=args.ft_steps, lr=args.ft_lr, linf_eps=args.ft_eps)
        result["ft_l"] = ft
        result["rome_seconds_over_ft"] = round(rome["seconds_per_edit"] / max(ft["seconds_per_edit"], 1e-9), 2)
    return result
