"""Editing benchmark: ``python benchmarks/editing.py --method {rome,memit,mend,ke,kn} [options]``.

Each method's benchmark lives in ``benchmarks/editing_<method>.py`` as
``add_arguments(parser)`` (optional) and ``run(args) -> dict``; this script
parses the arguments, runs it, and prints the result as ONE JSON line, last.

When a run is on the embedded decoder (``lethe:world-decoder``, the default), the same method also runs
on SmolLM2-135M-Instruct with the real-fact set and its result goes in the same JSON line under
``"smollm2"`` (``--no-smollm2`` skips it). A method file sets the SmolLM2 run's argument overrides in
``SMOLLM2_ARGS`` (fewer edits: CPU time); ``--smollm2-n`` overrides its edit count. The KN benchmark lists
SmolLM2 among its models itself.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("rome", "memit", "mend", "ke", "kn")
EMBEDDED_DECODER = "lethe:world-decoder"


def smollm2_args(module, args: argparse.Namespace) -> argparse.Namespace | None:
    """The arguments of the SmolLM2 companion run, or None when there is none."""
    if args.no_smollm2 or getattr(args, "model", None) != EMBEDDED_DECODER or not hasattr(module, "SMOLLM2_ARGS"):
        return None
    out = copy.copy(args)
    for k, v in module.SMOLLM2_ARGS.items():
        setattr(out, k, v)
    out.model = "lethe:smollm2"
    if args.smollm2_n is not None:
        out.n = type(module.SMOLLM2_ARGS.get("n", 0))(args.smollm2_n)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 run beside the world decoder")
    parser.add_argument("--smollm2-n", default=None, help="edits in the SmolLM2 run (default: the method's)")
    parser.add_argument("--result", default=None, help="also write the JSON line to this file")
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(f"editing_{known.method}")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    result = {"method": args.method, **module.run(args)}
    companion = smollm2_args(module, args)
    if companion is not None:
        print(f"[{args.method}] world decoder done; now SmolLM2 on the real-fact set", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result["smollm2"] = {**module.run(companion), "benchmark_seconds": round(time.perf_counter() - t0, 1)}
    from lethe.world_models import world_builds

    models = [getattr(args, "model", None), *str(getattr(args, "models", "") or "").split(",")]
    builds = world_builds(models)
    if builds:
        result["world_build"] = builds
    line = json.dumps(result, default=float)
    if args.result:
        from lethe.io import write_json

        write_json(args.result, json.loads(line), indent=None)
    print(line)
    return result


if __name__ == "__main__":
    main()
