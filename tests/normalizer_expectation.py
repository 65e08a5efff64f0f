"""A hand-computed data-parallel SGD step of RetinaNet, for checking dist.normalizer in one process.

`expected_sgd_step` builds what W processes of DistributedDataParallel (mmdetection 2.9) would apply after
one step on a batch split contiguously over them, without retina_fn.train's step: process r's loss is
(sum of focal and box terms over its images) / N_r, gradients come from torch.autograd, their mean over
processes is applied by plain SGD (p - lr * g; no momentum, no weight decay, no clipping, no warmup).
N_r is the sum over r's images of max(#positive anchors, 1) for 'local' and the mean of those sums over
the processes for 'global'.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from retina_fn import anchors as anchor_lib
from retina_fn import detector, losses, rng, tree
from retina_fn.model import retinanet
from tests.model_fixtures import spec_of, settings_of


class Expected(NamedTuple):
    params: dict[str, torch.Tensor]  # path -> trainable leaf after the update
    loss: torch.Tensor  # [] the loss metric: mean over processes of loss_r / N_r
    normalizers: list[float]  # each process's own N_r (before any averaging)
    num_pos: list[int]  # positive anchors per process


def _trainable_and_frozen(cfg, seed: int) -> tuple[dict, dict]:
    """The initial parameters of retina_fn.train.init_train_state(spec, settings, rng.key(seed), ...), rebuilt
    from the model alone: the state's key is split into (model key, run key)."""
    k_model, _ = rng.split(rng.key(seed))
    params = tree.cast(retinanet.init(k_model, spec_of(cfg)), torch.float32, "cpu")
    return retinanet.split_trainable(params, spec_of(cfg))


def expected_sgd_step(cfg, full_batch: dict, world_size: int, normalizer: str, lr: float, seed: int = 0
                      ) -> Expected:
    """The parameters after one data-parallel SGD step on `full_batch` shared by `world_size` processes.

    Args:
      cfg: the whole config (model); model.loss.normalizer must be 'batch' (mmdetection's).
      full_batch: the global batch [B, ...]; process r gets images [r * B / W, (r + 1) * B / W).
      world_size: W.
      normalizer: 'local' (each process divides by its own N_r) or 'global' (by the mean of the N_r).
      lr: the learning rate of the update.
      seed: rng.key(seed) initialised the train state.
    """
    if cfg.model.loss.normalizer != "batch":
        raise ValueError("the hand expectation follows mmdetection's 'batch' normaliser")
    trainable, frozen = _trainable_and_frozen(cfg, seed)
    spec = spec_of(cfg)
    size = full_batch["image"].shape[0]
    per_rank = size // world_size
    anchors = anchor_lib.anchors(tuple(full_batch["image"].shape[-2:]), spec.anchors)

    shares = []
    for r in range(world_size):
        mine = {k: v[r * per_rank:(r + 1) * per_rank] for k, v in full_batch.items()}
        targets = detector.Detector(spec).targets(mine)
        positive_per_image = (targets.assignment.positive & targets.anchor_valid).sum(dim=1)
        own = float(sum(max(int(n), 1) for n in positive_per_image))
        shares.append((mine, targets, own, int(positive_per_image.sum())))
    own_norms = [own for _, _, own, _ in shares]
    divisors = own_norms if normalizer == "local" else [sum(own_norms) / world_size] * world_size

    paths = list(tree.flatten_by_path(trainable))
    grad_sum = {p: torch.zeros_like(v) for p, v in tree.flatten_by_path(trainable).items()}
    loss_sum = torch.zeros((), dtype=torch.float64)
    for (mine, targets, _, _), divisor in zip(shares, divisors):
        leaves = {p: v.detach().clone().requires_grad_(True) for p, v in tree.flatten_by_path(trainable).items()}
        params = tree.merge(tree.unflatten_by_path(leaves), frozen)
        cls_logits, box_deltas = retinanet.apply(params, mine["image"], spec)
        loss, _ = losses.retinanet_loss(cls_logits, box_deltas, anchors, targets.anchor_valid, targets.assignment,
                                        mine["boxes"], mine["labels"], spec.loss, spec.coder,
                                        normalizer=torch.tensor(divisor, dtype=torch.float32))
        grads = torch.autograd.grad(loss, [leaves[p] for p in paths], allow_unused=True)
        for p, g in zip(paths, grads):
            if g is not None:
                grad_sum[p] += g
        loss_sum += loss.detach().double()

    start = tree.flatten_by_path(trainable)
    updated = {p: (start[p] - lr * (grad_sum[p] / world_size)).detach() for p in paths}
    return Expected(updated, (loss_sum / world_size).float(), own_norms, [n for _, _, _, n in shares])
