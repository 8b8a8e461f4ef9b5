"""The GPU check (``scripts/device_check.sh``): lethe's real-model paths on one CUDA GPU, in a few minutes.

    scripts/device_check.sh                      # on a machine with one CUDA GPU: SmolLM2, prints one JSON
    scripts/device_check.sh --out benchmarks/results/device_check.json
    scripts/device_check.sh --dry-run            # the same steps on CPU with the world decoder (the test suite)
    scripts/device_check.sh --model lethe:world-decoder   # on the GPU, where SmolLM2 cannot be brought

Steps, each timed and reported even when another fails:
- ``rome``: ROME on SmolLM2 (its preset) on cuda, 5 real facts, one at a time: efficacy, seconds per edit;
- ``memit``: MEMIT on SmolLM2, 20 real facts in one call;
- ``npo_lora_bf16``: 200 steps of NPO + LoRA on SmolLM2 in bf16-mixed (``lethe fit``, its preset);
- ``ddp_1gpu``: the same job for 20 steps under ``strategy=ddp`` on one GPU.
``--dry-run`` runs every step on CPU with ``lethe:world-decoder`` and its presets, 2 edits / 2 steps, so the
script cannot rot unnoticed. Nothing in lethe depends on a GPU; this only checks the paths that use one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _step(name: str, fn, out: dict) -> None:
    t = time.perf_counter()
    try:
        out[name] = {"ok": True, **fn()}
    except Exception as err:  # noqa: BLE001 - one failed step must not hide the others
        out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc(limit=4)[-2000:]}
    out[name]["seconds"] = round(time.perf_counter() - t, 2)
    print(f"[device_check] {name}: {json.dumps(out[name])[:300]}", file=sys.stderr, flush=True)


def edit_step(method: str, model: str, n: int, device: str, dry: bool, cache_dir: str) -> dict:
    import torch

    from lethe import evaluation as ev
    from lethe.edit_cli import build_editor
    from lethe.models import load_model
    from lethe.presets import editor_preset
    from lethe.sources import load_requests

    loaded = load_model(model)
    loaded.model.to(device)
    preset, hp = editor_preset(method, model)
    overrides = {"mom2_n_samples": 200} if dry else {}
    editor = build_editor(method, {"hparams": hp, "overrides": overrides, "cache_dir": cache_dir, "progress": False})
    pool = load_requests("world:train" if model.startswith("lethe:world") else "real_facts")[: 4 * n]
    known = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, pool)["efficacy_per_case"]
    reqs = [r for r, e in zip(pool, known) if e == 0.0][:n]
    t = time.perf_counter()
    editor.edit(loaded, reqs[:1])  # statistics and prefixes, then the timed edits on a fresh copy of the state
    warm = time.perf_counter() - t
    loaded = load_model(model)
    loaded.model.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    editor.edit(loaded, reqs)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    scores = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, reqs)
    return {"preset": preset, "device": device, "n_edits": len(reqs), "efficacy": round(scores["efficacy"], 4),
            "paraphrase": round(scores["paraphrase"], 4), "seconds_per_edit": round(secs / len(reqs), 3),
            "warmup_seconds": round(warm, 2),
            **({"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if device == "cuda" else {})}


def fit_step(preset: str, extra: list[str], root: Path, name: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "lethe.cli", "fit", "--config", str(ROOT / preset), "--run.root", str(root),
           "--run.name", name, "--run.logger", "csv", "--model.init_args.save_dir", str(root / name / "model"),
           *extra]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False, timeout=1200)
    secs = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"lethe fit exited {res.returncode}: {res.stderr[-1500:]}")
    losses = []
    metrics = root / name / "metrics.csv"
    if metrics.is_file():
        with open(metrics) as fh:
            losses = [(int(float(r["step"])), float(r["train/loss"])) for r in csv.DictReader(fh) if r.get("train/loss")]
    steps = max((s for s, _ in losses), default=0) + 1
    return {"preset": preset, "args": extra, "steps_logged": len(losses), "last_step": steps,
            "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
            "steps_per_second": round(steps / secs, 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, the world decoder, a couple of steps each")
    parser.add_argument("--model", default=None, choices=("lethe:smollm2", "lethe:world-decoder"),
                        help="default: lethe:smollm2 on the GPU, lethe:world-decoder with --dry-run")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA GPU here; use --dry-run to check the script on CPU")
    device = "cpu" if dry else "cuda"
    model = args.model or ("lethe:world-decoder" if dry else "lethe:smollm2")
    accel = ["--trainer.accelerator", "cpu" if dry else "gpu", "--trainer.devices", "1"]
    npo = ("configs/unlearn/world_decoder_npo.yaml" if model == "lethe:world-decoder"
           else "configs/unlearn/smollm2_npo_lora.yaml")
    n_fit, n_ddp = (2, 2) if dry else (200, 20)
    out: dict = {"dry_run": dry, "device": torch.cuda.get_device_name(0) if not dry else "cpu (dry run)",
                 "torch": torch.__version__, "model": model}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lethe-device-check-") as tmp:
        root = Path(tmp)
        _step("rome", lambda: edit_step("rome", model, 2 if dry else 5, device, dry, str(root / "cov")), out)
        _step("memit", lambda: edit_step("memit", model, 2 if dry else 20, device, dry, str(root / "cov")), out)
        _step("npo_lora_bf16", lambda: fit_step(npo, [*accel, "--trainer.max_steps", str(n_fit),
                                                     "--trainer.precision", "bf16-mixed"], root, "npo"), out)
        _step("ddp_1gpu", lambda: fit_step(npo, [*accel, "--trainer.max_steps", str(n_ddp),
                                                "--trainer.strategy", "ddp"], root, "ddp"), out)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["ok"] = all(out[k]["ok"] for k in ("rome", "memit", "npo_lora_bf16", "ddp_1gpu"))
    if args.out:
        from lethe.io import write_json

        write_json(args.out, out)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
