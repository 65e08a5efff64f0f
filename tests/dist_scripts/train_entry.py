"""`python -m experiments.coco_retinanet` as a script path, for torchrun launches from the tests."""

from absl import app, flags

from experiments import coco_retinanet

if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(coco_retinanet.main)
