"""`--threads auto`: the governor follows the cores other processes keep busy, and thread count never changes
results (so it may change between steps of one call)."""

from __future__ import annotations

import argparse

import pytest
import torch

from conftest import fp32_cache
from llmaas.cli.common import threads_arg
from llmaas.engine.cpu_governor import AUTO, CpuSample, ThreadGovernor, read_sample


class _FakeCpu:
    """Cumulative tick counters advanced by hand: 100 ticks per core per second."""

    def __init__(self) -> None:
        self.busy = self.total = self.own = 0
        self.now = 0.0

    def advance(self, seconds: float, others_cores: float, own_cores: float, cores: int = 2) -> None:
        self.now += seconds
        self.total += int(100 * seconds * cores)
        self.busy += int(100 * seconds * (others_cores + own_cores))
        self.own += int(100 * seconds * own_cores)

    def sample(self) -> CpuSample:
        return CpuSample(self.busy, self.total, self.own)


def test_governor_gives_up_the_core_another_process_keeps_busy_and_takes_it_back():
    cpu, set_to = _FakeCpu(), []
    g = ThreadGovernor(2, 0.5, cpu.sample, lambda: cpu.now, set_to.append)
    assert g.threads == 2 and set_to == [2]
    cpu.advance(0.2, others_cores=1.0, own_cores=1.0)
    assert g.tick() == 2 and set_to == [2]  # within the interval: no new decision
    cpu.advance(0.4, others_cores=1.0, own_cores=1.0)
    assert g.tick() == 1 and set_to == [2, 1] and g.others_busy_cores == pytest.approx(1.0, abs=0.05)
    cpu.advance(0.6, others_cores=1.0, own_cores=1.0)  # our one thread busy, the other process still on its core
    assert g.tick() == 1 and set_to == [2, 1]
    cpu.advance(0.6, others_cores=0.1, own_cores=1.0)  # it stopped
    assert g.tick() == 2 and set_to == [2, 1, 2]
    cpu.advance(0.6, others_cores=2.0, own_cores=0.0)  # both cores taken by others: still one thread
    assert g.tick() == 1


def test_real_cpu_counters_are_read():
    a = read_sample()
    b = read_sample()
    assert 0 <= a.busy_ticks <= a.total_ticks and b.total_ticks >= a.total_ticks and a.own_ticks >= 0


def test_threads_option_takes_auto_or_a_positive_count():
    assert threads_arg("auto") == AUTO and threads_arg("3") == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            threads_arg(bad)


def test_thread_count_does_not_change_results(smollm):
    """Every kernel and GEMM sums each output in one fixed order, whatever the thread count: the governor may
    change it between steps of one call and the reply is the same."""
    ids = torch.tensor(smollm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for n in (ids.numel(), 3):  # the GEMM path and the kernel path
                outs.append(smollm.model.forward(ids[:n], torch.arange(n), fp32_cache(smollm, n).append(n)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
