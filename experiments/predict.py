"""Detections for image files, with retina_fn, torchvision or mmdetection RetinaNet weights.

    python -m experiments.predict --config configs/retinanet_r50_fpn_1x_coco.py \\
        --weights retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth --images a.jpg b.png --out dets.json \\
        --draw vis/ --score-thr 0.3
    python -m experiments.predict --config configs/torchvision_retinanet_v1.py \\
        --weights retinanet_resnet50_fpn_coco-eeacb38b.pth --images a.jpg --out dets.json
    python -m experiments.predict --exported exported/demo --images a.jpg --out dets.json --draw vis/

The files are decoded as evaluation decodes them and handed to `retina_fn.predictor.Predictor` (the same
detector a notebook calls on images in memory), which runs the evaluation pipeline unchanged: the
configured resize (data.resize_mode), each image on its aspect group's fixed canvas (or, with
--canvas=tight, on its own size rounded up to model.size_divisor, which is what mmdetection and
torchvision do at batch size 1), the model, post-processing with model.test (every detection above
model.test.score_thr, up to max_per_img), boxes in original pixels.

Output (--out): a COCO result list, [{'image_id', 'file_name', 'category_id', 'bbox': [x, y, w, h],
'score'}], image_id = the image's position in the --images list (0-based). Category ids:
  - retina_fn checkpoint: the label map stored with it (the training annotation file's ids);
  - other weights (no label map): by model.num_classes, 91 -> torchvision's layout, where the class
    index *is* the COCO category id; 80 -> mmdetection's layout, the 80 COCO ids in ascending order;
    any other K -> index + 1.
model.num_classes='auto' takes the class count from the weights (retina_fn.class_count.from_weights).
--draw DIR writes DIR/<image name>.png with the boxes scoring at least --score-thr, labelled with the
class names (COCO names for torchvision / mmdetection weights).

--exported DIR runs a folder written by experiments.export instead of the eager model (no --config or
--weights): its torch.export program, fed as its model.json says (its resize, on its one canvas, its batch
size), with its label map; the outputs are the same files.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags

from retina_fn import class_count
from retina_fn.data import transforms
from retina_fn.data.coco import decode_image
from retina_fn.data.transforms import CANVAS_MODES
from retina_fn.engine import reporting
from retina_fn.eval import coco_eval
from retina_fn.export import folder as export_format
from retina_fn.predictor import Predictor, run_batches

log = logging.getLogger(__name__)


class ImageDetections(NamedTuple):
    """One image's detections in original pixels: boxes [N, 4] xyxy, scores [N], labels [N] (class index)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def preprocess(image: np.ndarray, cfg, canvas_mode: str = "fixed") -> dict:
    """One decoded image -> the eval transform's sample dict, resized as data.resize_mode says.

    Args:
        image: uint8 RGB [h, w, 3].
        cfg: the whole config (data block; model.size_divisor for the tight canvas).
        canvas_mode: 'fixed' (the aspect group's canvas) or 'tight' (see `CANVAS_MODES`).

    Returns:
        `retina_fn.data.transforms.preprocess_for_inference`'s dict: image float32 [3, H, W], image_hw,
        orig_hw, scale_factor, ...
    """
    return transforms.preprocess_for_inference(image, transforms.TransformConfig.from_config(cfg.data), canvas_mode,
                                               int(cfg.model.size_divisor))


def run_model(eval_step, params: dict, samples: Sequence[dict], batch_size: int,
              device: torch.device) -> list[ImageDetections]:
    """Detections for every sample (in input order), batch by batch on each canvas
    (`retina_fn.predictor.run_batches` with eval_step(params, batch))."""
    return [ImageDetections(*found) for found in
            run_batches(lambda batch: eval_step(params, batch), samples, batch_size, device)]


def to_results(detections: Sequence[ImageDetections], image_paths: Sequence[str],
               category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO result dicts for all images; image_id = position, file_name = the file's base name."""
    results = []
    for i, (det, path) in enumerate(zip(detections, image_paths)):
        rows = coco_eval.detections_to_coco(det.boxes.reshape(-1, 4), det.scores, det.labels,
                                            np.full(len(det.scores), i, dtype=np.int64), list(category_ids))
        for r in rows:
            r["file_name"] = os.path.basename(path)
        results.extend(rows)
    return results


def drawing_paths(image_paths: Sequence[str], out_dir: str) -> list[str]:
    """DIR/<stem>.png per image; a repeated stem gets its position appended (<stem>_<i>.png)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in image_paths]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [os.path.join(out_dir, f"{s}_{i}.png" if seen[s] > 1 else f"{s}.png") for i, s in enumerate(stems)]


def predict(cfg, weights: str, image_paths: Sequence[str], *, batch_size: int | None = None,
            canvas_mode: str = "fixed", device: torch.device | str | None = None
            ) -> tuple[list[ImageDetections], tuple[int, ...], tuple[str, ...], list[np.ndarray]]:
    """(detections per image, category id per class, class names, decoded images) for image files: the
    files decoded as evaluation decodes them, then one `retina_fn.predictor.Predictor` call.
    An 'auto' model.num_classes is resolved in cfg itself (`class_count.from_weights`).
    Raises FileNotFoundError / retina_fn.data.coco.ImageLoadError naming a bad image, ValueError for a
    config whose canvases cannot hold the resized images, CheckpointMismatch for weights that do not
    fit the config."""
    if not image_paths:
        raise ValueError("no images given (--images)")
    class_count.from_weights(cfg, weights)  # model.num_classes 'auto' -> the weights' class count
    predictor = Predictor(cfg, weights, device=device, batch_size=batch_size, canvas_mode=canvas_mode)
    images = [decode_image(p, image_id=i) for i, p in enumerate(image_paths)]
    detections = [ImageDetections(found.boxes, found.scores, found.labels) for found in predictor(images)]
    return detections, predictor.category_ids, predictor.names, images


def predict_exported(export_dir: str, image_paths: Sequence[str]
                     ) -> tuple[list[ImageDetections], tuple[int, ...], tuple[str, ...], list[np.ndarray]]:
    """`predict`'s tuple from an export folder's torch.export program (CPU) instead of the eager model.
    Raises FileNotFoundError / ValueError for a folder that is not an export with a .pt2, and `predict`'s
    errors for bad images or images that do not fit the export's canvas."""
    if not image_paths:
        raise ValueError("no images given (--images)")
    spec = export_format.read_spec(export_dir)
    run = export_format.load_program(export_dir, spec)
    transform_cfg = export_format.transform_config(spec)
    images = [decode_image(p, image_id=i) for i, p in enumerate(image_paths)]
    samples = [transforms.preprocess_for_inference(img, transform_cfg) for img in images]
    label_map = spec["label_map"]
    detections = run_model(lambda _, batch: run(batch), {}, samples, int(spec["batch"]), torch.device("cpu"))
    return detections, tuple(label_map["category_ids"]), tuple(label_map["names"]), images


def write_outputs(detections, image_paths, category_ids, names, images, out_json: str,
                  draw_dir: str | None = None, score_thr: float = 0.3) -> list[dict[str, Any]]:
    """Writes the COCO result list to out_json (and PNGs to draw_dir); returns the results."""
    results = to_results(detections, image_paths, category_ids)
    parent = os.path.dirname(os.path.abspath(out_json))
    os.makedirs(parent, exist_ok=True)
    coco_eval.write_results(out_json, results)
    if draw_dir:
        from retina_fn.viz import draw_detections

        os.makedirs(draw_dir, exist_ok=True)
        for det, image, path in zip(detections, images, drawing_paths(image_paths, draw_dir)):
            draw_detections(image, det.boxes, det.scores, det.labels, names, score_thr).save(path)
    return results


def define_flags() -> dict[str, Any]:
    """The command-line flags (defined only when run as a program, so importing this module defines
    none), as {name: FlagHolder}."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                                  lock_config=True),
        "weights": flags.DEFINE_string("weights", None, "A retina_fn checkpoint, or torchvision / mmdetection "
                                                        "RetinaNet weights."),
        "images": flags.DEFINE_list("images", [], "Image files (comma-separated; further files may follow as "
                                                  "plain arguments: --images a.jpg b.png)."),
        "out": flags.DEFINE_string("out", None, "Where to write the COCO-format detections (JSON)."),
        "draw": flags.DEFINE_string("draw", None, "Folder for PNGs of the images with their detections drawn."),
        "score_thr": flags.DEFINE_float("score-thr", 0.3, "Lowest score drawn with --draw (the JSON keeps every "
                                                          "detection above model.test.score_thr)."),
        "batch_size": flags.DEFINE_integer("batch_size", None, "Images per forward pass (default "
                                                                "data.eval_images_per_device)."),
        "canvas": flags.DEFINE_enum("canvas", "fixed", list(CANVAS_MODES), "'fixed': the aspect group's canvas "
                                    "(the evaluation pipeline); 'tight': each image padded to a multiple of "
                                    "model.size_divisor."),
        "exported": flags.DEFINE_string("exported", None, "A folder written by experiments.export: run its "
                                        "torch.export program instead of --config / --weights."),
    }


def check_flags(value: dict[str, Any]) -> None:
    """Either --exported alone or --config with --weights; --batch_size and --canvas=tight go with the latter.
    Raises app.UsageError naming the flags at fault."""
    if value["exported"] is None:
        missing = [f"--{name}" for name in ("config", "weights") if value[name] is None]
        if missing:
            raise app.UsageError(f"{' and '.join(missing)} required (or --exported DIR)")
        return
    clashing = [f"--{name}" for name in ("config", "weights", "batch_size") if value[name] is not None]
    if value["canvas"] != "fixed":
        clashing.append("--canvas")
    if clashing:
        raise app.UsageError(f"--exported runs an export folder with its own config, weights, batch and canvas; "
                             f"drop {', '.join(clashing)}")


def main(argv, holders: dict[str, Any]):
    reporting.set_log_level(logging.INFO)
    value = {name: holder.value for name, holder in holders.items()}
    check_flags(value)
    image_paths = list(value["images"]) + list(argv[1:])
    if value["exported"] is not None:
        detections, category_ids, names, images = predict_exported(value["exported"], image_paths)
    else:
        detections, category_ids, names, images = predict(value["config"], value["weights"], image_paths,
                                                          batch_size=value["batch_size"],
                                                          canvas_mode=value["canvas"])
    results = write_outputs(detections, image_paths, category_ids, names, images, value["out"], value["draw"],
                            value["score_thr"])
    log.info("%d detections for %d images written to %s", len(results), len(image_paths), value["out"])


if __name__ == "__main__":
    from experiments import cli

    _holders = define_flags()
    flags.mark_flags_as_required(["out"])
    cli.run(lambda argv: main(argv, _holders))
