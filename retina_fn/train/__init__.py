"""Training: the train state, the generic pure step, and the RetinaNet state and steps built from a config."""

from retina_fn.train.build import build_optimizer, init_train_state, make_eval_step, make_train_step
from retina_fn.train.state import full_params, new_train_state
from retina_fn.train.step import Objective, split_micro_batches

__all__ = [
    "Objective",
    "build_optimizer",
    "full_params",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
    "new_train_state",
    "split_micro_batches",
]
