#!/usr/bin/env bash
# The GPU check: ROME and MEMIT on SmolLM2 on cuda, 200 steps of NPO + LoRA in bf16-mixed, a 1-GPU DDP run;
# prints one JSON (see scripts/device_check.py). --dry-run: the same steps on CPU with the world decoder.
#   scripts/device_check.sh [--dry-run] [--out benchmarks/results/device_check.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export WANDB_MODE=offline
exec "$PY" scripts/device_check.py "$@"
