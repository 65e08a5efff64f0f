"""Timing, peak memory and FLOP counting of benchmark subjects, and what the machine was.

A `Subject` is one thing to time (our step, a variant of it, torchvision's model); `measure` times several
of them in alternating rounds and `speedup` compares two of the results.
"""

from __future__ import annotations

import os
import platform
import resource
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
      flops: runs one step under the FLOP counter (eager) and returns the count, or None when not counted.
    """

    name: str
    call: Callable[[], object]
    flops: Callable[[], int | None]


def _device_module(device: torch.device):
    """torch.cuda, torch.npu, ... for an accelerator (None for the CPU or a kind torch has no module for)."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of fn, up to the end of the device work it queued.

    Args:
      fn: the call to time.
      device: synchronised after the call.

    Returns:
      Wall-clock seconds.
    """
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def time_statistics(times: list[float]) -> dict:
    """Summary of timed calls.

    Args:
      times: seconds per call (at least one).

    Returns:
      {'median', 'p10', 'p90', 'min', 'max', 'mean' (seconds), 'n' (count)}.
    """
    ordered = sorted(times)
    return {"median": statistics.median(ordered), "p10": float(np.quantile(ordered, 0.1)),
            "p90": float(np.quantile(ordered, 0.9)), "min": ordered[0], "max": ordered[-1],
            "mean": statistics.fmean(ordered), "n": len(ordered)}


class PeakMemory:
    """Peak memory of what runs between reset() and peak_mb().

    On an accelerator: max allocated (torch.<kind>.max_memory_allocated). On the CPU: the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs on Linux; otherwise getrusage's ru_maxrss,
    which never resets, so it covers everything that ran before too).

    Args:
      device: the device whose memory is watched.
    """

    def __init__(self, device: torch.device):
        self.device = device
        module = _device_module(device)
        self._accelerator = module if module is not None and hasattr(module, "max_memory_allocated") else None
        if self._accelerator is not None:
            self.kind = f"{device.type}_max_allocated"
            self._resettable = True
        else:
            self._resettable = self._try_reset_rss()
            self.kind = "cpu_rss_peak" if self._resettable else "cpu_ru_maxrss_process"

    @staticmethod
    def _try_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return PeakMemory._vm_hwm_kb() is not None
        except OSError:
            return False

    @staticmethod
    def _vm_hwm_kb() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def reset(self) -> None:
        """Starts a new peak (where the platform allows; see the class docstring).

        Returns:
          None.
        """
        if self._accelerator is not None:
            self._accelerator.reset_peak_memory_stats(self.device)
        elif self._resettable:
            self._try_reset_rss()

    def peak_mb(self) -> float:
        """The peak memory since the last reset.

        Returns:
          MiB.
        """
        if self._accelerator is not None:
            return self._accelerator.max_memory_allocated(self.device) / 2**20
        if self._resettable:
            return self._vm_hwm_kb() / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, as torch.utils.flop_counter.FlopCounterMode counts them (convolutions and matrix
    products, 2 per multiply-add; eager code only: the counter cannot enter compiled graphs).

    Args:
      fn: the call to count.

    Returns:
      The total FLOP count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def measure(subjects: list[Subject], batch_size: int, opts: Options, device: torch.device) -> dict[str, dict]:
    """Times the subjects: `opts.warmup` untimed calls of each, then `opts.iters` timed calls of each, split
    into `opts.rounds` blocks that alternate between the subjects (so slow drifts of a shared machine's
    load hit all of them alike); then counts each one's FLOPs unless `opts.count_flops` is False.

    Args:
      subjects: what to time, in order.
      batch_size: images per call.
      opts: iters, warmup, rounds, count_flops, peak_tflops.
      device: synchronised after every call; its peak memory is recorded.

    Returns:
      {subject name: {'step_s' (time_statistics over all timed calls), 'times', 'round_medians',
      'images_per_s' (from the median), 'first_call_s' (None without warm-up), 'warmup_s',
      'peak_memory_mb', 'memory_kind', 'flops_per_image', 'achieved_tflops', 'mfu' (the last three None
      when not counted or, for mfu, without peak_tflops)}}.
    """
    memory = PeakMemory(device)
    results = {}
    for s in subjects:
        memory.reset()
        warm = [time_call(s.call, device) for _ in range(opts.warmup)]
        results[s.name] = {"first_call_s": warm[0] if warm else None, "warmup_s": warm, "times": [],
                           "round_medians": [], "peak_memory_mb": memory.peak_mb(), "memory_kind": memory.kind}
    rounds = max(1, min(opts.rounds, opts.iters))
    for r in range(rounds):
        n = opts.iters // rounds + (1 if r < opts.iters % rounds else 0)
        for s in subjects:
            memory.reset()
            times = [time_call(s.call, device) for _ in range(n)]
            entry = results[s.name]
            entry["times"].extend(times)
            entry["round_medians"].append(statistics.median(times))
            entry["peak_memory_mb"] = max(entry["peak_memory_mb"], memory.peak_mb())
    for s in subjects:
        r = results[s.name]
        r["step_s"] = time_statistics(r["times"])
        r["images_per_s"] = batch_size / r["step_s"]["median"]
        flops = s.flops() if opts.count_flops else None
        r["flops_per_image"] = None if flops is None else flops / batch_size
        r["achieved_tflops"] = None if flops is None else flops / r["step_s"]["median"] / 1e12
        r["mfu"] = (r["achieved_tflops"] / opts.peak_tflops
                    if opts.peak_tflops and r["achieved_tflops"] is not None else None)
    return results


def speedup(ours: dict, other: dict) -> dict:
    """How many times faster `ours` ran than `other`.

    Args:
      ours, other: entries of `measure`'s result (read: step_s.median, round_medians).

    Returns:
      {'from_medians': the ratio of the overall medians, 'per_round': the ratio of the two round medians
      in each round, 'paired': the median of per_round (which cancels load changes between rounds)}.
    """
    paired = [o / u for u, o in zip(ours["round_medians"], other["round_medians"])]
    return {"from_medians": other["step_s"]["median"] / ours["step_s"]["median"],
            "paired": statistics.median(paired), "per_round": paired}


def load_average() -> list[float] | None:
    """The machine's load now.

    Returns:
      The 1, 5 and 15 minute load averages (rounded), or None where the platform has none.
    """
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict:
    """What the run ran on.

    Args:
      device: the benchmark's device.

    Returns:
      {'platform', 'python', 'torch', 'cpu_count', 'threads', 'device', 'cpu' (model name), 'load_avg_start'
      and, on an accelerator that names itself, 'gpu' (CUDA) or '<kind>' (e.g. 'npu')}.
    """
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    module = _device_module(device)
    if module is not None and hasattr(module, "get_device_name"):
        info["gpu" if device.type == "cuda" else device.type] = module.get_device_name(device)
    info["load_avg_start"] = load_average()
    return info
