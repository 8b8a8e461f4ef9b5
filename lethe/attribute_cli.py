"""``lethe attribute --config configs/neurons/<family>.yaml``: Knowledge-Neurons attribution per fact.

For each fact (a CounterFact-form request: its rewrite prompt and paraphrases, attributed to its TRUE
object) the run folder ``<run.root>/<run.name>/facts/<case>/`` receives, atomically:
``scores.safetensors`` (per stack: prompts x layers x neurons), ``neurons.json`` (coarse neurons per
prompt, refined neurons, probabilities, settings) and ``heatmap.png`` (layer x neuron, mean score over
the prompts, one panel per stack); ``summary.json`` lists every fact. Heatmaps and counts are logged
to wandb when ``run.logger`` includes wandb (CSV otherwise).

Facts come from ``world[:split]`` (lethe's synthetic world), ``real_facts`` (the SmolLM2 set) or a
CounterFact/zsRE file; ``limit``/``offset`` take a slice.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="lethe attribute", description=__doc__)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--model", type=str, default="lethe:world-decoder", help="hub name, folder or lethe: alias")
    p.add_argument("--dtype", type=str, default="float32")
    p.add_argument("--precision", type=str, default="32",
                   help="32, bf16-mixed (bf16 autocast of the integrated-gradient passes) or bf16-true (the model cast "
                        "to bfloat16); see lethe.precision")
    p.add_argument("--data.source", type=str, default="world:train", help="world[:split], real_facts or a file")
    p.add_argument("--data.kind", type=str, default="counterfact")
    p.add_argument("--data.limit", type=int | None, default=5)
    p.add_argument("--data.offset", type=int, default=0)
    p.add_argument("--attribution.layers", type=list[int] | None, default=None, help="null = every layer")
    p.add_argument("--attribution.stacks", type=list[str] | None, default=None, help="null = every stack")
    p.add_argument("--attribution.steps", type=int, default=20)
    p.add_argument("--attribution.threshold", type=float, default=0.2, help="t: keep score > t x max")
    p.add_argument("--attribution.share", type=float, default=0.5, help="p: keep if in >= p of the prompts")
    p.add_argument("--attribution.max_prompts", type=int | None, default=4)
    p.add_argument("--attribution.max_rows", type=int | None, default=256)
    p.add_argument("--run.name", type=str | None, default=None)
    p.add_argument("--run.root", type=str, default="runs")
    p.add_argument("--run.logger", type=str, default="csv")
    p.add_argument("--run.project", type=str, default="lethe")
    return p


def load_facts(source: str, kind: str = "counterfact", limit: int | None = None, offset: int = 0) -> list:
    from lethe.sources import load_requests

    return load_requests(source, kind, limit, offset)


def heatmap(fa, dest: Path, title: str = "") -> Path:
    """Layer x neuron heatmap of the mean attribution (one panel per stack), refined neurons circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lethe.io import save_png

    stacks = list(fa.scores)
    fig, axes = plt.subplots(len(stacks), 1, figsize=(10, 1.2 + 0.45 * sum(len(fa.layers[s]) for s in stacks)),
                             squeeze=False)
    for ax, stack in zip(axes[:, 0], stacks):
        mean = fa.scores[stack].mean(0).float().numpy()
        lim = max(abs(mean).max(), 1e-12)
        im = ax.imshow(mean, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_yticks(range(len(fa.layers[stack])), [str(x) for x in fa.layers[stack]])
        ax.set_ylabel(f"{stack} layer")
        ax.set_xlabel("FFN neuron")
        pos = {layer: i for i, layer in enumerate(fa.layers[stack])}
        pts = [(n.index, pos[n.layer]) for n in fa.refined if n.stack == stack]
        if pts:
            ax.scatter(*zip(*pts), s=40, facecolors="none", edgecolors="k", linewidths=1.0)
        fig.colorbar(im, ax=ax, label="IG attribution")
    axes[0, 0].set_title(title or f"{fa.target}")
    return save_png(fig, dest)


def main(argv: list[str] | None = None) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from lethe import attribution as A
    from lethe import precision as P
    from lethe.cli import make_loggers
    from lethe.io import atomic_path, write_json
    from lethe.models import load_model

    cfg = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    name = cfg.run.name or (Path(str(cfg.config[-1])).stem if cfg.get("config") else "attribute")
    run_dir = Path(cfg.run.root) / name
    facts = load_facts(cfg.data.source, cfg.data.kind, cfg.data.limit, cfg.data.offset)
    try:
        precision = P.check(cfg.precision)
    except ValueError as err:
        raise SystemExit(f"lethe attribute: {err}") from None
    loaded = load_model(cfg.model, dtype=cfg.dtype)
    P.prepare_model(loaded.model, precision)
    at = cfg.attribution
    A.resolve_sites(loaded.model, at.layers, at.stacks, loaded.adapter)  # bad layers fail before any work
    loggers = make_loggers(cfg.run.logger, run_dir, name, cfg.run.project) or []
    summary, n_prompts, t0 = [], 0, time.perf_counter()
    for i, req in enumerate(tqdm(facts, desc="attribute")):
        prompts = [req.rewrite_prompt, *req.paraphrase_prompts][: at.max_prompts or None]
        with P.autocast(precision, next(loaded.model.parameters()).device):
            fa = A.attribute(loaded.model, loaded.tokenizer, loaded.family, prompts, req.target_true, at.layers,
                             at.stacks, at.steps, at.threshold, at.share, at.max_rows, adapter=loaded.adapter)
        n_prompts += len(prompts)
        case = str(req.case_id if req.case_id is not None else i)
        with atomic_path(run_dir / "facts" / case, is_dir=True) as tmp:
            save_file({s: t.float().contiguous() for s, t in fa.scores.items()}, str(tmp / "scores.safetensors"))
            (tmp / "neurons.json").write_text(json.dumps(
                {"case_id": req.case_id, "subject": req.subject, "relation": req.relation, **fa.to_json()},
                indent=1) + "\n")
            heatmap(fa, tmp / "heatmap.png", f"{req.rewrite_prompt} -> {req.target_true}")
        row = {"case_id": req.case_id, "relation": req.relation, "target": req.target_true,
               "n_refined": len(fa.refined), "n_coarse_mean": sum(map(len, fa.coarse)) / len(fa.coarse),
               "p_true": sum(fa.probs) / len(fa.probs), "refined": [n.to_list() for n in fa.refined]}
        summary.append(row)
        for lg in loggers:
            lg.log_metrics({"n_refined": row["n_refined"], "n_coarse_mean": row["n_coarse_mean"],
                            "p_true": row["p_true"]}, step=i)
            if hasattr(lg, "log_image"):
                lg.log_image(key=f"heatmap/{case}", images=[str(run_dir / "facts" / case / "heatmap.png")],
                             step=i)
    seconds = time.perf_counter() - t0
    result = {"model": cfg.model, "precision": precision, "facts": len(facts), "prompts": n_prompts, "seconds": seconds,
              "prompts_per_s": n_prompts / seconds, "facts_detail": summary}
    write_json(run_dir / "summary.json", result)
    for lg in loggers:
        lg.log_metrics({"prompts_per_s": result["prompts_per_s"]})
        lg.finalize("success")
    print(json.dumps({k: v for k, v in result.items() if k != "facts_detail"}))
    return result


if __name__ == "__main__":
    main()
