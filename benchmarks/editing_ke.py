"""KE benchmark: as ``editing_mend`` (train on the training slice, edit held-out facts, FT-L beside it) with
the KnowledgeEditor module.

    python benchmarks/editing.py --method ke [--model lethe:world-mlm] [--steps 500]
"""

from __future__ import annotations

from editing_mend import SMOLLM2_ARGS, add_arguments, run_method

__all__ = ["SMOLLM2_ARGS", "add_arguments", "run"]


def run(args) -> dict:
    return run_method("ke", args)
