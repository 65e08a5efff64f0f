"""The train state: one plain pytree of tensors that a checkpoint saves and a step replaces.

    {'params': trainable parameters (what the optimiser updates), 'frozen': the rest of the model (BN statistics,
     frozen stages), 'opt': optimiser state for 'params', 'step': int64 [] optimiser steps taken, 'rng': the run's
     root key int64 [2], 'loss_scale': LossScaleState(scale float32 [], good_steps int64 []),
     'nonfinite': int64 [] consecutive steps skipped for a non-finite loss or gradient}
"""

from __future__ import annotations

import torch

from retina_fn import precision, rng, tree
from retina_fn.optim import Optimizer


def new_train_state(trainable: dict, frozen: dict, optimizer: Optimizer, key: rng.Key, loss_scale,
                    device: torch.device | str = "cpu") -> dict:
    """A fresh state around given parameters (any model): `trainable` (which an in-place optimiser takes
    ownership of), `frozen` ({} for none), key int64 [2] as 'rng', loss_scale (precision.LossScaleSettings); the
    counters live on `device`."""
    return {"params": trainable, "frozen": frozen, "opt": optimizer.init(trainable),
            "step": torch.zeros((), dtype=torch.int64, device=device), "rng": key.to(device),
            "loss_scale": precision.init_loss_scale(loss_scale, device),
            "nonfinite": torch.zeros((), dtype=torch.int64, device=device)}


def full_params(state: dict) -> dict:
    """The model's whole parameter tree (trainable and frozen leaves together)."""
    return tree.merge(state["params"], state["frozen"])
