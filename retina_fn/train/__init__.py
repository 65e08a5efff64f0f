"""The train state, the pure train and eval steps."""

from retina_fn.train.state import init_train_state, full_params
from retina_fn.train.step import AnchorCache, make_eval_step, make_train_step

__all__ = ["AnchorCache", "full_params", "init_train_state", "make_eval_step", "make_train_step"]
