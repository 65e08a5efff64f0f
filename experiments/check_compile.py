"""Does torch.compile of the whole pure train step match the eager step, without graph breaks?

    python -m experiments.check_compile --config configs/smoke.py --canvas 128x128 --batch 2 --steps 3

Builds the eager step (make_train_step with train.compile=False), asks torch._dynamo.explain how many
graphs and graph breaks one call makes, compiles the step with fullgraph=True (a graph break raises),
then runs `steps` steps from the same initial state eagerly and compiled on the same batches and prints
the largest differences of the metrics (each step) and of the final parameters and optimiser state, the
compile time (first call) and the time per step of each. Adam-type optimisers turn rounding-level
gradient differences into lr-sized updates wherever a gradient is near zero, so compare with SGD
(--config.optim.name=sgd) to see the step's own numerical agreement. Slow (minutes on a CPU): an experiment, not a test;
tests/test_benchmark.py compiles the whole step on a tiny model instead.
"""

from __future__ import annotations

import json
import time

import torch

from experiments import benchmark, class_count
from retina_fn import rng, tree
from retina_fn.data.random_batch import random_batch
from retina_fn.train import build_optimizer, init_train_state, make_train_step


def max_differences(a: tree.Tree, b: tree.Tree) -> dict:
    """How far tree a is from tree b.

    Args:
      a, b: trees of the same structure; b is the reference.

    Returns:
      {'max_abs': the largest |a - b| over all leaves, 'worst': the path of that leaf, 'tree_rel': max_abs /
      the largest |b| over all leaves, 'leaf_rel': the largest per-leaf max|a - b| / max|b| (large for
      leaves whose values are all near zero)}; all inf (worst: that leaf) when integer leaves differ.
    """
    max_abs, leaf_rel, scale, worst = 0.0, 0.0, 0.0, ""
    flat_b = tree.flatten_by_path(b)
    for path, x in tree.flatten_by_path(a).items():
        y = flat_b[path]
        if not torch.is_floating_point(x):
            if not torch.equal(x, y):
                return {"max_abs": float("inf"), "tree_rel": float("inf"), "leaf_rel": float("inf"), "worst": path}
            continue
        if x.numel() == 0:
            continue
        diff = float((x.double() - y.double()).abs().max())
        largest = float(y.double().abs().max())
        if diff > max_abs:
            max_abs, worst = diff, path
        leaf_rel = max(leaf_rel, diff / max(largest, 1e-30))
        scale = max(scale, largest)
    return {"max_abs": max_abs, "tree_rel": max_abs / max(scale, 1e-30), "leaf_rel": leaf_rel, "worst": worst}


def check(cfg, steps: int, batch_size: int, canvas: tuple[int, int], seed: int = 0) -> dict:
    """Runs the comparison on the CPU (see the module docstring).

    Args:
      cfg: the whole config; batch size, canvases and train.compile=False are written into it.
      steps: steps to run each way (the first compiles); at least 1.
      batch_size: images per step.
      canvas: (H, W) of the random batches.
      seed: of the initial state and of the batches (seed + step).

    Returns:
      {'graphs', 'graph_breaks', 'break_reasons' (torch._dynamo.explain of one eager step), 'steps',
      'compile_s', 'compiled_step_s', 'eager_step_s', 'metrics' (max_differences per step), 'params',
      'opt' (max_differences of the final trees), 'loss_eager', 'loss_compiled', 'torch'}.
    """
    num_classes = class_count.require_int(cfg, "experiments.check_compile")  # before any model is built
    cfg.data.images_per_device = batch_size
    cfg.data.landscape_canvas = canvas
    cfg.data.portrait_canvas = canvas[::-1]
    cfg.train.compile = False
    device = torch.device("cpu")
    optimizer = build_optimizer(cfg)
    eager = make_train_step(cfg, optimizer, steps_per_epoch=1000, global_batch=batch_size, device=device)
    batches = [random_batch(batch_size=batch_size, canvas=canvas, max_boxes=cfg.data.max_boxes,
                            max_ignore_boxes=cfg.data.max_ignore_boxes,
                            num_classes=num_classes, seed=seed + i, device=device) for i in range(steps)]
    state0 = init_train_state(cfg, rng.key(seed), optimizer, device=device)

    explanation = torch._dynamo.explain(eager)(state0, batches[0])
    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True)

    results = {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
               "break_reasons": [str(r.reason) for r in explanation.break_reasons]}
    eager_state, comp_state = state0, state0
    eager_times, comp_times, metric_diffs, losses_eager, losses_compiled = [], [], [], [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        eager_state, eager_metrics = eager(eager_state, batch)
        eager_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        comp_state, comp_metrics = compiled(comp_state, batch)
        comp_times.append(time.perf_counter() - t0)
        metric_diffs.append(max_differences(comp_metrics, eager_metrics))
        losses_eager.append(eager_metrics["loss"])
        losses_compiled.append(comp_metrics["loss"])
    results.update(
        steps=steps, compile_s=comp_times[0], compiled_step_s=comp_times[1:], eager_step_s=eager_times,
        metrics=metric_diffs, params=max_differences(comp_state["params"], eager_state["params"]),
        opt=max_differences(comp_state["opt"], eager_state["opt"]),
        loss_eager=[float(m) for m in losses_eager], loss_compiled=[float(m) for m in losses_compiled],
        torch=torch.__version__)
    return results


def _main():
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", "configs/smoke.py", "A config file (small: this compiles it).",
                                             lock_config=True)
    steps = flags.DEFINE_integer("steps", 3, "Steps to compare (the first compiles).")
    batch = flags.DEFINE_integer("batch", 2, "Images per step.")
    canvas = flags.DEFINE_string("canvas", "128x128", "HxW canvas.")
    threads = flags.DEFINE_integer("threads", None, "torch.set_num_threads.")
    out = flags.DEFINE_string("json", None, "Also write the figures here.")

    def main(argv):
        del argv
        if threads.value:
            torch.set_num_threads(threads.value)
        result = check(config.value, steps.value, batch.value, benchmark.parse_canvas(canvas.value))
        print(json.dumps(result, indent=2))
        if out.value:
            benchmark.write_json(out.value, result)

    app.run(main)


if __name__ == "__main__":
    _main()
