"""``lethe evaluate``: is the knowledge gone, or only hidden? Membership inference and recovery attacks.

    lethe evaluate --model runs/smollm2_npo --suite tofu --forget-split forget01 --tofu-subset cpu20 \\
        --reference lethe:smollm2-tofu-cpu20-retain --out evals/npo
    lethe evaluate --model my-model --suite files --forget forget.jsonl --holdout unseen.jsonl --kind text --out evals/x

The model is a hub name, a local folder, a lethe alias, a ``lethe fit`` run folder or a ``.ckpt``. The suite
gives the forget set (members) and the holdout set (never trained on):

- ``tofu``: the forget split's questions (``tofu:<split>_perturbed``: with paraphrased questions) against the
  questions of TOFU authors outside ``--tofu-subset`` (``--holdout``, default ``tofu:full[100:102]``, two
  authors no lethe TOFU subset trains on; on the full set use TOFU's ``tofu:holdout01``).
- ``world``: the world-decoder unlearning presets' sets (``data.init_args.builtin: world``): the sentences of the
  ``--n-forget`` forgotten training facts against those of ``--n-holdout`` facts the world models never trained
  on; a run folder's own ``n_forget`` / ``n_unseen`` / ``seed`` are read from its config.
- ``files``: ``--forget`` and ``--holdout`` files of ``--kind`` tofu (question/answer) or text.
- ``edits``: an edited model (``lethe edit``'s ``edited_model/``) and its ``--requests`` (a CounterFact file,
  ``world:train``, ``real_facts``): does each edit survive ``quantize`` and ``finetune`` (20 steps on
  ``--finetune-corpus``, unrelated text), and does the old fact come back? Edits that move a city or a company
  to another country also get two-hop portability probes (``evaluation.portability_probes``, answers from the
  fact bank): does "the capital of the country where X is located" follow? With ``--reference`` (here: the model
  before editing) only the probes it answered the old way are scored.

The optional ``--reference`` (the retain model, or the model before unlearning) adds the reference-based
attack and privleak (its own AUC is computed on the same sets). Attacks (``--attacks``): ``mia`` (LOSS, ZLib,
Min-K%, Min-K%++, reference; exact memorisation, extraction strength), ``relearn``, ``quantize``, ``probes``;
lethe.privacy says what each does. Writes ``<out>/evaluation.json`` and ``<out>/evaluation.png`` atomically;
``--logger wandb`` also logs them as a table and an image. The model files read are never written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lethe.io import write_json

SUITES = ("tofu", "world", "files", "edits")
DEFAULT_HOLDOUT = {"full": "tofu:holdout01"}  # other subsets: authors 101-102, outside every CPU subset
SUBSET_HOLDOUT = "tofu:full[100:102]"


def build_parser():
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    from lethe.privacy import ATTACKS

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the description's line breaks (its command examples)."""

    p = ArgumentParser(prog="lethe evaluate", description=__doc__, formatter_class=Formatter)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML of these options")
    p.add_argument("--model", type=str, required=True,
                   help="hub name, local folder, lethe alias, lethe fit run folder or .ckpt")
    p.add_argument("--suite", type=str, default="tofu", help=f"where forget and holdout come from: {', '.join(SUITES)}")
    p.add_argument("--forget-split", type=str, default="forget01", help="tofu: the forget split (forget01, forget05[:2])")
    p.add_argument("--tofu-subset", type=str, default="cpu20", help="tofu: the authors the model was trained on")
    p.add_argument("--holdout", type=str | None, default=None,
                   help="holdout: a file (files suite) or a TOFU split of unseen authors (tofu suite)")
    p.add_argument("--forget", type=str | None, default=None, help="files: the forget file")
    p.add_argument("--kind", type=str, default="tofu", help="files: record kind of both files, tofu or text")
    p.add_argument("--requests", type=str | None, default=None, help="edits: the edit requests applied to the model")
    p.add_argument("--n-requests", type=int | None, default=None, help="edits: use the first N requests")
    p.add_argument("--finetune-corpus", type=str, default="pydoc",
                   help="edits: unrelated text for the finetune attack (pydoc, world, tofu, or a text file)")
    p.add_argument("--finetune-steps", type=int, default=20)
    p.add_argument("--finetune-lr", type=float, default=2e-5)
    p.add_argument("--n-forget", type=int | None, default=None, help="use the first N forget records")
    p.add_argument("--n-holdout", type=int | None, default=None, help="use the first N holdout records")
    p.add_argument("--reference", type=str | None, default=None,
                   help="the retain model (or the model before unlearning): reference attack and privleak; "
                        "edits suite: the model before editing (portability probes it answered the old way)")
    p.add_argument("--attacks", type=list[str], default=list(ATTACKS), help=f"any of {', '.join(ATTACKS)}")
    p.add_argument("--prompt-format", type=str | None, default=None,
                   help="'chat' or a format with {prompt} (default: the run's own, else plain)")
    p.add_argument("--relearn-steps", type=list[int], default=[10, 50], help="relearning: score after these steps")
    p.add_argument("--relearn-lr", type=float, default=5e-5)
    p.add_argument("--relearn-batch-size", type=int, default=4)
    p.add_argument("--quant-bits", type=list[int], default=[8, 4], help="quantisation: bit widths")
    p.add_argument("--group-size", type=int, default=128, help="quantisation: inputs per scale")
    p.add_argument("--survive-tolerance", type=float, default=0.05,
                   help="forgetting survived an attack when the forget score rose by less than this")
    p.add_argument("--precision", type=str, default="32",
                   help="32 or bf16-mixed: the relearning / fine-tuning steps, the greedy answers and the MIA forward "
                        "passes run under bf16 autocast (weights stay float32; MIA statistics are taken in float32 "
                        "from the logits)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, required=True, help="output folder")
    p.add_argument("--logger", type=str, default="none", help="none or wandb")
    p.add_argument("--project", type=str, default="lethe", help="wandb project")
    return p


def _fail(msg: str) -> None:
    raise SystemExit(f"lethe evaluate: {msg}")


def load_sets(args) -> tuple[list, list, dict[str, str]]:
    """The forget and holdout records of the suite, and where each came from."""
    from lethe.records import TextRecord, read_records

    if args.suite == "tofu":
        from lethe.tofu import perturbed_split

        where = {"forget": f"tofu:{perturbed_split(args.forget_split)}",
                 "holdout": args.holdout or DEFAULT_HOLDOUT.get(args.tofu_subset, SUBSET_HOLDOUT)}
        forget = read_records(where["forget"], "tofu", tofu_subset=args.tofu_subset)
        holdout = read_records(where["holdout"], "tofu")
    elif args.suite == "world":
        from lethe.sources import builtin_sets

        data = run_data(args.model)
        n_forget = args.n_forget or data.get("n_forget") or 32
        n_unseen = args.n_holdout or data.get("n_unseen") or 64
        seed = data.get("seed", 0) if isinstance(data.get("seed"), int) else 0
        sets = builtin_sets("world", n_forget, data.get("n_retain") or 256, n_unseen, seed)
        where = {"forget": f"world: {n_forget} training facts (seed {seed})",
                 "holdout": f"world: {n_unseen} unseen facts (seed {seed})"}
        return [TextRecord(t) for t in sets["forget"]], [TextRecord(t) for t in sets["unseen"]], where
    elif args.suite == "files":
        if not args.forget or not args.holdout:
            _fail("the files suite needs --forget and --holdout")
        if args.kind not in ("tofu", "text"):
            _fail(f"--kind {args.kind!r}: use tofu or text")
        where = {"forget": args.forget, "holdout": args.holdout}
        forget, holdout = (read_records(where[k], args.kind) for k in ("forget", "holdout"))
    else:
        _fail(f"unknown --suite {args.suite!r}; choose one of {', '.join(SUITES)}")
    return forget[:args.n_forget], holdout[:args.n_holdout], where


def run_data(model: str) -> dict:
    """A run folder's data arguments (its config.yaml), so a run is scored on the sets and in the format it was
    trained with; {} for anything else."""
    import yaml

    cfg = Path(model) / "config.yaml"
    if not cfg.is_file():
        return {}
    data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
    return data.get("init_args") or {}


def attack_settings(args):
    """The attacks' bounds from the command line."""
    from lethe.privacy import AttackSettings

    return AttackSettings(relearn_steps=tuple(args.relearn_steps), relearn_lr=args.relearn_lr,
                          relearn_batch_size=args.relearn_batch_size, quant_bits=tuple(args.quant_bits),
                          group_size=args.group_size, survive_tolerance=args.survive_tolerance, seed=args.seed,
                          bf16=args.precision == "bf16-mixed", max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size)


def run(args) -> dict:
    import torch

    from lethe import precision, privacy
    from lethe.models import load_model

    bad = [a for a in args.attacks if a not in privacy.ATTACKS]
    if bad:
        _fail(f"unknown attack(s) {', '.join(map(repr, bad))}; choose from {', '.join(privacy.ATTACKS)}")
    try:
        args.precision = precision.check(args.precision)
    except ValueError as err:
        _fail(str(err))
    if args.precision == "bf16-true":
        _fail("--precision bf16-true: the attacks fine-tune and quantize float32 weights; use 32 or bf16-mixed")
    if args.logger not in ("none", "wandb"):
        _fail(f"--logger must be none or wandb, got {args.logger!r}")
    if args.suite == "edits":
        return run_edits(args)
    try:
        forget_records, holdout_records, where = load_sets(args)
        forget, holdout = privacy.examples(forget_records), privacy.examples(holdout_records)
        privacy.check_sets(forget, holdout, where)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    fmt = args.prompt_format or run_data(args.model).get("prompt_format")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    reference = None
    if args.reference:
        reference = load_model(args.reference)
        if reference.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            _fail(f"--reference {args.reference} has another tokenizer than --model {args.model} "
                  f"({len(reference.tokenizer)} vs {len(loaded.tokenizer)} tokens): a loss ratio needs the same tokens")
    progress = lambda msg: print(f"[lethe evaluate] {msg}", file=sys.stderr, flush=True)
    settings = attack_settings(args)
    report: dict = {"model": args.model, "suite": args.suite, "sets": where, "n_forget": len(forget),
                    "n_holdout": len(holdout), "reference": args.reference, "prompt_format": fmt,
                    "attacks": list(args.attacks)}
    if "mia" in args.attacks:
        progress(f"membership inference on {len(forget)} forget and {len(holdout)} holdout examples")
        ref, ref_nll = None, None
        if reference is not None:  # the reference's own AUCs (privleak) and its NLLs (the reference attack)
            ref, ref_nll = privacy.membership(reference.model, reference.tokenizer, reference.family, forget,
                                              holdout, fmt, None, args.batch_size, settings.bf16)
        report.update(privacy.membership(loaded.model, loaded.tokenizer, loaded.family, forget, holdout, fmt,
                                         ref_nll, args.batch_size, settings.bf16)[0])
        if ref is not None:
            report["reference_mia_auc"] = ref["mia_auc"]
            report["privleak"] = privacy.privleak_by_attack(report["mia_auc"], ref["mia_auc"])
    recovery = [a for a in args.attacks if a in privacy.RECOVERY_ATTACKS]
    if recovery:
        report["recovery"] = privacy.recovery(loaded.model, loaded.tokenizer, loaded.family, forget_records,
                                              recovery, settings, fmt, progress)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    write_json(out / "evaluation.json", report)
    picture = privacy.plot_report(report, out / "evaluation.png", title=f"lethe evaluate: {args.model}")
    if args.logger == "wandb":
        import wandb

        run_ = wandb.init(project=args.project, dir=str(out), name=f"evaluate-{Path(args.model).name}",
                          config={k: v for k, v in vars(args).items() if k != "config"}, job_type="evaluate")
        rows = [[k, v] for k, v in privacy.flat_numbers(report).items()]
        run_.log({"evaluation": wandb.Table(columns=["metric", "value"], data=rows),
                  "evaluation_png": wandb.Image(str(picture))})
        run_.finish()
    return report


def run_edits(args) -> dict:
    """The edits suite: edit_survival of the model's edits under the chosen attacks."""
    from lethe import evaluation as ev
    from lethe import privacy
    from lethe.covariance import load_corpus
    from lethe.models import load_model
    from lethe.sources import load_requests

    attacks = [a for a in args.attacks if a in privacy.EDIT_ATTACKS]
    if not args.requests:
        _fail("the edits suite needs --requests (the edits applied to the model)")
    if not attacks:
        _fail(f"the edits suite runs {' and '.join(privacy.EDIT_ATTACKS)}; --attacks names neither")
    try:
        reqs = load_requests(args.requests, limit=args.n_requests)
        texts = load_corpus(args.finetune_corpus)[1] if "finetune" in attacks else []
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if not reqs:
        _fail(f"--requests {args.requests}: no requests")
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    settings = attack_settings(args)
    probes = ev.portability_probes(reqs, load_requests("fact_bank"))
    left_out = None
    if probes and args.reference:  # the model before editing: keep the probes it answered the old way
        before = load_model(args.reference)
        if before.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
            _fail(f"--reference {args.reference} has another tokenizer than --model {args.model}; the edits suite's "
                  "reference is the model before editing")
        probes, left_out = ev.known_portability_probes(before.model, before.tokenizer, before.family, probes)
        del before
    report = {"model": args.model, "suite": "edits", "requests": args.requests, "attacks": attacks,
              **privacy.edit_survival(loaded.model, loaded.tokenizer, loaded.family, reqs, attacks, settings, texts,
                                      args.finetune_steps, args.finetune_lr,
                                      lambda msg: print(f"[lethe evaluate] {msg}", file=sys.stderr, flush=True))}
    if probes:
        moved = ev.portability_scores(loaded.model, loaded.tokenizer, loaded.family, probes)
        report["portability"] = {"score": sum(moved) / len(moved), "probes": len(probes),
                                 "left_out_unknown_before_editing": left_out,
                                 "filtered_by": args.reference or "none (no --reference: every probe is scored)"}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(Path(args.out) / "evaluation.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    report = run(args)
    if report["suite"] == "edits":
        print(f"lethe evaluate: {report['model']}: edits holding {report['edits_holding_before']}/{report['n_edits']}; "
              + ", ".join(f"{k}: old fact returns {v['old_fact_returns']}" for k, v in report.items()
                          if isinstance(v, dict) and "old_fact_returns" in v)
              + f"; wrote {args.out}/evaluation.json ({report['seconds']} s)")
        return
    mia = report.get("mia_auc", {})
    print(f"lethe evaluate: {report['model']}: " + ", ".join(f"AUC {a} {v:.3f}" for a, v in mia.items())
          + ("; " + ", ".join(f"{k} {v:.3f}" for k, v in report.get("recovery", {}).items()
                              if isinstance(v, float)) if "recovery" in report else "")
          + f"; wrote {args.out}/evaluation.json ({report['seconds']} s)")
