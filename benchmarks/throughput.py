"""Training-step throughput on SmolLM2-135M as ``lethe fit`` runs it: tokens/s and MFU, fp32 against bf16-mixed.

Two steps, each under Lightning with ``precision`` set as ``--trainer.precision`` sets it:

- ``finetune``: full fine-tuning (``LanguageModelModule``, AdamW), the step of a TOFU fine-tune;
- ``npo_lora``: NPO through a LoRA adapter (``UnlearningModule``: a forward of the frozen reference too), the
  step of the unlearning benchmark's SmolLM2 run.

Batches: ``--batch-size`` documents of ``--length`` tokens of offline English text (TOFU answers and Python's
documentation topics, the ``tofu+pydoc`` corpus). FLOPs per step are counted once by torch's FLOP counter on
one step; tokens/s and seconds per step come from ``--steps`` timed steps after ``--warmup`` untimed ones. MFU
is FLOP/s over the matmul rate this process measured for that precision (``benchmarks/hardware.py``).

    python benchmarks/throughput.py [--steps 6] [--result benchmarks/results/throughput.json]

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lightning as L
import torch
from hardware import count_flops, matmul_rates, mfu
from torch.utils.data import DataLoader

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


class _Clock(L.Callback):
    """Seconds and tokens of the training steps after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seconds, self.tokens, self.steps = warmup, 0.0, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.seconds += time.perf_counter() - self._t
            self.tokens += _tokens(batch)
            self.steps += 1


def _tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return sum(_tokens(b) for b in batch.values() if isinstance(b, dict))


def _texts(n: int) -> list[str]:
    from lethe.covariance import load_corpus

    _, texts = load_corpus("tofu+pydoc")
    long = [t for t in texts if len(t.split()) > 200] or texts
    return [long[i % len(long)] for i in range(n)]


def _setting(name: str, source: str, texts: list[str], batch_size: int, length: int):
    """(module, train dataloader) of one step kind."""
    from lethe import lm

    if name == "finetune":
        from lightning_modules.lm import LanguageModelModule

        module = LanguageModelModule(source, lr=1e-5)
        enc = lm.encode_texts(module.tokenizer, module.family, texts, max_length=length)
        rows = [{k: v[i] for k, v in enc.items()} for i in range(len(texts))]
        return module, DataLoader(rows, batch_size=batch_size)
    if name == "npo_lora":
        from datamodules.forget_retain import ForgetRetainDataModule
        from lightning_modules.unlearning import UnlearningModule

        module = UnlearningModule(source, method="npo", method_args={"beta": 0.1}, lr=1e-5, lora=LORA)
        dm = ForgetRetainDataModule(forget_texts=texts, batch_size=batch_size, max_length=length, seed=0)
        dm.tokenizer, dm.family = module.tokenizer, module.family
        dm.setup("fit")
        return module, dm.train_dataloader()
    raise ValueError(f"unknown step kind {name!r}")


def _trainer(precision: str, steps: int, callbacks: list, root: str) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="auto", devices=1, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0)


def measure(name: str, source: str, precision: str, args, rates: dict) -> dict:
    texts = _texts(args.batch_size * (args.steps + args.warmup + 1))
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        module, loader = _setting(name, source, texts, args.batch_size, args.length)
        (_, flops) = count_flops(lambda: _trainer(precision, 1, [], root).fit(module, loader))
        torch.manual_seed(0)
        module, loader = _setting(name, source, texts, args.batch_size, args.length)
        clock = _Clock(args.warmup)
        _trainer(precision, args.steps + args.warmup, [clock], root).fit(module, loader)
    per_step = clock.seconds / max(1, clock.steps)
    row = {"step": name, "precision": precision, "tokens_per_s": round(clock.tokens / clock.seconds, 1),
           "seconds_per_step": round(per_step, 3), "gflop_per_step": round(flops / 1e9, 1),
           "mfu": mfu(flops, per_step, rates, precision), "timed_steps": clock.steps}
    print(f"[throughput] {row}", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lethe:smollm2")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=256, help="tokens per document")
    p.add_argument("--kinds", default="finetune,npo_lora")
    p.add_argument("--precision", default="32,bf16-mixed")
    p.add_argument("--result", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    from lethe.models import load_model
    from lethe.precision import check

    source = load_model(args.model).source
    rates = matmul_rates("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    rows = [measure(kind, source, check(prec), args, rates) for kind in args.kinds.split(",")
            for prec in args.precision.split(",")]
    result = {"model": args.model, "batch_size": args.batch_size, "length": args.length,
              "matmul_rates": rates, "runs": rows, "seconds": round(time.perf_counter() - t0, 1)}
    line = json.dumps(result)
    if args.result:
        from lethe.io import write_json

        write_json(args.result, result)
    print(line)
    return result


if __name__ == "__main__":
    main()
