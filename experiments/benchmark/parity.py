"""`--check-steps N`: does a compiled or graphed step compute what the eager step computes?

Train: N steps of each from one state on one batch, each step's METRICS compared (relative), then the parameter
update and optimiser state (||a - b|| / ||b||). Infer: one call's per-image valid count (relative) and sorted
valid scores (absolute). bf16 / fp16 allow 100 times fp32's tolerance (a compiled kernel may keep float32 where
eager autocast rounds). A NaN never passes."""

from __future__ import annotations

import math
from typing import Callable

import torch

from retina_fn.engine.hooks import host_scalars
from retina_fn import tree

METRICS = ("loss", "loss_cls", "loss_box", "grad_norm")
_LOW = {"loss": 2e-2, "grad_norm": 5e-2, "update": 5e-2, "count": 5e-2, "score": 2e-2}
TOLERANCES = {"fp32": {"loss": 2e-4, "grad_norm": 5e-4, "update": 5e-4, "count": 2e-2, "score": 2e-4},
              "bf16": _LOW, "fp16": _LOW}


def relative(a: float, b: float) -> float:
    """|a - b| / |b| (|a - b| where b is 0)."""
    return abs(a - b) / abs(b) if b else abs(a - b)


def tree_relative(a: tree.Tree, b: tree.Tree) -> float:
    """||a - b|| / ||b|| (float64) over the floating leaves of two trees of one structure; b is the reference."""
    num = den = 0.0
    flat_b = tree.flatten_by_path(b)
    for path, x in tree.flatten_by_path(a).items():
        if torch.is_floating_point(x):
            x, y = x.detach().double(), flat_b[path].detach().double()
            num += float(((x - y) ** 2).sum())
            den += float((y ** 2).sum())
    return math.sqrt(num) / math.sqrt(den) if den else math.sqrt(num)


def _verdict(diffs: dict, tolerance: dict) -> dict:
    failed = [name for name, value in diffs.items()
              if not all(v <= tolerance[name] for v in (value if isinstance(value, list) else [value]))]
    return {"tolerance": tolerance, "differences": diffs, "failed": failed, "ok": not failed}


def compare_train(step: Callable, eager_step: Callable, start: dict, batch: dict, steps: int,
                  tolerance: dict) -> dict:
    """Runs `steps` steps of `step` and `eager_step` (both `(state, batch) -> (state, metrics)`) from `start`:
    {'steps', 'tolerance', 'differences' ({metric: [per step], 'update', 'opt_state'}), 'failed', 'ok'}."""
    sub = ref = start
    diffs = {name: [] for name in METRICS}
    for _ in range(steps):
        sub, m_sub = step(sub, batch)
        m_sub = host_scalars({name: m_sub[name] for name in METRICS})  # before the next call overwrites them
        ref, m_ref = eager_step(ref, batch)
        m_ref = host_scalars({name: m_ref[name] for name in METRICS})
        for name in METRICS:
            diffs[name].append(relative(m_sub[name], m_ref[name]))
    update = tree_relative(tree.map(torch.sub, sub["params"], start["params"]),
                           tree.map(torch.sub, ref["params"], start["params"]))
    diffs.update(update=update, opt_state=tree_relative(sub["opt"], ref["opt"]))
    tolerance = {**{name: tolerance["loss"] for name in METRICS}, "grad_norm": tolerance["grad_norm"],
                 "update": tolerance["update"], "opt_state": tolerance["update"]}
    return {"steps": steps, **_verdict(diffs, tolerance)}


def compare_infer(eval_step: Callable, eager_eval_step: Callable, params: dict, batch: dict, tolerance: dict) -> dict:
    """One call of each `(params, batch) -> Detections` step, compared: {'steps': 1, 'tolerance', 'differences'
    ({'count', 'score'}), 'failed', 'ok'}."""
    sub, ref = eval_step(params, batch), eager_eval_step(params, batch)
    n_sub, n_ref = sub.valid.sum(1), ref.valid.sum(1)
    count = float(((n_sub - n_ref).abs() / n_ref.clamp(min=1)).max())

    def sorted_scores(d):
        return torch.where(d.valid, d.scores.float(), torch.full_like(d.scores, -1.0)).sort(1, descending=True).values

    both = torch.arange(sub.scores.shape[1], device=n_sub.device)[None] < torch.minimum(n_sub, n_ref)[:, None]
    gap = (sorted_scores(sub) - sorted_scores(ref)).abs()
    score = float(torch.where(both, gap, torch.zeros_like(gap)).max()) if gap.numel() else 0.0
    return {"steps": 1, **_verdict({"count": count, "score": score}, tolerance)}
