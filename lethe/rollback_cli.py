"""``lethe rollback RUN --case-ids ID[,ID...]``: take single edits back out of a sequential ``lethe edit`` run.

The run's ``edit_artifact/`` holds the running sum of its edits and, for ROME, MEMIT and AlphaEdit, each
edit's own rank-one parts. Rolling back edit j subtracts j's parts from the edited weights and leaves
every other edit in place; the artifact (and ``edited_model/`` when the run saved one) are rewritten
atomically, and the rolled-back requests are listed in the artifact's ``meta.rolled_back``. A later
``lethe edit`` with the same preset resumes from what remains (AlphaEdit's stream forgets the rolled-back
keys too).

When it is exact: in weight space always (the model then holds base + the remaining edits' parts, to
float32 rounding). In behaviour, fully when no later edit was computed on top of the rolled-back one
(e.g. the last batch); otherwise later edits' keys and residuals saw it, and overlapping keys share
parts of their updates, so the old fact returns only as far as the edits are independent.

``--repair`` closes that gap: after taking the parts out it adds, per edited matrix, the least-squares
correction that puts the rolled-back edits' keys' outputs back to the unedited model's while holding the
remaining edits' keys (``EditArtifact.rollback(repair=True)``; rank at most the rows rolled back, its
strength against the others set by ``--ridge``). It is then exact at the rolled-back keys up to the ridge,
and approximate at every other input. The correction stays in the run's deltas (``meta.repaired``).

Measured on the world decoder (``benchmarks/results/sequential_editing.json``, ``rollback``: 10 random edits
of a 500-edit stream): plain, ROME 8 of 10 restored, MEMIT 9 of 10, AlphaEdit 8 of 10 (its preset writes
three phrasings per edit); with ``--repair``, all three 10 of 10 while the other edits keep efficacy
0.92 / 0.90 / 0.98 (figures under ``rollback.repaired``). FT-L, MEND, KE and KN edits have no per-edit
parts: those runs are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = __doc__


def _fail(msg: str) -> None:
    raise SystemExit(f"lethe rollback: error: {msg}")


def main(argv: list[str] | None = None) -> dict:
    import yaml

    from lethe import evaluation as ev
    from lethe.edits import ARTIFACT_DIR, MODEL_DIR, EditArtifact, EditArtifactError, restore_edited
    from lethe.io import save_pretrained
    from lethe.models import load_model

    parser = argparse.ArgumentParser(prog="lethe rollback", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a sequential `lethe edit` run folder (holds edit_artifact/)")
    parser.add_argument("--case-ids", required=True, help="comma-separated case ids of the edits to take back")
    parser.add_argument("--model", default=None, help="the unedited model (default: the run's config.yaml)")
    parser.add_argument("--repair", action="store_true",
                        help="also undo what the remaining edits still change at the rolled-back edits' keys "
                             "(a least-squares correction that holds the remaining edits' keys; see above)")
    parser.add_argument("--ridge", type=float, default=1e-2, help="the repair's ridge, relative to the keys' "
                                                                  "mean square (default 1e-2)")
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)

    run = Path(args.run)
    art_dir = run / ARTIFACT_DIR
    if not art_dir.is_dir():
        _fail(f"{run} has no {ARTIFACT_DIR}/: not a sequential `lethe edit` run folder")
    try:
        total = EditArtifact.load(art_dir)
    except EditArtifactError as err:
        _fail(str(err))
    init = {}
    if (run / "config.yaml").is_file():
        init = ((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model") or {}).get("init_args") or {}
    name = args.model or init.get("model")
    if not name:
        _fail(f"{run}/config.yaml does not name the model; pass --model")
    ids = [c.strip() for c in args.case_ids.split(",") if c.strip()]
    try:
        rows = total.find(ids)
    except EditArtifactError as err:
        _fail(f"{art_dir}: {err}")
    if not total.factors:
        _fail(f"{art_dir}: this {total.method} run has no per-edit factors (only ROME, MEMIT and AlphaEdit "
              "artifacts do); revert the whole run or re-run without those requests")
    loaded = load_model(name, dtype=init.get("dtype", "float32"), tokenizer=init.get("tokenizer"))
    try:
        total.check(loaded.model)
        if total.changed_bases(loaded.model):
            _fail(f"{name} is not the model {art_dir} was made on (its edited weights differ); pass --model")
    except EditArtifactError as err:
        _fail(str(err))
    restore_edited(total, loaded.model, art_dir)
    removed = [total.requests[i] for i in rows]
    try:
        left = total.rollback(loaded.model, rows, repair=args.repair, ridge=args.ridge)
    except EditArtifactError as err:
        _fail(f"{art_dir}: {err}")
    out = {"rolled_back": [r.case_id for r in removed], "remaining_edits": len(left.requests),
           "repaired": bool(args.repair)}
    if all(r.target_true for r in removed):
        back = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, removed)
        out["rolled_back_true_wins"] = [1.0 - e for e in back["efficacy_per_case"]]
    if left.requests and all(r.target_true for r in left.requests):
        out["remaining_efficacy"] = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family,
                                                          left.requests)["efficacy"]
    params = dict(loaded.model.named_parameters())
    left.save(art_dir, weights={n: params[n] for n in left.deltas})
    if (run / MODEL_DIR).is_dir():
        save_pretrained(loaded.model, loaded.tokenizer, run / MODEL_DIR)
    print(json.dumps(out))
    return out
