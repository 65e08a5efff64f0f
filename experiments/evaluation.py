"""Evaluation over a sharded loader, and drawing a few validation images with their detections."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from retina_fn.data import loader as data_loader
from retina_fn.eval import coco_eval

log = logging.getLogger(__name__)


def run_evaluation(eval_step, params: dict, loader, runtime, coco_set, max_vis: int = 0,
                   use_faster: bool = True) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
    """Detections for every image of the (sharded) loader, gathered on rank 0 and scored with COCOeval.

    Returns (metrics, vis) on rank 0 and (None, []) elsewhere; vis holds up to max_vis images' detections
    (image_id, boxes, scores, labels in original pixels) for drawing."""
    results: list[dict] = []
    vis: list[dict[str, Any]] = []
    start = time.perf_counter()
    images = 0
    for batch in loader:
        batch = data_loader.to_device(batch, runtime.device)
        dets = eval_step(params, batch)
        ids = batch["image_id"].cpu()
        boxes, scores, labels, valid = (t.cpu() for t in (dets.boxes, dets.scores, dets.labels, dets.valid))
        results.extend(coco_eval.detections_to_coco(boxes, scores, labels, ids, coco_set.label_map, valid=valid))
        images += int((ids >= 0).sum())
        for i in range(len(ids)):
            if len(vis) < max_vis and int(ids[i]) >= 0:
                keep = valid[i].numpy()
                vis.append({"image_id": int(ids[i]), "boxes": boxes[i].numpy()[keep],
                            "scores": scores[i].numpy()[keep], "labels": labels[i].numpy()[keep]})
    seconds = time.perf_counter() - start
    gathered = runtime.gather_objects(results)
    if not runtime.is_main:
        return None, []
    merged = coco_eval.merge_results(gathered)
    img_ids = [r.image_id for r in coco_set.records]
    metrics = coco_eval.evaluate(coco_set.ann_file, merged, img_ids=img_ids, use_faster=use_faster)
    metrics["eval_images_per_s"] = images * runtime.world_size / max(seconds, 1e-9)
    metrics["num_detections"] = float(len(merged))
    return metrics, vis


def vis_images(vis: list[dict[str, Any]], coco_set, class_names, out_dir: str, score_thr: float = 0.3) -> list[str]:
    """Writes PNGs of `vis` detections drawn over the original images; returns the paths."""
    import os

    from retina_fn.data.coco import load_record_image
    from retina_fn.viz import draw_detections

    by_id = {r.image_id: r for r in coco_set.records}
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for item in vis:
        record = by_id[item["image_id"]]
        image = load_record_image(record)
        img = draw_detections(image, item["boxes"], item["scores"], item["labels"], class_names, score_thr,
                              gt_boxes=np.asarray(record.boxes))
        path = os.path.join(out_dir, f"val_{item['image_id']}.png")
        img.save(path)
        paths.append(path)
    return paths
