"""Learning-rate schedules: pure functions of the optimiser step (0-d int64 tensor) -> 0-d float32 lr.

mmdetection's 1x schedule (mmcv's LrUpdaterHook, by epoch, linear warmup):

    regular(step) = base * gamma ** (number of step_epochs e with epoch >= e),  epoch = step // steps_per_epoch
    lr(step)      = regular(step) * (1 - (1 - step / warmup_iters) * (1 - warmup_ratio))   for step < warmup_iters
                  = regular(step)                                                           afterwards

Epochs are 0-based; boundary e applies from step e * steps_per_epoch. 'cosine' uses
base * (1 + cos(pi * step / (epochs * steps_per_epoch))) / 2 per step (mmcv: per epoch), warmup as above.
A step is one optimiser update (optim.accum_steps loader batches); `global_batch` is images per device x
devices x accum_steps.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from retina_fn.optim.settings import OptimSettings

Schedule = Callable[[torch.Tensor], torch.Tensor]


def base_learning_rate(optim: OptimSettings, global_batch: int) -> float:
    """`optim.lr` when set, else the linear scaling rule base_lr * global_batch / base_batch (images per update);
    ValueError for global_batch < 1."""
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1 image, got {global_batch}")
    if optim.lr is not None:
        return float(optim.lr)
    return float(optim.base_lr) * global_batch / optim.base_batch


def warmup_factor(step: torch.Tensor, warmup_iters: int, warmup_ratio: float) -> torch.Tensor:
    """float32 []: mmcv's linear warmup multiplier at int64 [] step, 1 - (1 - step/warmup_iters)(1 - ratio) while
    step < warmup_iters (0: no warmup), then 1."""
    if warmup_iters == 0:
        return torch.ones((), dtype=torch.float32, device=step.device)
    progress = step.to(torch.float32) / warmup_iters
    # 1 - (1 - progress)(1 - ratio) rearranged: the written form cancels in float32.
    factor = warmup_ratio + (1.0 - warmup_ratio) * progress
    return torch.where(step < warmup_iters, factor, torch.ones_like(factor))


def make_lr_schedule(optim: OptimSettings, steps_per_epoch: int, global_batch: int) -> Schedule:
    """The optim block's lr schedule, fn(step int64 [] or int) -> lr float32 [] on step's device, with
    `steps_per_epoch` optimiser updates per epoch and `global_batch` images per update; ValueError if either < 1."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    base = base_learning_rate(optim, global_batch)
    warmup_iters, warmup_ratio = int(optim.warmup_iters), float(optim.warmup_ratio)
    kind = optim.schedule
    step_epochs = tuple(int(e) for e in optim.step_epochs)
    gamma = float(optim.gamma)
    total_steps = int(optim.epochs) * steps_per_epoch

    def regular(step: torch.Tensor) -> torch.Tensor:
        if kind == "cosine":
            progress = torch.clamp(step.to(torch.float32) / total_steps, 0.0, 1.0)
            return base * 0.5 * (1.0 + torch.cos(math.pi * progress))
        epoch = torch.div(step, steps_per_epoch, rounding_mode="floor")
        decays = torch.zeros((), dtype=torch.float32, device=step.device)
        for boundary in step_epochs:
            decays = decays + (epoch >= boundary).to(torch.float32)
        return base * torch.pow(gamma, decays)

    def schedule(step: torch.Tensor) -> torch.Tensor:
        step = torch.as_tensor(step, dtype=torch.int64)
        return (regular(step) * warmup_factor(step, warmup_iters, warmup_ratio)).to(torch.float32)

    return schedule
