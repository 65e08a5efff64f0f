"""Pure layers over explicit parameter dicts, and initialisers that take random keys."""

from retina_fn.nn import init
from retina_fn.nn.layers import (
    conv2d,
    frozen_batch_norm,
    group_norm,
    max_pool2d,
    relu,
    upsample_nearest,
)

__all__ = [
    "init",
    "conv2d",
    "frozen_batch_norm",
    "group_norm",
    "max_pool2d",
    "relu",
    "upsample_nearest",
]
