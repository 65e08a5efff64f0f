"""Time of the per-step targets (anchor valid flags + MaxIoU assignment) for ground truth padded to
data.max_boxes and to each box bucket (data.box_buckets), on the same real boxes; checks that every padding
gives the same assignment.

    python -m experiments.benchmark.assign_buckets --config configs/retinanet_r50_fpn_1x_coco.py \\
        --batch 2 --canvas 800x1344 --boxes 7 --iters 5 --json runs/bench/assign_buckets.json

--boxes lists real boxes per image (repeated to the batch size; COCO train2017 averages about 7.3), drawn as
retina_fn.data.random_batch draws them. Rows: G (the padded count), median / p10 / p90 seconds per call,
the speed-up over G = data.max_boxes, peak memory (accelerators: max allocated; CPU: the process's peak
resident set) and whether the assignment equals the one with G = data.max_boxes bit for bit. Buckets come
from data.box_buckets, or (8, 16, 32, 64, 128) when it is empty; only those holding the largest count are
timed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from experiments.benchmark.measurement import PeakMemory, machine_info, time_call, time_statistics
from experiments.benchmark.options import parse_canvas
from retina_fn import detector
from retina_fn.data.batching import bucket_sizes
from retina_fn.data.random_batch import random_batch
from retina_fn.parallel import backend

DEFAULT_BUCKETS = (8, 16, 32, 64, 128)


def _padded_to(batch: dict, g: int) -> dict:
    """The batch with its ground truth cut to the first g rows (all real rows lie within them)."""
    return dict(batch, boxes=batch["boxes"][:, :g].contiguous(), labels=batch["labels"][:, :g].contiguous(),
                box_valid=batch["box_valid"][:, :g].contiguous())


def _same(a: detector.Targets, b: detector.Targets) -> bool:
    """Bitwise equality of two targets (valid flags and every assignment field)."""
    return torch.equal(a.anchor_valid, b.anchor_valid) and all(
        torch.equal(x, y) for x, y in zip(a.assignment, b.assignment))


def measure_assignment(cfg, *, batch: int, canvas: tuple[int, int], boxes: Sequence[int], iters: int, warmup: int,
                       device: torch.device, seed: int = 0) -> dict:
    """Times `detector.compute_targets` for each padding of one batch's ground truth.

    Args:
      cfg: the whole config (model anchors and assigner; data.max_boxes, data.max_ignore_boxes, data.box_buckets).
      batch: images per batch (B).
      canvas: (H, W).
      boxes: real boxes per image, repeated cyclically over the B images (each at most data.max_boxes).
      iters: timed calls per padding; warmup: untimed calls first.
      device: where it runs.
      seed: of the random boxes.

    Returns:
      {'anchors': A, 'batch', 'canvas', 'boxes' (per image), 'max_boxes', 'rows': [{'g', 'step_s'
      (time_statistics), 'speedup' (median at max_boxes / median here), 'peak_memory_mb', 'identical'}], 'machine'}.

    Raises:
      ValueError: a count above data.max_boxes, or non-positive iters / batch.
    """
    max_boxes = int(cfg.data.max_boxes)
    counts = [int(boxes[i % len(boxes)]) for i in range(batch)]
    if batch < 1 or iters < 1 or warmup < 0 or not boxes or max(counts) > max_boxes or min(counts) < 0:
        raise ValueError(f"need --batch >= 1, --iters >= 1, --warmup >= 0 and 0 <= --boxes <= data.max_boxes="
                         f"{max_boxes}; got {batch}, {iters}, {warmup}, {list(boxes)}")
    full = random_batch(counts, canvas=canvas, max_boxes=max_boxes, max_ignore_boxes=int(cfg.data.max_ignore_boxes),
                        num_classes=int(cfg.model.num_classes), seed=seed, device=device)
    anchors = detector.Detector(cfg.model).anchors(canvas, device)
    buckets = bucket_sizes(tuple(cfg.data.box_buckets) or DEFAULT_BUCKETS, max_boxes)
    sizes = [max_boxes] + [g for g in buckets if max(counts) <= g < max_boxes]
    reference = detector.Detector(cfg.model).targets(full)
    rows = []
    for g in sizes:
        padded = _padded_to(full, g)
        for _ in range(warmup):
            time_call(lambda: detector.Detector(cfg.model).targets(padded), device)
        peak = PeakMemory(device)
        peak.reset()
        times = [time_call(lambda: detector.Detector(cfg.model).targets(padded), device) for _ in range(iters)]
        rows.append({"g": g, "step_s": time_statistics(times), "peak_memory_mb": peak.peak_mb(),
                     "identical": _same(detector.Detector(cfg.model).targets(padded), reference)})
    base = rows[0]["step_s"]["median"]
    for row in rows:
        row["speedup"] = base / row["step_s"]["median"]
    return {"anchors": int(anchors.shape[0]), "batch": batch, "canvas": list(canvas), "boxes": counts,
            "max_boxes": max_boxes, "rows": rows, "machine": machine_info(device)}


def format_table(result: dict) -> str:
    """The result as a header line and one row per padding."""
    m = result["machine"]
    lines = [f"targets (valid flags + MaxIoU assignment) | batch {result['batch']} | canvas "
             f"{result['canvas'][0]}x{result['canvas'][1]} | {result['anchors']} anchors | real boxes "
             f"{result['boxes']} | {m['device']} | torch {m['torch']} | {m['threads']} threads",
             f"  {'G':>5} {'median s':>9} {'p10 s':>8} {'p90 s':>8} {'speed-up':>9} {'peak MB':>8} {'identical':>9}"]
    for r in result["rows"]:
        s = r["step_s"]
        lines.append(f"  {r['g']:>5} {s['median']:9.4f} {s['p10']:8.4f} {s['p90']:8.4f} {r['speedup']:9.2f} "
                     f"{r['peak_memory_mb']:8.0f} {str(r['identical']):>9}")
    return "\n".join(lines)


def main() -> None:
    """The command line (see the module docstring)."""
    from absl import flags
    from ml_collections import config_flags

    from experiments.benchmark import report

    config = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                             lock_config=True)
    batch = flags.DEFINE_integer("batch", 2, "Images per batch.")
    canvas = flags.DEFINE_string("canvas", None, "HxW canvas (default: data.landscape_canvas).")
    boxes = flags.DEFINE_list("boxes", ["7"], "Real boxes per image, repeated over the batch.")
    iters = flags.DEFINE_integer("iters", 5, "Timed calls per padding.")
    warmup = flags.DEFINE_integer("warmup", 1, "Untimed calls per padding first.")
    threads = flags.DEFINE_integer("threads", None, "torch.set_num_threads (default: torch's choice).")
    device = flags.DEFINE_enum("device", "auto", list(backend.REQUESTS), "Where to run.")
    out = flags.DEFINE_string("json", None, "Also write the result here.")

    report.run_tool(lambda: measure_assignment(
        config.value, batch=batch.value,
        canvas=parse_canvas(canvas.value) if canvas.value else tuple(config.value.data.landscape_canvas),
        boxes=[int(b) for b in boxes.value], iters=iters.value, warmup=warmup.value,
        device=backend.resolve_device(device.value).device), format_table, threads, out)


if __name__ == "__main__":
    main()
