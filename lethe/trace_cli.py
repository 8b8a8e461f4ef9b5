"""``lethe trace``: causal tracing of facts, written as heatmap PNGs and a JSON of indirect effects.

One fact::

    lethe trace --model lethe:smollm2 --prompt "The capital of {} is" --subject France --target Paris --out traces/

Many facts, averaged into the paper's Figure-1 view and a suggested edit layer (ROME) / range (MEMIT)::

    lethe trace --model lethe:world-decoder --requests world:train --n 50 --out traces/world

Writes ``<out>/trace_<i>.png`` per fact (up to ``--plot-max``), ``<out>/average.png`` when several
facts are traced, and ``<out>/trace.json`` (per-fact restored probabilities and indirect effects,
the averages, the suggested layers). Every file is written atomically. ``--logger wandb`` also
logs the pictures and the suggestion to a wandb run (honours ``WANDB_MODE=offline``).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from lethe.io import write_json


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="lethe trace", description=__doc__)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML of these options")
    p.add_argument("--model", type=str, required=True, help="hub name, local folder or lethe alias")
    p.add_argument("--prompt", type=str | None, default=None, help="prompt with {} for the subject")
    p.add_argument("--subject", type=str | None, default=None)
    p.add_argument("--target", type=str | None, default=None,
                   help="object to trace (default: the model's own top-1 answer)")
    p.add_argument("--requests", type=str | None, default=None,
                   help="trace many facts: world[:split], real_facts or a CounterFact file (their true objects)")
    p.add_argument("--n", type=int, default=20, help="facts to trace with --requests")
    p.add_argument("--out", type=str, required=True, help="output folder")
    p.add_argument("--kinds", type=str, default="block,mlp,attn", help="comma list of block, mlp, attn")
    p.add_argument("--samples", type=int, default=10, help="noise samples per cell")
    p.add_argument("--noise", type=float | None, default=None,
                   help="noise scale ν (default 3 × subject-embedding std)")
    p.add_argument("--window", type=int | None, default=None, help="layers restored together for mlp/attn")
    p.add_argument("--stack", type=str | None, default=None, help="stack to restore (default: the edited one)")
    p.add_argument("--batch-size", type=int, default=128, help="rows per forward pass")
    p.add_argument("--dtype", type=str, default="float32")
    p.add_argument("--precision", type=str, default="32",
                   help="32, bf16-mixed (bf16 autocast of the corrupted/restored runs) or bf16-true (the model cast to "
                        "bfloat16); see lethe.precision")
    p.add_argument("--device", type=str | None, default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-max", type=int, default=10, help="per-fact heatmaps to draw")
    p.add_argument("--logger", type=str, default="none", help="none or wandb")
    p.add_argument("--project", type=str, default="lethe", help="wandb project")
    return p


def run(args) -> dict:
    import torch
    from tqdm.auto import tqdm

    from lethe import precision as P
    from lethe import tracing
    from lethe.models import load_model

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in tracing.KINDS]
    if bad:
        raise SystemExit(f"lethe trace: unknown --kinds {bad}; choose from {list(tracing.KINDS)}")
    if args.requests:
        facts = _requests(args.requests, args.n)
    else:
        if not args.prompt or not args.subject:
            raise SystemExit("lethe trace: give --prompt and --subject (or --requests for many facts)")
        facts = [(args.prompt, args.subject, args.target)]
    if args.logger not in ("none", "wandb"):
        raise SystemExit(f"lethe trace: --logger must be none or wandb, got {args.logger!r}")

    try:
        precision = P.check(args.precision)
    except ValueError as err:
        raise SystemExit(f"lethe trace: {err}") from None
    loaded = load_model(args.model, dtype=args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = P.prepare_model(loaded.model.to(device), precision)
    noise = args.noise
    if noise is None:
        noise = tracing.embedding_noise_level(model, loaded.tokenizer, [s for _, s, _ in facts], 3.0,
                                              loaded.adapter, loaded.family)
    out = Path(args.out)
    results, t0 = [], time.perf_counter()
    for prompt, subject, target in tqdm(facts, desc="facts", disable=len(facts) == 1):
        with P.autocast(precision, device):
            results.append(tracing.trace_fact(model, loaded.tokenizer, prompt, subject, target, kinds=kinds,
                                              noise=noise, samples=args.samples, window=args.window,
                                              stack=args.stack, batch_size=args.batch_size, seed=args.seed,
                                              adapter=loaded.adapter, family=loaded.family,
                                              progress=len(facts) == 1))
    seconds = time.perf_counter() - t0
    pictures = [tracing.plot_trace(r, out / f"trace_{i}.png") for i, r in enumerate(results[: args.plot_max])]
    summary: dict = {"model": args.model, "family": loaded.family, "precision": precision, "facts": len(results),
                     "noise": noise, "samples": args.samples, "kinds": kinds, "seconds": round(seconds, 2),
                     "mean_clean_p": sum(r.high_score for r in results) / len(results),
                     "mean_corrupted_p": sum(r.low_score for r in results) / len(results)}
    if len(results) > 1 or "mlp" in kinds:
        avg = tracing.average_effects(results, kinds)
        summary["average_effect"] = {k: [[None if math.isnan(v) else round(float(v), 5) for v in row] for row in g.tolist()]
                                     for k, g in avg.items()}
        summary["categories"] = list(tracing.CATEGORIES)
        if "mlp" in avg:
            summary["suggested"] = tracing.suggest_layers(avg, "mlp", window=results[0].window)
        if len(results) > 1:
            pictures.append(tracing.plot_average(avg, out / "average.png",
                                                 title=f"{args.model}: average indirect effect",
                                                 n_facts=len(results)))
    write_json(out / "trace.json", {"summary": summary, "traces": [r.to_dict() for r in results]})
    if args.logger == "wandb":
        import wandb

        run = wandb.init(project=args.project, dir=str(out), name=f"trace-{Path(args.model).name}",
                         config={k: v for k, v in vars(args).items() if k != "config"})
        run.log({p.stem: wandb.Image(str(p)) for p in pictures})
        run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict | list)})
        run.finish()
    return summary


def _requests(source: str, n: int) -> list[tuple[str, str, str]]:
    """(prompt, subject, true object) of the first ``n`` requests of a source (``lethe.sources``)."""
    from lethe.sources import load_requests

    try:
        reqs = load_requests(source, "counterfact", limit=n)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"lethe trace: --requests {source}: {err}") from err
    return [(r.prompt, r.subject, r.target_true) for r in reqs]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    summary = run(args)
    print(f"traced {summary['facts']} fact(s) in {summary['seconds']} s; clean P {summary['mean_clean_p']:.3f}, "
          f"corrupted P {summary['mean_corrupted_p']:.3f}; wrote {args.out}/trace.json")
    if "suggested" in summary:
        s = summary["suggested"]
        print(f"suggested edit layer (peak MLP effect at the subject's last token): {s['rome_layer']}; "
              f"MEMIT range: {s['memit_layers']}")
