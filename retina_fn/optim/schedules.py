"""Learning-rate schedules: pure functions of the optimiser step (0-d int64 tensor) -> 0-d float32 lr.

mmdetection's 1x schedule (mmcv's LrUpdaterHook, by epoch, linear warmup):

    regular(step) = base * gamma ** (number of step_epochs e with epoch >= e),  epoch = step // steps_per_epoch
    lr(step)      = regular(step) * (1 - (1 - step / warmup_iters) * (1 - warmup_ratio))   for step < warmup_iters
                  = regular(step)                                                           afterwards

Epochs are 0-based and a boundary e takes effect at the first step of epoch e (step >= e * steps_per_epoch).
'cosine' replaces the step decay by base * (1 + cos(pi * step / (epochs * steps_per_epoch))) / 2, falling to
0 at the end of training and evaluated per step (mmcv evaluates it per epoch when by_epoch=True); warmup
multiplies it the same way.

A step means one optimiser update. With optim.accum_steps = k it takes k loader batches per device (the
train step accumulates their gradients, retina_fn.train.step); optim.micro_batches only splits each loader
batch to save memory. So steps_per_epoch counts updates (the sampler's global batches) and `global_batch`
is images per device x devices x k: 2 images per device x 1 device x 8 gives mmdetection's 16-image
update and lr 0.01.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from retina_fn.optim.settings import OptimSettings

Schedule = Callable[[torch.Tensor], torch.Tensor]

SCHEDULES = ("step", "cosine")


def base_learning_rate(optim: OptimSettings, global_batch: int) -> float:
    """`optim.lr` when set, else the linear scaling rule base_lr * global_batch / base_batch.

    mmdetection's 0.01 at 16 images gives 0.00125 for 1 device x 2 images.

    Args:
      optim: the optim config block (lr, base_lr, base_batch).
      global_batch: the number of images behind one optimiser update: images per device x devices x
        optim.accum_steps (what retina_fn/engine/trainer.py passes; see the module docstring).

    Returns:
      float, the base learning rate before warmup and decay.

    Raises:
      ValueError: global_batch < 1.
    """
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1 image, got {global_batch}")
    if optim.lr is not None:
        return float(optim.lr)
    return float(optim.base_lr) * global_batch / optim.base_batch


def warmup_factor(step: torch.Tensor, warmup_iters: int, warmup_ratio: float) -> torch.Tensor:
    """mmcv's linear warmup multiplier: 1 - (1 - step/warmup_iters)(1 - ratio) while step < warmup_iters,
    then 1.

    Args:
      step: int64 [], the optimiser step.
      warmup_iters: warmup length in steps (0: no warmup).
      warmup_ratio: the multiplier at step 0, in [0, 1].

    Returns:
      float32 [] on step's device.
    """
    if warmup_iters == 0:
        return torch.ones((), dtype=torch.float32, device=step.device)
    progress = step.to(torch.float32) / warmup_iters
    # The same value as 1 - (1 - progress)(1 - ratio), rearranged: in float32 the written form cancels
    # (1 - float32(0.999) is off by 1e-5 relative), this one gives the ratio itself at step 0.
    factor = warmup_ratio + (1.0 - warmup_ratio) * progress
    return torch.where(step < warmup_iters, factor, torch.ones_like(factor))


def make_lr_schedule(optim: OptimSettings, steps_per_epoch: int, global_batch: int) -> Schedule:
    """The learning-rate schedule of the optim config block (see the module docstring).

    Args:
      optim: the optim config block (lr or base_lr and base_batch, schedule, warmup_iters,
        warmup_ratio, epochs, step_epochs, gamma).
      steps_per_epoch: optimiser updates per epoch (the sampler's global batches; train.performance_steps
        when it cuts epochs short).
      global_batch: images per optimiser update over all devices, for `base_learning_rate`.

    Returns:
      Schedule fn(step) -> lr: step an int64 [] tensor (or an int), lr float32 [] on step's device.

    Raises:
      ValueError: steps_per_epoch or global_batch < 1.
    """
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
