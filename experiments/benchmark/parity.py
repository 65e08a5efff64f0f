"""Does a compiled or graphed step compute what the eager step computes? The check of `--check-steps N`.

Train: from one initial state, N steps of the subject and of the eager step (the same config with train.compile
and train.cuda_graph off) on the same batch and keys; each step's loss, loss_cls, loss_box and grad_norm are
compared (relative difference), and after N steps the parameter update (params after - params before) and the
optimiser state (the momentum: a running sum of gradients), each as one relative difference over its whole
tree, ||a - b|| / ||b||. Infer: one call's detections, per image the count of valid detections (relative) and
the sorted valid scores (absolute).

TOLERANCES: fp32 allows what reordered float reductions give, with a wide margin (the compiled CPU step of a
small model, 3 steps: losses within 2.1e-7, the update within 5.2e-6); bf16 and fp16 autocast round each eager
op's output to 8 or 11 mantissa bits where a compiled kernel may keep float32 in between, so they allow 100 times
more. A NaN never passes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from retina_fn.engine.hooks import host_scalars
from retina_fn import schema, tree

METRICS = ("loss", "loss_cls", "loss_box", "grad_norm")
_LOW = {"loss": 2e-2, "grad_norm": 5e-2, "update": 5e-2, "count": 5e-2, "score": 2e-2}
TOLERANCES = {"fp32": {"loss": 2e-4, "grad_norm": 5e-4, "update": 5e-4, "count": 2e-2, "score": 2e-4},
              "bf16": _LOW, "fp16": _LOW}


def tolerance(cfg) -> dict:
    """TOLERANCES' entry for the config's train.precision."""
    return TOLERANCES[schema.precision_name(cfg.train)]


def relative(a: float, b: float) -> float:
    """|a - b| / |b| (|a - b| where b is 0)."""
    return abs(a - b) / abs(b) if b else abs(a - b)


def tree_relative(a: tree.Tree, b: tree.Tree) -> float:
    """||a - b|| / ||b|| over all floating-point leaves of two trees of one structure (0 when both are 0).

    Args:
      a, b: trees of tensors; b is the reference.

    Returns:
      The relative difference (float64 sums); NaN when a leaf holds NaN.
    """
    num = den = 0.0
    flat_b = tree.flatten_by_path(b)
    for path, x in tree.flatten_by_path(a).items():
        if torch.is_floating_point(x):
            x, y = x.detach().double(), flat_b[path].detach().double()
            num += float(((x - y) ** 2).sum())
            den += float((y ** 2).sum())
    return math.sqrt(num) / math.sqrt(den) if den else math.sqrt(num)


def _verdict(diffs: dict, tolerance: dict) -> dict:
    """diffs {name: value or list} -> {'tolerance', 'differences', 'failed' (names over tolerance), 'ok'}."""
    failed = [name for name, value in diffs.items()
              if not all(v <= tolerance[name] for v in (value if isinstance(value, list) else [value]))]
    return {"tolerance": tolerance, "differences": diffs, "failed": failed, "ok": not failed}


def compare_train(step: Callable, eager_step: Callable, start: dict, batch: dict, steps: int,
                  tolerance: dict) -> dict:
    """Runs `steps` steps of `step` and of `eager_step` from `start` and compares them (module docstring).

    Args:
      step: the subject, `step(state, batch) -> (state, metrics)` (a graphed step may return its static
        buffers and overwrite its metrics on the next call: each is read before that).
      eager_step: the reference of the same signature.
      start: the initial train state (left unchanged).
      batch: the batch of every step.
      steps: how many steps (at least 1).
      tolerance: TOLERANCES' entry: 'loss' (loss, loss_cls, loss_box), 'grad_norm', 'update' (parameter update
        and optimiser state).

    Returns:
      {'steps', 'tolerance', 'differences' ({'loss': [one per step], ..., 'update', 'opt_state'}), 'failed',
      'ok'}.
    """
    sub = ref = start
    diffs = {name: [] for name in METRICS}
    for _ in range(steps):
        sub, m_sub = step(sub, batch)
        m_sub = host_scalars({name: m_sub[name] for name in METRICS})
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
    """One call of each eval step on the same parameters and batch, compared (module docstring).

    Args:
      eval_step, eager_eval_step: `(params, batch) -> Detections` (scores [B, M], valid bool [B, M]).
      params: the full parameter tree; batch: the batch.
      tolerance: TOLERANCES' entry ('count', 'score').

    Returns:
      {'steps': 1, 'tolerance', 'differences' ({'count', 'score'}), 'failed', 'ok'}.
    """
    sub, ref = eval_step(params, batch), eager_eval_step(params, batch)
    n_sub, n_ref = sub.valid.sum(1), ref.valid.sum(1)
    count = float(((n_sub - n_ref).abs() / n_ref.clamp(min=1)).max())

    def sorted_scores(d):
        return torch.where(d.valid, d.scores.float(), torch.full_like(d.scores, -1.0)).sort(1, descending=True).values

    both = torch.arange(sub.scores.shape[1], device=n_sub.device)[None] < torch.minimum(n_sub, n_ref)[:, None]
    gap = (sorted_scores(sub) - sorted_scores(ref)).abs()
    score = float(torch.where(both, gap, torch.zeros_like(gap)).max()) if gap.numel() else 0.0
    return {"steps": 1, **_verdict({"count": count, "score": score}, tolerance)}
