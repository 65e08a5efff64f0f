"""Train or evaluate RetinaNet.

    python -m experiments.coco_retinanet --config configs/demo.py --workdir runs/demo
    python -m experiments.coco_retinanet --config configs/retinanet_r50_fpn_1x_coco.py \
        --config.data.root=/data/coco --config.optim.lr=0.02 --workdir runs/r50
    python -m experiments.coco_retinanet --workdir DIR --mode eval [--weights FILE] [--config ...]
    torchrun --nproc_per_node=8 -m experiments.coco_retinanet --config ... --workdir DIR

Training resumes on its own from the newest usable checkpoint in DIR/checkpoints. A fixable mistake (a missing
file, a bad annotation file or image, weights that do not fit, a mistyped or invalid config value) ends in one
`error: ...` line and exit status 2 (experiments.cli; RETINA_FN_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from retina_fn.engine import reporting, trainer
from retina_fn.parallel.env import read_launch_env

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py); for --mode eval, "
                                          "without it: the config the checkpoint was trained with.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (then evaluate) or evaluate only.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Evaluation: a retina_fn checkpoint, or torchvision / mmdetection "
                                                "RetinaNet weights (default: the workdir's newest checkpoint).")
_USE_CONFIG_FOR = flags.DEFINE_list("use_config_for", [], "Evaluation: config fields to take from --config instead "
                                    "of the checkpoint's spec (e.g. model.test.score_thr), or 'all'.")


def main(argv):
    del argv
    rank = read_launch_env().rank
    reporting.set_log_level(logging.INFO if rank == 0 else logging.WARNING)
    cfg = _CONFIG.value
    if _MODE.value == "train":
        if cfg is None:
            raise app.UsageError("training needs --config")
        trainer.train_and_evaluate(cfg, _WORKDIR.value)
    else:
        trainer.evaluate_only(cfg, _WORKDIR.value, _WEIGHTS.value, _USE_CONFIG_FOR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
