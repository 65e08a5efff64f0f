"""The optimiser named by the `optim` config block."""

from __future__ import annotations

from typing import Callable

from retina_fn import errors
from retina_fn.optim.adamw import adamw
from retina_fn.optim.base import Optimizer
from retina_fn.optim.masks import decay_predicate
from retina_fn.optim.sgd import sgd

OPTIMIZERS = ("sgd", "adamw")
BACKENDS = ("native", "apex")


def make_optimizer(optim_cfg, fused_sgd: Callable[..., Optimizer] | None = None) -> Optimizer:
    """The optimiser the `optim` block names.

    Args:
      optim_cfg: name, backend, momentum, nesterov, betas, eps, weight_decay, decay_norm_and_bias.
      fused_sgd: the builder of optim.backend='apex' (same keyword arguments as `sgd`), e.g.
        retina_fn.accel.apex_sgd; this module never probes accelerators itself.

    Returns:
      Optimizer(init, update). The learning rate is not bound here: the train step passes
      `schedule(step)` to every update.
    """
    if optim_cfg.name not in OPTIMIZERS:
        raise errors.ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {optim_cfg.name!r}")
    if optim_cfg.backend not in BACKENDS:
        raise errors.ConfigError(f"optim.backend must be one of {BACKENDS}, got {optim_cfg.backend!r}")
    mask = None if optim_cfg.decay_norm_and_bias else decay_predicate(False)
    if optim_cfg.name == "adamw":
        if optim_cfg.backend != "native":
            raise errors.ConfigError("optim.backend='apex' provides fused SGD only; use optim.name='sgd' or "
                                     "backend='native'")
        return adamw(
            betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, weight_decay_mask=mask
        )
    if optim_cfg.backend == "apex" and fused_sgd is None:
        raise ValueError("optim.backend='apex' needs the fused SGD builder passed in (retina_fn.accel.apex_sgd; "
                         "retina_fn.train.build.build_optimizer passes it)")
    build = fused_sgd if optim_cfg.backend == "apex" else sgd
    return build(
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
        nesterov=optim_cfg.nesterov,
        weight_decay_mask=mask,
    )
