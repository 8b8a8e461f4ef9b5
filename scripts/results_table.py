"""The README's results table, generated from ``benchmarks/results/*.json`` (never typed by hand).

    python scripts/results_table.py          # print the table
    python scripts/results_table.py --write  # put it between the README's results markers

A test checks that the README holds exactly what this prints, so the table cannot drift from the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _epn(d: dict) -> str:
    """efficacy / paraphrase / neighbourhood."""
    return f"{_f(d.get('efficacy'))} / {_f(d.get('paraphrase'))} / {_f(d.get('neighborhood'))}"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _speed(by_precision: list[dict] | None) -> str:
    """"; s/edit 32: a, bf16-mixed: b (MFU ...)" from a benchmark's per-precision rows ("" when it has none)."""
    if not by_precision:
        return ""
    return "; s/edit " + ", ".join(f"{r['precision']}: {_f(r['seconds_per_edit'])} (MFU {_f(r.get('mfu'), 3)})"
                                   for r in by_precision)


def rows() -> list[tuple[str, str, str, str]]:
    """(benchmark, model, figures, command) per line of the table."""
    out = []
    for method, what in (("rome", "single edits"), ("mend", "held-out edits"), ("ke", "held-out edits")):
        d = _load(method)
        if d:
            cmd = f"`python benchmarks/editing.py --method {method}`"
            out.append((f"{method.upper()}, {d['n_edits']} {what}", "world decoder",
                        _epn(d) + _speed(d.get("by_precision")), cmd))
            s = d.get("smollm2") or {}
            if "efficacy" in s:
                trained = (f"; editor trained {s['train_seconds'] / 60:.0f} min on {s['train_requests']} requests"
                           if s.get("preset") and s.get("train_seconds") else "")
                out.append((f"{method.upper()}, {s['n_edits']} {what}", "SmolLM2-135M",
                            _epn(s) + _speed(s.get("by_precision")) + trained, cmd))
    d = _load("memit")
    if d:
        cmd = "`python benchmarks/editing.py --method memit`"
        for model, block in (("world decoder", d), ("SmolLM2-135M", d.get("smollm2") or {})):
            for run in block.get("runs", []):
                out.append((f"MEMIT, {run['n_edits']} edits in one call", model,
                            _epn(run["memit"]) + _speed(run.get("by_precision")), cmd))
    d = _load("kn")
    if d:
        for model, m in d["models"].items():
            sup = m.get("suppression") or {}
            if "refined_drop" in sup:
                out.append(("Knowledge Neurons: P(true) drop, refined vs random neurons", model.replace("lethe:", ""),
                            f"{_f(sup['refined_drop'])} vs {_f(sup['random_drop'])}",
                            "`python benchmarks/editing.py --method kn`"))
        pkg = d.get("package") or {}
        if "ratio" in pkg:
            label = "Knowledge Neurons IG: prompts/s against the knowledge-neurons package (same model, prompts, steps)"
            figures = (f"fp32 {pkg['ratio']}x (MFU {_f(pkg['mfu'], 3)}), bf16-mixed {pkg['ratio_bf16']}x "
                       f"(score r {pkg['bf16_score_r_min']:.5f}); package MFU {_f(pkg['package_mfu'], 3)}")
            out.append((label, "GPT-2-small-sized", figures, "`python benchmarks/editing.py --method kn`"))
    d = _load("unlearning")
    if d:
        for name, m in d["methods"].items():
            out.append((f"Unlearning {name}: forget MA, retain MA drop (points), steps", "world decoder",
                        (f"{_f(m['forget_ma_before'])} → {_f(m['forget_ma_after'])}, {_f(m['retain_ma_drop_points'], 1)}, "
                        f"{m['steps_to_stop']}"), "`python benchmarks/unlearning.py`"))
    d = _load("tofu_smollm2")
    if d:
        sub = d["subset"]
        for name in ("untuned", "target", "retain", *d.get("methods", [])):
            m = d.get(name)
            if not m:
                continue
            fq = "—" if name == "untuned" and m.get("forget_quality") is None else f"{m['forget_quality']:.2g}"
            out.append(((f"TOFU {sub['forget_split']} ({sub['name']}, {sub['authors']} authors) {name}: "
                        "forget quality / model utility / forget ROUGE-L"), "SmolLM2-135M",
                        f"{fq} / {_f(m['model_utility'], 3)} / {_f(m['forget_rougeL_recall'])}",
                        "`python benchmarks/tofu.py`"))
    d = _load("privacy")
    if d:
        for name, m in d["models"].items():
            out.append(((f"Is it gone? TOFU {d['forget_split']} ({d['subset']}) {name}: MIA AUC (LOSS), privleak; "
                         "forget ROUGE-L; relearned half before → after 50 steps; after 4-bit"), "SmolLM2-135M",
                        (f"{_f(m['mia_auc']['loss'])}, {m['privleak']['loss']:+.0f}; {_f(m['forget'])}; "
                         f"{_f(m.get('relearn_half_before'))} → {_f(m.get('relearn_50'))}; {_f(m.get('quant_4bit'))}"),
                        "`python benchmarks/privacy.py`"))
    d = _load("edit_robustness")
    if d:
        for model, per in d["models"].items():
            for method in ("rome", "memit", "mend"):
                r = per.get(method)
                if not r:
                    continue
                returns = " / ".join(_f(r[k]["old_fact_returns"]) for k in ("quant_8bit", "quant_4bit", "finetune_20")
                                     if k in r)
                port = r.get("portability")
                probes = per.get("portability_probes")
                out.append(((f"Edits under attack: {method.upper()}, {per['n_edits']} edits: before → after 4-bit; "
                             "old facts returned after 8-bit / 4-bit / 20 fine-tuning steps"
                             + ("; two-hop portability" if port is not None else "")),
                            model.replace("lethe:", "").replace("smollm2", "SmolLM2-135M"),
                            f"{_epn(r['before'])} → {_epn(r['quant_4bit'])}; {returns}"
                            + (f"; {_f(port)} ({probes['scored']} probes)" if port is not None else ""),
                            "`python benchmarks/edit_robustness.py`"))
    d = _load("sequential_editing")
    if d:
        for model, block in d.items():
            for method, r in block["methods"].items():
                if not r.get("rows"):
                    continue
                last = r["rows"][-1]
                if "fact_recall" in block["unedited"]:  # SmolLM2: general is held-out perplexity
                    figures = (f"{_epn(last)}; perplexity {last['general']:.2f} (unedited "
                               f"{block['general_unedited']:.2f}), untouched-fact recall {_f(last.get('fact_recall'))} "
                               f"(unedited {_f(block['unedited']['fact_recall'])})")
                else:
                    figures = (f"{_epn(last)}; untouched recall {_f(last.get('general'))} "
                               f"(unedited {_f(block['general_unedited'])})")
                    if "general_paraphrase" in last:  # the same facts at held-out phrasings
                        figures += (f", at held-out phrasings {_f(last['general_paraphrase'])} "
                                    f"(unedited {_f(block['unedited'].get('general_paraphrase'))})")
                if r.get("rollback"):
                    rb = r["rollback"]
                    figures += (f"; rollback of {rb['rolled_back']} at {rb['n_edits']}: {_f(rb['restored_share'])} "
                                f"restored, others {_f(rb['others_efficacy'])}")
                    if rb.get("repaired"):
                        figures += (f" (with repair: {_f(rb['repaired']['restored_share'])} restored, others "
                                    f"{_f(rb['repaired']['others_efficacy'])})")
                label = (f"Sequential editing: {method.upper()}, {last['n_edits']} edits in batches of "
                         f"{block['batch_size']} (final row)")
                out.append((label,
                            model.replace("world_", "world ").replace("smollm2", "SmolLM2-135M"), figures,
                            "`python benchmarks/sequential_editing.py`"))
    d = _load("throughput")
    if d:
        for r in d["runs"]:
            out.append((f"Training step ({r['step']}, {d['batch_size']}×{d['length']} tokens): tokens/s, MFU",
                        "SmolLM2-135M", f"{r['precision']}: {r['tokens_per_s']:.0f} tok/s, MFU {_f(r['mfu'], 3)}",
                        "`python benchmarks/throughput.py`"))
    d = _load("world_recall")
    if d:
        for fam in ("world_decoder", "world_mlm", "world_seq2seq"):
            if fam in d:
                out.append(("World models: train / paraphrase / unseen recall", fam.replace("_", "-"),
                            (f"{_f(d[fam]['train_recall'])} / {_f(d[fam]['paraphrase_recall'])} / "
                            f"{_f(d[fam]['unseen_recall'])}"), "`python benchmarks/world_recall.py`"))
    return out


def table() -> str:
    lines = ["| benchmark | model | result | command |", "|---|---|---|---|"]
    lines += [f"| {b} | {m} | {r} | {c} |" for b, m, r, c in rows()]
    return "\n".join(lines)


def readme_with_table(text: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{README}: the markers {START} / {END} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    if args.write:
        from lethe.records import atomic_write

        atomic_write(README, readme_with_table(README.read_text()))
    else:
        sys.stdout.write(table() + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
