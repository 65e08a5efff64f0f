"""Pure layers over explicit parameter dicts, and initialisers that take random keys."""

from retina_fn.nn import init
from retina_fn.nn.fold import conv_frozen_bn, fold_frozen_bn
from retina_fn.nn.layers import (conv2d, frozen_batch_norm, frozen_bn_scale_shift, group_norm, group_norm_maps,
                                 max_pool2d, relu, upsample_nearest)

__all__ = ["init", "conv2d", "conv_frozen_bn", "fold_frozen_bn", "frozen_batch_norm", "frozen_bn_scale_shift",
           "group_norm", "group_norm_maps", "max_pool2d", "relu", "upsample_nearest"]
