"""Timing, peak memory and FLOP counts of benchmark subjects (`measure`: alternating rounds; `speedup`: two of
its results compared), and what the machine was."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from typing import Callable, NamedTuple

import numpy as np
import torch

from experiments.benchmark.options import Options
from retina_fn.engine.hooks import synchronize


class Subject(NamedTuple):
    """One thing to time.

    Attributes:
      name: its key in the results ('ours', 'ours-<variant>', 'torchvision').
      call: runs one step (its state kept in a closure).
      flops: runs one eager step under the FLOP counter and returns the count.
      check: check(steps) -> the comparison of a compiled or graphed step with the eager one
        (experiments.benchmark.parity); None for an eager subject (nothing to compare).
    """

    name: str
    call: Callable[[], object]
    flops: Callable[[], int]
    check: Callable[[int], dict] | None = None


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of fn up to the end of the device work it queued (a device synchronisation)."""
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def time_statistics(times: list[float]) -> dict:
    """{'median', 'p10', 'p90', 'min', 'max', 'mean' (seconds), 'n'} of timed calls (at least one)."""
    return {"median": statistics.median(times), "p10": float(np.quantile(times, 0.1)),
            "p90": float(np.quantile(times, 0.9)), "min": min(times), "max": max(times),
            "mean": statistics.fmean(times), "n": len(times)}


class PeakMemory:
    """Peak memory between reset() and peak_mb() in MiB: on an accelerator max allocated (torch.<kind>.
    reset_peak_memory_stats / max_memory_allocated); on the CPU the process's peak resident set (VmHWM, reset
    through /proc/self/clear_refs, Linux only)."""

    def __init__(self, device: torch.device):
        self.device = device
        module = None if device.type == "cpu" else getattr(torch, device.type, None)
        self.accelerator = module if hasattr(module, "max_memory_allocated") else None
        self.kind = f"{device.type}_max_allocated" if self.accelerator else "cpu_rss_peak"

    def reset(self) -> None:
        if self.accelerator:
            self.accelerator.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_mb(self) -> float:
        if self.accelerator:
            return self.accelerator.max_memory_allocated(self.device) / 2**20
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def release(device: torch.device) -> None:
    """Returns the memory of dropped subjects (their states, steps and graph pools) to the device: gc, then
    torch.cuda.empty_cache on CUDA."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call as torch.utils.flop_counter.FlopCounterMode counts them (convolutions and matrix
    products, 2 per multiply-add; eager code only: the counter cannot enter compiled code or graphs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def measure(subjects: list[Subject], batch_size: int, opts: Options, device: torch.device) -> dict[str, dict]:
    """Times the subjects: `opts.warmup` untimed calls of each, then `opts.iters` timed calls of each in
    `opts.rounds` blocks that alternate between them (a drift of a shared machine's load hits all alike), then
    each one's FLOPs (unless not opts.count_flops). Peak memory is reset before each subject's blocks (on an
    accelerator the other subjects' resident state counts too).

    Returns:
      {name: {'step_s' (time_statistics), 'times', 'round_medians', 'images_per_s' (from the median),
      'first_call_s' (None without warm-up), 'warmup_s', 'peak_memory_mb', 'memory_kind', 'flops_per_image',
      'achieved_tflops', 'mfu' (None when not counted or, for mfu, without opts.peak_tflops)}}.
    """
    memory = PeakMemory(device)
    results = {}
    for s in subjects:
        memory.reset()
        warm = [time_call(s.call, device) for _ in range(opts.warmup)]
        results[s.name] = {"first_call_s": warm[0] if warm else None, "warmup_s": warm, "times": [],
                           "round_medians": [], "peak_memory_mb": memory.peak_mb(), "memory_kind": memory.kind}
    rounds = min(opts.rounds, opts.iters)
    for r in range(rounds):
        n = opts.iters // rounds + (1 if r < opts.iters % rounds else 0)
        for s in subjects:
            memory.reset()
            times = [time_call(s.call, device) for _ in range(n)]
            entry = results[s.name]
            entry["times"] += times
            entry["round_medians"].append(statistics.median(times))
            entry["peak_memory_mb"] = max(entry["peak_memory_mb"], memory.peak_mb())
    for s in subjects:
        r = results[s.name]
        r["step_s"] = time_statistics(r["times"])
        r["images_per_s"] = batch_size / r["step_s"]["median"]
        flops = s.flops() if opts.count_flops else None
        r["flops_per_image"] = None if flops is None else flops / batch_size
        r["achieved_tflops"] = None if flops is None else flops / r["step_s"]["median"] / 1e12
        r["mfu"] = r["achieved_tflops"] / opts.peak_tflops if opts.peak_tflops and flops is not None else None
    return results


def speedup(ours: dict, other: dict) -> dict:
    """How many times faster `ours` ran than `other` (entries of `measure`'s result).

    Returns:
      {'from_medians': the ratio of the overall medians, 'per_round': the ratio of the two round medians in
      each round, 'paired': the median of per_round (which cancels load changes between rounds)}.
    """
    paired = [o / u for u, o in zip(ours["round_medians"], other["round_medians"])]
    return {"from_medians": other["step_s"]["median"] / ours["step_s"]["median"],
            "paired": statistics.median(paired), "per_round": paired}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(device: torch.device) -> dict:
    """What the run ran on: {'platform', 'python', 'torch', 'cpu_count', 'threads', 'device', 'cpu' (model
    name), 'load_avg_start' and, on CUDA, 'gpu', 'cuda', 'cudnn'}."""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
            "cpu": cpu or platform.processor(), "load_avg_start": load_average()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info
