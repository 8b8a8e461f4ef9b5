"""This machine's pace, measured in the benchmark's own process, and model FLOP utilisation (MFU) against it.

These machines are noisy and differ from each other, so a benchmark reports its throughput as a fraction of
what the same process measured the hardware can do a moment earlier, not against a datasheet:

- ``matmul_rates()``: the best GFLOP/s of a square float32 and a square bfloat16 matmul (bf16 uses this CPU's
  AMX units, a GPU's tensor cores);
- ``count_flops(fn)``: the floating-point operations ``fn`` runs (forward and backward), counted by torch's
  ``FlopCounterMode`` (matmuls, convolutions and attention; elementwise work is not counted, as in the MFU
  convention of the PaLM paper);
- ``mfu(flops, seconds, rate)``: achieved FLOP/s as a share of ``rate``;
- ``PeakRSS()``: the process's peak resident memory over one phase (Linux resets the high-water mark, so a
  later phase is not charged with an earlier one's peak; elsewhere it is the process's peak so far).

``python benchmarks/hardware.py`` prints the rates as one JSON line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch

RATE_KEYS = {"32": "fp32_gflops", "bf16-mixed": "bf16_gflops", "bf16-true": "bf16_gflops"}


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Best GFLOP/s of an n×n by n×n matmul in ``dtype`` over ``repeats`` timed runs (after a warm-up)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def matmul_rates(device: str | torch.device = "cpu") -> dict[str, float]:
    """``{"fp32_gflops", "bf16_gflops"}`` of this machine, now."""
    return {"fp32_gflops": round(matmul_rate(torch.float32, device=device), 1),
            "bf16_gflops": round(matmul_rate(torch.bfloat16, device=device), 1)}


def count_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """Run ``fn`` once under torch's FLOP counter: its result and the FLOPs it ran."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def mfu(flops: float, seconds: float, rates: dict[str, float], precision: str) -> float:
    """Model FLOP utilisation: FLOPs / seconds as a share of the measured matmul rate of ``precision``."""
    rate = rates[RATE_KEYS[precision]] * 1e9
    return round(flops / max(seconds, 1e-12) / rate, 4)


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    print(json.dumps(matmul_rates()))


class PeakRSS:
    """``with PeakRSS() as peak: ...``, then ``peak.mb``: the peak resident set size (MB) during the block.

    On Linux the kernel's high-water mark (``VmHWM``) is reset at the start (``/proc/self/clear_refs``, after
    freed heap memory went back to the OS), so the figure is the phase's own. Where that is not possible it is
    the process's peak so far (``getrusage``), and ``phase_only`` says so."""

    def __enter__(self):
        from lethe.memory import release

        release()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.phase_only = True
        except OSError:
            self.phase_only = False
        return self

    def __exit__(self, *exc) -> None:
        self.mb = _hwm_mb()


def _hwm_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


def parallel_map(fn: Callable[[dict], object], jobs: list, workers: int, threads: int,
                 desc: str = "jobs") -> list:
    """``[fn(job) for job in jobs]``, in ``workers`` spawned processes splitting ``threads`` CPU threads (one
    process: in this one), in the order of ``jobs``, with a progress display of the jobs done (``desc``; a bar on
    a terminal, lines in a log). Independent model jobs use a small CPU best this way: greedy decoding's small
    matrices do not split well across threads (2 single-threaded processes did 1.2x the work of one 2-threaded
    process)."""
    from lethe.progress import Progress

    progress = Progress(len(jobs), desc, every=1)
    workers = max(1, min(workers, len(jobs)))
    try:
        if workers == 1:
            out = []
            for job in jobs:
                out.append(fn(job))
                progress.update()
            return out
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_set_threads,
                                 initargs=(max(1, threads // workers),)) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            for _ in as_completed(futures):
                progress.update()
            return [f.result() for f in futures]
    finally:
        progress.close()
