"""Timing, peak memory and FLOP counts of benchmark subjects, the data loader's speed, and what the machine was."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, NamedTuple

import numpy as np
import torch

from experiments.benchmark.options import Options
from retina_fn import rng
from retina_fn.engine.hooks import synchronize


class Subject(NamedTuple):
    """One thing to time: name ('ours', 'ours-<variant>', 'torchvision'), call (one step), flops (one eager step's
    FLOP count), check (steps -> parity's comparison with the eager step; None when eager)."""

    name: str
    call: Callable[[], object]
    flops: Callable[[], int]
    check: Callable[[int], dict] | None = None


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


class PeakMemory:
    """Peak memory in MiB since reset(): max allocated on an accelerator, the peak resident set (VmHWM) on the CPU."""

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
    """Returns dropped subjects' memory to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one eager call as FlopCounterMode counts them (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(subjects: list[Subject], batch_size: int, opts: Options, device: torch.device) -> dict[str, dict]:
    """Warm-up calls, then opts.iters timed calls of each subject in opts.rounds alternating blocks (a drift of
    the machine's load hits all alike), then FLOPs: {name: {'step_s' ({median, p10, p90, min, max, mean, n}),
    'times', 'round_medians', 'images_per_s', 'first_call_s', 'warmup_s', 'peak_memory_mb', 'memory_kind',
    'flops_per_image', 'achieved_tflops', 'mfu'}}."""
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
            times, entry = [time_call(s.call, device) for _ in range(n)], results[s.name]
            entry["times"] += times
            entry["round_medians"].append(statistics.median(times))
            entry["peak_memory_mb"] = max(entry["peak_memory_mb"], memory.peak_mb())
    for s in subjects:
        r, times = results[s.name], results[s.name]["times"]
        r["step_s"] = {"median": statistics.median(times), "p10": float(np.quantile(times, 0.1)),
                       "p90": float(np.quantile(times, 0.9)), "min": min(times), "max": max(times),
                       "mean": statistics.fmean(times), "n": len(times)}
        r["images_per_s"] = batch_size / r["step_s"]["median"]
        flops = s.flops() if opts.count_flops else None
        r["flops_per_image"] = None if flops is None else flops / batch_size
        r["achieved_tflops"] = None if flops is None else flops / r["step_s"]["median"] / 1e12
        r["mfu"] = r["achieved_tflops"] / opts.peak_tflops if opts.peak_tflops and flops is not None else None
    return results


def speedup(ours: dict, other: dict) -> dict:
    """How many times faster `ours` ran than `other`: {'from_medians', 'per_round', 'paired' (median of
    per_round, which cancels load changes between rounds)}."""
    paired = [o / u for u, o in zip(ours["round_medians"], other["round_medians"])]
    return {"from_medians": other["step_s"]["median"] / ours["step_s"]["median"],
            "paired": statistics.median(paired), "per_round": paired}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(device: torch.device) -> dict:
    """What the run ran on: platform, versions, CPU, threads, load and, on CUDA, the GPU."""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
            "cpu": cpu or platform.processor(), "load_avg_start": load_average()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def measure_data(cfg, opts: Options, batch_size: int) -> dict:
    """Times the config's training loader (cfg.data edited in place): throughput.measure's figures plus
    'source', 'workers', 'image_dtype', 'canvas_mb' (one canvas), 'gt_rows' (padded ground-truth rows), 'scale'."""
    from retina_fn.data import coco, loader as data_loader, synthetic, throughput

    with tempfile.TemporaryDirectory(prefix="retina_bench_") as tmp:
        source = "configured dataset"
        if cfg.data.dataset != "coco" or not os.path.isfile(os.path.join(cfg.data.root or "", cfg.data.train_ann)):
            size = opts.image_size or max(cfg.data.landscape_canvas)
            count = 2 * (opts.warmup + opts.iters + 1) * batch_size  # the sampler drops incomplete aspect batches
            synthetic.generate_synthetic(tmp, count, 1, opts.seed, image_size=int(size), num_classes=5)
            cfg.data.update(root=tmp, train_ann="annotations/instances_train.json", train_images="train",
                            filter_empty_gt=False, min_size=0)
            source = f"{count} synthetic JPEGs of about {size} px"
        if opts.canvas is not None:
            cfg.data.scale = (max(opts.canvas), min(opts.canvas))
        loader = data_loader.make_train_loader(cfg.data, coco.load_split(cfg.data, "train"), rank=0, world_size=1,
                                               key=rng.key(opts.seed))
        gt_rows, last = [], {}

        def recorded():
            for batch in loader:
                gt_rows.append(int(batch["box_valid"].shape[1]))
                last["image"] = batch["image"][0]
                yield batch

        result = throughput.measure(recorded(), num_batches=opts.iters, warmup=opts.warmup)
        image = last["image"]
        result.update(source=source, workers=data_loader.resolve_workers(cfg.data.workers), gt_rows=gt_rows,
                      image_dtype=str(image.dtype).replace("torch.", ""),
                      canvas_mb=image.numel() * image.element_size() / 1e6, scale=tuple(cfg.data.scale))
        del loader  # stops its workers before their files go
    return result
