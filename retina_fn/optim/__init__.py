"""Pure optimisers as (init, update) pairs over the trainable subtree, weight-decay masks, gradient clipping and
lr schedules."""

from retina_fn.optim.adamw import AdamWState, adamw
from retina_fn.optim.base import Optimizer
from retina_fn.optim.build import make_optimizer
from retina_fn.optim.clip import clip_by_global_norm
from retina_fn.optim.masks import decay_predicate, mask_by_path, weight_decay_mask
from retina_fn.optim.schedules import base_learning_rate, make_lr_schedule, warmup_factor
from retina_fn.optim.settings import OptimSettings
from retina_fn.optim.sgd import SGDState, sgd

__all__ = ["AdamWState", "OptimSettings", "Optimizer", "SGDState", "adamw", "base_learning_rate",
           "clip_by_global_norm", "decay_predicate", "make_lr_schedule", "make_optimizer", "mask_by_path", "sgd",
           "warmup_factor", "weight_decay_mask"]
