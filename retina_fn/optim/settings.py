"""The optimiser and its schedule as typed settings (retina_fn.schema builds them from the `optim` block)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """The `optim` block's fields that `make_optimizer` and `make_lr_schedule` read (their meanings:
    configs/common.py's optim_config)."""

    name: str  # 'sgd' | 'adamw'
    backend: str  # 'native' | 'apex'
    lr: float | None  # explicit lr; None: the linear scaling rule from base_lr at base_batch
    base_lr: float
    base_batch: int
    momentum: float
    nesterov: bool
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    decay_norm_and_bias: bool
    warmup_iters: int
    warmup_ratio: float
    schedule: str  # 'step' | 'cosine'
    step_epochs: tuple[int, ...]
    gamma: float
    epochs: int
