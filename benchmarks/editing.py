"""Editing benchmark: ``python benchmarks/editing.py --method {rome,memit,mend,ke,kn} [options]``.

Each method's benchmark lives in ``benchmarks/editing_<method>.py`` as
``add_arguments(parser)`` (optional) and ``run(args) -> dict``; this script
parses the arguments, runs it, and prints the result as ONE JSON line, last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("rome", "memit", "mend", "ke", "kn")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(f"editing_{known.method}")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    result = {"method": args.method, **module.run(args)}
    print(json.dumps(result, default=float))
    return result


if __name__ == "__main__":
    main()
