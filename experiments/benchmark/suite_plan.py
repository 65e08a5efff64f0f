"""What a prepared benchmark suite runs: its rows (one measurement each: a mode and config overrides), its plan
(config, canvas, batch, precision, budgets); the synthetic batch every row times is
retina_fn.data.random_batch.config_batch.

    plan = gpu_plan(dry_run=False)      # the 'gpu' suite: R50-FPN 1x, 800 x 1344, batch 16, bf16
    cfg = load_config(plan)             # the plan's config with its canvas, batch and precision written in
    batch = config_batch(cfg, num_classes, device)   # retina_fn.data.random_batch: padded as the loader pads

Running a plan is experiments.benchmark.suite's; its tables are experiments.benchmark.suite_report's.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch

from configs import common

SUITES = ("gpu",)
BOX_BUCKETS = (8, 16, 32, 64)  # the box_buckets rows' data.box_buckets (data.max_boxes is always the last)


class Row(NamedTuple):
    """One measurement of a suite.

    Attributes:
      mode: 'train' | 'infer'.
      name: its name in the table ('eager', 'cuda_graph', 'torchvision', ...).
      doc: what it changes.
      overrides: dotted config path -> value, applied to a copy of the suite's config.
      worker: run it in the worker process under the compile time cap.
    """

    mode: str
    name: str
    doc: str
    overrides: Mapping[str, Any] = {}
    worker: bool = False


class Plan(NamedTuple):
    """What a suite runs and how.

    Attributes:
      config: the config module under configs/ (e.g. 'retinanet_r50_fpn_1x_coco').
      canvas: (H, W); batch: images per step; precision: 'fp32' | 'fp16' | 'bf16'; channels_last: the backbone's.
      iters, warmup: timed and untimed calls per row.
      device: 'cuda' | 'cpu' | 'auto' (retina_fn.parallel.backend's names).
      budget_s: the whole suite's time budget in seconds; rows that would start later are skipped.
      compile_cap_s: the longest the worker may take (less when less of the budget is left).
      rows: the rows, in order; the worker's run after all others.
      profile_steps: profiled calls of the fastest train row (0: no profile).
    """

    config: str
    canvas: tuple[int, int]
    batch: int
    precision: str
    channels_last: bool
    iters: int
    warmup: int
    device: str
    budget_s: float
    compile_cap_s: float
    rows: tuple[Row, ...]
    profile_steps: int = 3


def gpu_rows() -> tuple[Row, ...]:
    """The 'gpu' suite's rows (see the module docstring)."""
    graph, fused = {"train.cuda_graph": True}, {"model.loss.fused_focal": True}
    buckets = {"data.box_buckets": BOX_BUCKETS}
    return (
        Row("train", "eager", "the pure step, eager"),
        Row("train", "cuda_graph", "the whole step as one CUDA graph", graph),
        Row("train", "torchvision", "torchvision's RetinaNet R50-FPN: model(images, targets), backward, SGD"),
        Row("infer", "eager", "forward + post-processing, eager"),
        Row("infer", "cuda_graph", "the forward as a CUDA graph, post-processing eager", graph),
        Row("infer", "torchvision", "torchvision's RetinaNet R50-FPN, model.eval()"),
        Row("train", "fused_focal", "fused focal loss (one pass, integer labels)", fused),
        Row("train", "fused_focal+cuda_graph", "fused focal loss, CUDA graph", {**fused, **graph}),
        Row("train", "box_buckets", f"ground truth padded to a bucket of {BOX_BUCKETS}", buckets),
        Row("train", "box_buckets+cuda_graph", "box buckets, CUDA graph", {**buckets, **graph}),
        Row("train", "fused_focal+box_buckets+cuda_graph", "all three", {**fused, **buckets, **graph}),
        # compile+cuda_graph first: the likeliest fastest row gets the time cap's first minutes; 'compile' then
        # reuses inductor's caches of the same graph
        Row("train", "compile+cuda_graph", "the compiled step (train.compile_scope 'auto') captured as a CUDA graph",
            {"train.compile": True, **graph}, worker=True),
        Row("train", "compile", "torch.compile (train.compile_scope 'auto')", {"train.compile": True}, worker=True),
        Row("infer", "compile", "torch.compile of the eval step", {"train.compile": True}, worker=True),
    )


def gpu_plan(dry_run: bool = False) -> Plan:
    """The 'gpu' suite: R50-FPN 1x, 800 x 1344, batch 16, bf16, about 8 minutes; dry_run: the same rows on the
    CPU with configs/smoke.py at 64 x 64, batch 2, one call each (about a minute on two cores, most of it the
    compile time cap: it checks the plumbing, its figures mean nothing)."""
    if dry_run:
        return Plan("smoke", (64, 64), 2, "bf16", True, iters=1, warmup=1, device="cpu", budget_s=600.0,
                    compile_cap_s=60.0, rows=gpu_rows(), profile_steps=1)
    return Plan("retinanet_r50_fpn_1x_coco", (800, 1344), 16, "bf16", True, iters=10, warmup=3, device="cuda",
                budget_s=480.0, compile_cap_s=300.0, rows=gpu_rows())


def load_config(plan: Plan):
    """The plan's config with its canvas, batch, precision and channels_last written in."""
    module = __import__(f"configs.{plan.config}", fromlist=["get_config"])
    cfg = module.get_config()
    h, w = plan.canvas
    return common.override(cfg, **{"data.images_per_device": plan.batch, "data.eval_images_per_device": plan.batch,
                                   "data.landscape_canvas": (h, w), "data.portrait_canvas": (w, h),
                                   "train.precision": plan.precision, "train.opt_level": None,
                                   "model.backbone.channels_last": plan.channels_last})


def missing_fields(cfg, overrides: Mapping[str, Any]) -> list[str]:
    """The dotted paths of `overrides` that the config does not have."""
    missing = []
    for dotted in overrides:
        node = cfg
        for key in dotted.split("."):
            if not hasattr(node, "keys") or key not in node.keys():
                missing.append(dotted)
                break
            node = node[key]
    return missing

