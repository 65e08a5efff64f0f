"""The optimiser that settings name."""

from __future__ import annotations

from typing import Callable

from retina_fn.optim.adamw import adamw
from retina_fn.optim.base import Optimizer
from retina_fn.optim.masks import decay_predicate
from retina_fn.optim.settings import OptimSettings
from retina_fn.optim.sgd import sgd


def make_optimizer(optim: OptimSettings, fused_sgd: Callable[..., Optimizer] | None = None) -> Optimizer:
    """The optimiser the settings name (no lr bound: the train step passes `schedule(step)` to every update).

    Args:
      fused_sgd: the builder of optim.backend='apex' (`sgd`'s keyword arguments), e.g. retina_fn.accel.apex_sgd.
    """
    mask = None if optim.decay_norm_and_bias else decay_predicate(False)
    if optim.name == "adamw":
        return adamw(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay, weight_decay_mask=mask)
    if optim.backend == "apex" and fused_sgd is None:
        raise ValueError("optim.backend='apex' needs the fused SGD builder passed in (retina_fn.accel.apex_sgd; "
                         "retina_fn.train.build.build_optimizer passes it)")
    build = fused_sgd if optim.backend == "apex" else sgd
    return build(momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov,
                 weight_decay_mask=mask)
