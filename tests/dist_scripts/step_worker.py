"""Runs the pure train step for a few steps on this rank's share of one fixed batch and saves the final
trainable parameters and the last step's metrics (rank 0). Run under torchrun, or alone.

Usage: step_worker.py OUT_FILE STEPS [--normalizer global|local] [--boxes 0,2,5,1] [--lr F] [--momentum F]
                      [--weight-decay F] [--clip-norm F|none]

Step i trains on synthetic_batch(num_boxes=BOXES, seed=i), a global batch of len(BOXES) images; rank r takes
the contiguous images [r * B / W, (r + 1) * B / W). Without options: dist.normalizer 'global', boxes
(0, 2, 5, 1), tiny_config's lr and momentum, weight decay 1e-4 and clipping at 5.0 (what
test_two_processes_of_batch_2_equal_one_process_of_batch_4 runs).
"""

from __future__ import annotations

import argparse
import gc
import weakref

import torch

from retina_fn import parallel, rng, tree
from retina_fn.train import build_optimizer, init_train_state, make_train_step
from tests.dist_scripts.common import make_dist_cfg
from tests.model_fixtures import settings_of, spec_of, synthetic_batch, tiny_config

DEFAULT_BOXES = (0, 2, 5, 1)


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_file")
    parser.add_argument("steps", type=int)
    parser.add_argument("--normalizer", choices=("global", "local"), default="global")
    parser.add_argument("--boxes", type=_counts, default=DEFAULT_BOXES,
                        help="real boxes per image of the global batch, comma-separated")
    parser.add_argument("--lr", type=float, default=None, help="optim.lr (default: tiny_config's)")
    parser.add_argument("--momentum", type=float, default=None, help="optim.momentum (default: the config's)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--clip-norm", type=_optional_float, default=5.0, help="a float, or 'none'")
    return parser.parse_args(argv)


def make_cfg(args: argparse.Namespace):
    """tiny_config with the options applied (no warmup: tiny_config sets warmup_iters=0)."""
    cfg = tiny_config()
    cfg.optim.weight_decay = args.weight_decay
    cfg.optim.clip_norm = args.clip_norm
    if args.lr is not None:
        cfg.optim.lr = args.lr
    if args.momentum is not None:
        cfg.optim.momentum = args.momentum
    cfg.dist.normalizer = args.normalizer
    return cfg


def main(args: argparse.Namespace) -> None:
    runtime = parallel.init(make_dist_cfg(timeout_s=60.0))
    group = weakref.ref(runtime.group) if runtime.group is not None else None
    cfg = make_cfg(args)
    global_batch = len(args.boxes)
    if global_batch % runtime.world_size:
        raise ValueError(f"{global_batch} images cannot be shared by {runtime.world_size} processes")
    per_rank = global_batch // runtime.world_size
    optimizer = build_optimizer(settings_of(cfg))
    state = runtime.broadcast_tree(init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer))
    runtime.verify_same(state["params"])
    step = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=100, global_batch=global_batch,
                           reduce=runtime.reduce_mean)
    for i in range(args.steps):
        full = synthetic_batch(num_boxes=args.boxes, seed=i)
        mine = {k: v[runtime.rank * per_rank:(runtime.rank + 1) * per_rank] for k, v in full.items()}
        state, metrics = step(state, mine)
    runtime.verify_same(state["params"])
    if runtime.is_main:
        torch.save({"params": tree.flatten_by_path(state["params"]), "loss": metrics["loss"],
                    "metrics": {k: v.detach().clone() for k, v in metrics.items()},
                    "world_size": runtime.world_size}, args.out_file)
    runtime.shutdown()
    if group is not None:
        # A group that outlives shutdown keeps gloo's worker threads running into interpreter exit, where one
        # releasing a collective's tensors aborts the process (see retina_fn.parallel.runtime.init).
        gc.collect()
        print(f"rank {runtime.rank}: process group freed at shutdown: {group() is None}", flush=True)


if __name__ == "__main__":
    main(parse_args())
