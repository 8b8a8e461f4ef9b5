"""scripts/device_check.sh --dry-run: the GPU check's every step (ROME, MEMIT, NPO + LoRA in bf16-mixed, a DDP run)
on CPU with the world decoder, so the script cannot rot while no GPU is within reach."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_dry_run_passes_every_step(tmp_path):
    from lethe.world_models import ensure_world_model

    ensure_world_model("decoder", progress=False)
    out = tmp_path / "device_check.json"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert report["ok"] and report["dry_run"], {k: v for k, v in report.items() if isinstance(v, dict) and not v["ok"]}
    for edit in ("rome", "memit"):
        assert report[edit]["n_edits"] == 2 and report[edit]["efficacy"] == 1.0  # both facts written
    for fit in ("npo_lora_bf16", "ddp_1gpu"):
        assert report[fit]["last_step"] == 2 and report[fit]["steps_logged"] == 2
    assert "--trainer.precision" in report["npo_lora_bf16"]["args"] and "ddp" in report["ddp_1gpu"]["args"]
    assert not list(tmp_path.glob("lethe-device-check-*"))  # its scratch folder is gone


def test_device_check_refuses_without_a_gpu_unless_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode != 0 and "no CUDA GPU here; use --dry-run" in res.stderr
