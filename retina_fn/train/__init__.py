"""Training: the train state, the generic pure step, and the RetinaNet state and steps of a spec."""

from retina_fn.train.build import StepSettings, build_optimizer, init_train_state, make_eval_step, make_train_step
from retina_fn.train.state import full_params, new_train_state
from retina_fn.train.step import Objective, split_micro_batches

__all__ = ["Objective", "StepSettings", "build_optimizer", "full_params", "init_train_state", "make_eval_step",
           "make_train_step", "new_train_state", "split_micro_batches"]
