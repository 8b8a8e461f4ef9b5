"""benchmarks/hardware.py: FLOPs are counted, not guessed (a matmul counts 2·m·n·k, a training step's backward
counts too), and MFU is FLOP/s over the measured rate."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hardware import count_flops, matmul_rate, mfu, parallel_map


def test_count_flops_counts_matmuls_forward_and_backward():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    _, flops = count_flops(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 4
    w = torch.randn(16, 4, requires_grad=True)
    _, flops = count_flops(lambda: (a @ w).sum().backward())
    assert flops == 2 * (2 * 8 * 16 * 4)  # forward, and the weight gradient aᵀ·g (a needs none)


def test_mfu_is_a_share_of_the_measured_rate():
    rate = matmul_rate(torch.float32, n=128, repeats=2)
    assert rate > 0
    assert mfu(rate * 1e9, 1.0, {"fp32_gflops": rate}, "32") == 1.0
    assert mfu(1e9, 2.0, {"bf16_gflops": 1.0}, "bf16-mixed") == 0.5


def test_peak_rss_is_the_phases_own_not_an_earlier_phases():
    from hardware import PeakRSS

    with PeakRSS() as earlier:
        big = torch.ones(100_000_000)  # 400 MB, touched
        del big
    with PeakRSS() as first:
        small = torch.ones(10_000_000)  # 40 MB
    with PeakRSS() as second:
        more = torch.ones(50_000_000)  # 200 MB
    del small, more
    assert second.mb >= first.mb + 100
    if first.phase_only:  # Linux: the 400 MB of the earlier phase are not charged to the first
        assert first.mb < earlier.mb - 200


def test_parallel_map_keeps_the_jobs_order_in_processes_and_shows_progress(capsys):
    """Two spawned processes give the results in the order of the jobs, as one process does, and every job done
    shows on the progress display (a line each in a log)."""
    jobs = [{"a": 1}, {}, {"a": 1, "b": 2}, {"c": 3}]
    assert parallel_map(len, jobs, workers=2, threads=2, desc="sizes") == [1, 0, 2, 1]
    assert parallel_map(len, jobs, workers=1, threads=1, desc="sizes") == [1, 0, 2, 1]
    err = capsys.readouterr().err
    assert "sizes: 4/4 (100%)" in err and "sizes: 1/4 (25%)" in err
