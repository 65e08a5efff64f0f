"""Runs the pure train step for a few steps on this rank's share of one fixed batch and saves the final
trainable parameters (rank 0). Usage: step_worker.py OUT_FILE STEPS (run under torchrun, or alone)."""

from __future__ import annotations

import sys

import torch

from retina_fn import parallel, rng, tree
from retina_fn.train import build_optimizer, init_train_state, make_train_step
from tests.dist_scripts.common import make_dist_cfg
from tests.model_fixtures import synthetic_batch, tiny_config

GLOBAL_BATCH = 4


def main(out_file: str, steps: int) -> None:
    runtime = parallel.init(make_dist_cfg(timeout_s=60.0))
    cfg = tiny_config()
    cfg.optim.weight_decay = 1e-4
    cfg.optim.clip_norm = 5.0
    cfg.dist.normalizer = "global"
    per_rank = GLOBAL_BATCH // runtime.world_size
    optimizer = build_optimizer(cfg)
    state = runtime.broadcast_tree(init_train_state(cfg, rng.key(0), optimizer))
    runtime.verify_same(state["params"])
    step = make_train_step(cfg, optimizer, steps_per_epoch=100, global_batch=GLOBAL_BATCH,
                           reduce=runtime.reduce_mean)
    for i in range(steps):
        full = synthetic_batch(num_boxes=(0, 2, 5, 1), seed=i)
        mine = {k: v[runtime.rank * per_rank:(runtime.rank + 1) * per_rank] for k, v in full.items()}
        state, metrics = step(state, mine, rng.key(i))
    runtime.verify_same(state["params"])
    if runtime.is_main:
        torch.save({"params": tree.flatten_by_path(state["params"]), "loss": metrics["loss"]}, out_file)
    runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
