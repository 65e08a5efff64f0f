"""The train state: one plain pytree of tensors that a checkpoint saves and a step replaces.

    {
      'params':     trainable parameters (what the optimiser updates),
      'frozen':     everything else of the model: BN statistics, frozen stages (never updated),
      'opt':        optimiser state for 'params',
      'step':       int64 [] optimiser steps taken,
      'rng':        the run's root key (int64 [2]),
      'loss_scale': LossScaleState(scale float32 [], good_steps int64 []),
      'nonfinite':  int64 [] consecutive steps skipped for a non-finite loss or gradient,
    }
"""

from __future__ import annotations

import torch

from retina_fn import precision, rng, tree
from retina_fn.model import retinanet
from retina_fn.optim import make_optimizer


def init_train_state(cfg, key: rng.Key, params: dict | None = None, device: torch.device | str = "cpu") -> dict:
    """A fresh state. `params` (e.g. with a pretrained backbone) replaces the random init when given."""
    k_model, k_run = rng.split(key)
    if params is None:
        params = retinanet.init(k_model, cfg.model)
    params = tree.cast(params, torch.float32, device)
    trainable, frozen = retinanet.split_trainable(params, cfg.model)
    opt = make_optimizer(cfg.optim)
    return {
        "params": trainable,
        "frozen": frozen,
        "opt": opt.init(trainable),
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "rng": k_run.to(device),
        "loss_scale": precision.init_loss_scale(cfg.train.loss_scale, device),
        "nonfinite": torch.zeros((), dtype=torch.int64, device=device),
    }


def full_params(state: dict) -> dict:
    """The model's whole parameter tree (trainable and frozen leaves together)."""
    return tree.merge(state["params"], state["frozen"])
