"""Time and peak memory of the RetinaNet loss and its gradient, with the one-hot focal loss and the fused one.

    python -m experiments.benchmark.loss_bench --batch 2 --canvas 800x800 --classes 80 --iters 5 --rounds 3

What is timed: `torch.func.grad` of `retina_fn.losses.retinanet_loss` with respect to the head outputs
(class logits [B, A, K] and box deltas [B, A, 4], random), as the train step differentiates it, with
model.loss.fused_focal off ('one-hot') and on ('fused'), for float32 logits and for bfloat16 logits (what
the head gives under autocast). The targets are the real anchors of the canvas assigned to random boxes
(retina_fn.data.random_batch, detector.compute_targets); they are built before anything is measured.

Each variant runs in a fresh subprocess once per round, the variants alternating so that all of them see the
same machine load: one untimed call, one call whose peak memory is measured, then --iters timed calls. The
table gives the median and the 10th / 90th percentiles over every timed call of all rounds, and the peak
memory of one call above what was resident before it (the inputs; the returned gradients count): on the CPU
the process's peak resident set, reset through /proc/self/clear_refs (experiments.benchmark.measurement.
PeakMemory, which falls back to getrusage's never-reset maximum where Linux does not allow the reset); on
CUDA, max allocated. The median of the rounds' peaks is shown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = ("one-hot:float32", "fused:float32", "one-hot:bfloat16", "fused:bfloat16")
_ROOT = Path(__file__).resolve().parents[2]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark.loss_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="images B")
    parser.add_argument("--canvas", default="800x800", help="HxW; 800x800 gives 120,087 anchors, 800x1344 201,600")
    parser.add_argument("--classes", type=int, default=80, help="K")
    parser.add_argument("--max-boxes", type=int, default=10, help="random ground-truth boxes per image")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per variant, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " +
                        ", ".join(VARIANTS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one variant, in a subprocess
    args = parser.parse_args(argv)
    args.canvas_hw = tuple(int(v) for v in args.canvas.lower().split("x"))
    for variant in [args.worker] if args.worker else args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return args


def _worker(args: argparse.Namespace) -> dict:
    """Measures one variant in this process.

    Args:
      args: the parsed command line; args.worker names the variant.

    Returns:
      {'times': seconds of each timed call, 'peak_mb': peak memory of one call above the resident inputs (MiB),
      'memory_kind', 'anchors': A}.
    """
    import torch

    from configs.common import model_config
    from experiments.benchmark.measurement import PeakMemory, time_call
    from retina_fn import anchors as anchor_lib
    from retina_fn import detector, losses
    from retina_fn.data.random_batch import random_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    focal, dtype_name = args.worker.split(":")
    model_cfg = model_config(num_classes=args.classes)
    model_cfg.loss.fused_focal = focal == "fused"

    anchors = anchor_lib.anchors(args.canvas_hw, model_cfg, device)
    batch = random_batch(batch_size=args.batch, canvas=args.canvas_hw, max_boxes=args.max_boxes,
                         num_classes=args.classes, device=device)
    targets = detector.Detector(model_cfg).targets(batch)
    normalizer = losses.loss_normalizer(targets.assignment.positive & targets.anchor_valid, model_cfg.loss)
    gen = torch.Generator(device=device).manual_seed(0)
    b, a, k = args.batch, anchors.shape[0], args.classes
    dtype = getattr(torch, dtype_name)
    # Logits around the head's prior-probability bias (sigmoid(-4.6) = 0.01), as early in training.
    cls_logits = (torch.randn(b, a, k, generator=gen, device=device) * 2 - 4.6).to(dtype)
    box_deltas = (torch.randn(b, a, 4, generator=gen, device=device) * 0.1).to(dtype)
    del batch["image"]

    def objective(cls, box):
        loss, _ = losses.retinanet_loss(cls, box, anchors, targets.anchor_valid, targets.assignment,
                                        batch["boxes"], batch["labels"], model_cfg.loss, model_cfg.coder,
                                        normalizer=normalizer)
        return loss

    loss_and_grad = torch.func.grad(objective, argnums=(0, 1))
    time_call(lambda: loss_and_grad(cls_logits, box_deltas), device)
    memory = PeakMemory(device)
    memory.reset()
    resident = memory.peak_mb()
    time_call(lambda: loss_and_grad(cls_logits, box_deltas), device)
    peak = memory.peak_mb() - resident
    times = [time_call(lambda: loss_and_grad(cls_logits, box_deltas), device) for _ in range(args.iters)]
    return {"times": times, "peak_mb": peak, "memory_kind": memory.kind, "anchors": a}


def _run_worker(variant: str, argv: list[str]) -> dict:
    """One variant in a fresh subprocess (the same flags plus --worker); its result is its last stdout line."""
    command = [sys.executable, "-m", "experiments.benchmark.loss_bench", *argv, "--worker", variant]
    done = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(results: dict[str, list[dict]]) -> str:
    """The markdown table: per variant the time statistics, the peak memory and the ratios to one-hot."""
    import numpy as np

    rows = {}
    for variant, runs in results.items():
        times = [t for run in runs for t in run["times"]]
        rows[variant] = {"median": statistics.median(times), "p10": float(np.quantile(times, 0.1)),
                         "p90": float(np.quantile(times, 0.9)),
                         "peak": statistics.median(run["peak_mb"] for run in runs)}
    lines = ["| focal loss | logits | median s | p10 s | p90 s | peak MiB | speed-up | memory |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, row in rows.items():
        focal, dtype = variant.split(":")
        base = rows.get(f"one-hot:{dtype}")
        speedup = f"{base['median'] / row['median']:.2f}x" if base else "-"
        memory = f"{row['peak'] / base['peak']:.2f}x" if base and base["peak"] > 0 else "-"
        lines.append(f"| {focal} | {dtype} | {row['median']:.3f} | {row['p10']:.3f} | {row['p90']:.3f} | "
                     f"{row['peak']:.0f} | {speedup} | {memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs every variant in alternating rounds of subprocesses and prints the table (or, with --worker, one
    variant's measurements as a JSON line).

    Args:
      argv: the command line without the program name (default: sys.argv[1:]).

    Returns:
      None.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    from experiments.benchmark.measurement import load_average

    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    load_start = load_average()
    for _ in range(args.rounds):
        for variant in variants:
            results[variant].append(_run_worker(variant, argv))
    first = results[variants[0]][0]
    print(f"B={args.batch}, canvas {args.canvas} ({first['anchors']} anchors), K={args.classes}, "
          f"device {args.device}, threads {args.threads or 'default'}, {args.rounds} rounds x {args.iters} "
          f"calls; peak memory: {first['memory_kind']}, above the resident inputs; load average "
          f"{load_start} at the start, {load_average()} at the end")
    print(_table(results))


if __name__ == "__main__":
    main()
