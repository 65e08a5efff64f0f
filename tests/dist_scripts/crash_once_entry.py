"""The training entry point with one injected crash: on torchrun's first attempt (restart count 0), rank 0
exits right after writing the checkpoint of step $CRASH_AFTER_CHECKPOINT_STEP."""

import os

from absl import app, flags

from experiments import coco_retinanet
from retina_fn import checkpoint

if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    crash_step = int(os.environ["CRASH_AFTER_CHECKPOINT_STEP"])
    real_save = checkpoint.save

    def save_then_crash(directory, step, *args, **kwargs):
        path = real_save(directory, step, *args, **kwargs)
        if step == crash_step:
            os._exit(17)
        return path

    checkpoint.save = save_then_crash

if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(coco_retinanet.main)
