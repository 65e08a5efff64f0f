"""Detections for image files, with a retina_fn checkpoint, torchvision or mmdetection RetinaNet weights, or an
export folder.

    python -m experiments.predict --weights runs/demo/checkpoints/<newest>.pt --images a.jpg b.png \\
        --out dets.json --draw vis/ --score-thr 0.3           # the checkpoint's own detector (its stored spec)
    python -m experiments.predict --config configs/torchvision_retinanet_v1.py \\
        --weights retinanet_resnet50_fpn_coco-eeacb38b.pth --images a.jpg --out dets.json
    python -m experiments.predict --exported exported/demo --images a.jpg --out dets.json --draw vis/

The files are decoded as evaluation decodes them and handed to `retina_fn.predictor.Predictor`, which runs the
evaluation pipeline of the detector's spec (retina_fn.trained: a checkpoint's own; --config must agree with it
but for the fields --use_config_for names). --canvas=tight pads each image to its own size rounded up to the
size divisor (what mmdetection and torchvision do at batch size 1).

Output (--out): a COCO result list, [{'image_id', 'file_name', 'category_id', 'bbox': [x, y, w, h], 'score'}],
image_id = the image's position in the --images list (0-based), category ids from the spec's label map (a
checkpoint's: the training annotation file's; torchvision's 91 classes: the COCO id; 80: COCO's ids ascending).
--draw DIR writes DIR/<image name>.png with the boxes scoring at least --score-thr.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from retina_fn import errors
from retina_fn.data.images import decode_image
from retina_fn.data.transforms import CANVAS_MODES
from retina_fn.engine import reporting
from retina_fn.eval import coco_results
from retina_fn.predictor import Prediction, Predictor

log = logging.getLogger(__name__)


def to_results(found: Sequence[Prediction], image_paths: Sequence[str], category_ids) -> list[dict[str, Any]]:
    """COCO result dicts for all images; image_id = position, file_name = the file's base name."""
    results = []
    for i, (det, path) in enumerate(zip(found, image_paths)):
        rows = coco_results.detections_to_coco(det.boxes.reshape(-1, 4), det.scores, det.labels,
                                               np.full(len(det.scores), i, dtype=np.int64), list(category_ids))
        results.extend(dict(r, file_name=os.path.basename(path)) for r in rows)
    return results


def drawing_paths(image_paths: Sequence[str], out_dir: str) -> list[str]:
    """DIR/<stem>.png per image; a repeated stem gets its position appended (<stem>_<i>.png)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in image_paths]
    return [os.path.join(out_dir, f"{s}_{i}.png" if stems.count(s) > 1 else f"{s}.png") for i, s in enumerate(stems)]


def predict_files(predictor: Predictor, image_paths: Sequence[str]) -> tuple[list[Prediction], list[np.ndarray]]:
    """(detections, decoded images) for image files, decoded as evaluation decodes them.

    Raises:
      UsageError: no images; ImageLoadError: naming a file that cannot be read.
    """
    if not image_paths:
        raise app.UsageError("no images given (--images)")
    images = [decode_image(p, image_id=i) for i, p in enumerate(image_paths)]
    return predictor.predict_arrays(images, list(image_paths)), images


def write_outputs(found, image_paths, category_ids, names, images, out_json: str, draw_dir: str | None = None,
                  score_thr: float = 0.3) -> list[dict[str, Any]]:
    """Writes the COCO result list to out_json (and PNGs to draw_dir, labelled with `names`); returns the
    results."""
    results = to_results(found, image_paths, category_ids)
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    coco_results.write_results(out_json, results)
    if draw_dir:
        from retina_fn.viz import draw_detections

        os.makedirs(draw_dir, exist_ok=True)
        for det, image, path in zip(found, images, drawing_paths(image_paths, draw_dir)):
            draw_detections(image, det.boxes, det.scores, det.labels, names, score_thr).save(path)
    return results


def define_flags() -> dict[str, Any]:
    """The command-line flags (defined only when run as a program), as {name: FlagHolder}."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py): needed for weights "
                                                  "that store no spec; with a checkpoint it must agree with it.",
                                                  lock_config=True),
        "weights": flags.DEFINE_string("weights", None, "A retina_fn checkpoint, torchvision / mmdetection RetinaNet "
                                                        "weights, or an export folder."),
        "exported": flags.DEFINE_string("exported", None, "An export folder (the same as --weights DIR)."),
        "use_config_for": flags.DEFINE_list("use_config_for", [], "Config fields to take from --config instead of "
                                            "the checkpoint's spec (e.g. model.test.score_thr), or 'all'."),
        "images": flags.DEFINE_list("images", [], "Image files (comma-separated; more may follow as plain "
                                                  "arguments: --images a.jpg b.png)."),
        "out": flags.DEFINE_string("out", None, "Where to write the COCO-format detections (JSON)."),
        "draw": flags.DEFINE_string("draw", None, "Folder for PNGs of the images with their detections drawn."),
        "score_thr": flags.DEFINE_float("score-thr", 0.3, "Lowest score drawn with --draw (the JSON keeps every "
                                                          "detection above the spec's score threshold)."),
        "batch_size": flags.DEFINE_integer("batch_size", None, "Images per forward pass (default 2)."),
        "canvas": flags.DEFINE_enum("canvas", "fixed", list(CANVAS_MODES), "'fixed': the aspect group's canvas "
                                    "(the evaluation pipeline); 'tight': each image padded to the size divisor."),
    }


def main(argv, holders: dict[str, Any]):
    reporting.set_log_level(logging.INFO)
    value = {name: holder.value for name, holder in holders.items()}
    if (value["weights"] is None) == (value["exported"] is None):
        raise app.UsageError("pass --weights (a checkpoint, weights or an export folder) or --exported DIR")
    if value["batch_size"] is not None and value["batch_size"] < 1:
        raise app.UsageError(f"--batch_size must be >= 1, got {value['batch_size']}")
    image_paths = list(value["images"]) + list(argv[1:])
    if not image_paths:
        raise app.UsageError("no images given: pass --images a.jpg[,b.png] (more may follow as plain arguments)")
    try:
        predictor = Predictor(value["weights"] or value["exported"], value["config"],
                              use_config_for=value["use_config_for"], batch_size=value["batch_size"],
                              canvas_mode=value["canvas"])
        log.info("predicting %d image(s) with %s", len(image_paths), value["weights"] or value["exported"])
        found, images = predict_files(predictor, image_paths)
        results = write_outputs(found, image_paths, predictor.category_ids, predictor.names, images, value["out"],
                                value["draw"], value["score_thr"])
    except KeyboardInterrupt as err:
        raise errors.RunInterrupted(f"prediction stopped; {value['out']} may be missing or older than this run: "
                                    f"the same command predicts again") from err
    log.info("%d detections for %d images written to %s", len(results), len(image_paths), value["out"])


if __name__ == "__main__":
    from experiments import cli

    _holders = define_flags()
    flags.mark_flags_as_required(["out"])
    cli.run(lambda argv: main(argv, _holders))
