"""Evaluation over a sharded loader, the reports people read, and drawing a few validation images.

    evaluated = run_evaluation(eval_step, params, loader, runtime, val_set)   # every rank; an EvalRun on rank 0
    extra = write_reports(cfg.eval, workdir, evaluated, val_set)            # rank 0: files and log lines

What write_reports leaves in the workdir:
    detections_bbox.json  every detection as a COCO results file (the COCO evaluation server's format)
    per_class.md          AP, AP50, AP75 and the number of ground-truth boxes of each class (also logged, and
                          returned for results.json as 'per_class')
    pr_curves.png         precision-recall curves at IoU 0.5 and 0.75 of the 3 worst and the 3 best classes
    error_breakdown.md    the COCO analyze tool's error breakdown (retina_fn.eval.error_breakdown), and its
    error_breakdown.png   chart, when `eval.error_analysis` asks for it (returned as 'error_breakdown')
An image-info annotation file (no 'annotations', as COCO test-dev's) gets detections_bbox.json only: its
COCO metrics are NaN, the programs' mark of a set that was not scored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import numpy as np

from retina_fn.data import loader as data_loader
from retina_fn.eval import analysis, coco_eval, coco_results

log = logging.getLogger(__name__)

DETECTIONS_FILE = "detections_bbox.json"
# eval.error_analysis unset: the breakdown runs on sets of at most this many images (the demo's 200 take under
# a second). It re-runs COCOeval once per class: on a COCO-sized set (5000 images, 80 classes, 7 boxes and 100
# detections per image, a busy 2-core machine) it took 123 s with faster-coco-eval, 4 times the evaluation;
# with pycocotools about as long as the evaluation itself, 35 s per 1000 images.
ERROR_ANALYSIS_MAX_IMAGES = 1000
PR_CURVE_CLASSES = 3  # worst and best classes drawn in pr_curves.png


@dataclasses.dataclass(frozen=True)
class EvalRun:
    """One evaluation, as rank 0 holds it.

    metrics: {name: float}: COCOeval's METRIC_NAMES (each NaN when the annotation file has no ground truth),
      eval_images_per_s and num_detections.
    results: the merged COCO result dicts.
    img_ids: the image ids that were run.
    scores: COCOeval's per-class precision (retina_fn.eval.coco_eval.CocoEvaluation); None without ground truth.
    vis: up to max_vis images' detections (image_id, boxes, scores, labels in original pixels) for drawing.
    """

    metrics: dict[str, float]
    results: list[dict]
    img_ids: list[int]
    scores: coco_eval.CocoEvaluation | None
    vis: list[dict[str, Any]]


def run_evaluation(eval_step, params: dict, loader, runtime, coco_set, max_vis: int = 0,
                   use_faster: bool = True) -> EvalRun | None:
    """Detections for every image of the (sharded) loader, gathered on rank 0 and scored with COCOeval when
    the annotation file has ground truth.

    Args:
      eval_step: (params, batch) -> Detections (retina_fn.train.make_eval_step).
      params: the full parameter tree.
      loader: this rank's evaluation loader over coco_set.
      runtime: the process group (retina_fn.parallel.init): device, rank, gather_objects.
      coco_set: the evaluated retina_fn.data.coco.CocoSet.
      max_vis: how many images' detections to keep for drawing.
      use_faster: score with faster-coco-eval when it is installed.

    Returns:
      An EvalRun on rank 0, None on the other ranks.
    """
    results: list[dict] = []
    vis: list[dict[str, Any]] = []
    start = time.perf_counter()
    images = 0
    for batch in loader:
        batch = data_loader.to_device(batch, runtime.device)
        dets = eval_step(params, batch)
        ids = batch["image_id"].cpu()
        boxes, scores, labels, valid = (t.cpu() for t in (dets.boxes, dets.scores, dets.labels, dets.valid))
        results.extend(coco_results.detections_to_coco(boxes, scores, labels, ids, coco_set.label_map, valid=valid))
        images += int((ids >= 0).sum())
        for i in range(len(ids)):
            if len(vis) < max_vis and int(ids[i]) >= 0:
                keep = valid[i].numpy()
                vis.append({"image_id": int(ids[i]), "boxes": boxes[i].numpy()[keep],
                            "scores": scores[i].numpy()[keep], "labels": labels[i].numpy()[keep]})
    seconds = time.perf_counter() - start
    gathered = runtime.gather_objects(results)
    if not runtime.is_main:
        return None
    merged = coco_results.merge_results(gathered)
    img_ids = [r.image_id for r in coco_set.records]
    if coco_set.has_annotations:
        scores = coco_eval.evaluate_detailed(coco_set, merged, img_ids=img_ids, use_faster=use_faster)
        metrics = dict(scores.metrics)
    else:  # an image-info file: write_reports says so when it writes the detections
        scores, metrics = None, {name: math.nan for name in coco_eval.METRIC_NAMES}
    metrics["eval_images_per_s"] = images * runtime.world_size / max(seconds, 1e-9)
    metrics["num_detections"] = float(len(merged))
    return EvalRun(metrics, merged, img_ids, scores, vis)


def write_reports(eval_cfg, workdir: str, evaluated: EvalRun, coco_set) -> dict[str, Any]:
    """Writes the evaluation's files into workdir (see the module docstring) and logs the per-class table.

    Args:
      eval_cfg: the config's `eval` block (use_faster_coco_eval, error_analysis).
      workdir: an existing folder.
      evaluated: run_evaluation's result.
      coco_set: the evaluated retina_fn.data.coco.CocoSet.

    Returns:
      Entries for results.json: 'detections_file' (the results file's path); with ground truth also
      'per_class' (analysis.per_class_table's rows) and, when it ran, 'error_breakdown' ({kind: AP}).
    """
    path = coco_results.write_results(os.path.join(workdir, DETECTIONS_FILE), evaluated.results)
    extra: dict[str, Any] = {"detections_file": path}
    scores = evaluated.scores
    if scores is None:
        log.info("no mAP: %s has no ground truth; %d detections written to %s (COCO results format, for the COCO "
                 "evaluation server)", coco_set.ann_file, len(evaluated.results), path)
        return extra
    log.info("%d detections written to %s", len(evaluated.results), path)
    rows = analysis.per_class_table(scores.precision, scores.iou_thrs, scores.cat_ids, scores.names, scores.num_gt)
    table = analysis.format_per_class(rows)
    where = (f"{coco_set.ann_file}, {len(evaluated.img_ids)} images, {scores.backend}; area all, 100 detections "
             f"per image; AP over IoU 0.50:0.95, GT = non-crowd ground-truth boxes")
    log.info("per-class AP (%s):\n%s", where, table)
    _write_text(os.path.join(workdir, "per_class.md"), f"# Per-class COCO bbox AP\n\n{where}.\n\n{table}\n")
    extra["per_class"] = rows

    from retina_fn.eval import plots  # matplotlib, imported when a figure is drawn

    worst, best = analysis.extreme_classes(analysis.class_ap(scores.precision), PR_CURVE_CLASSES)
    if worst or best:
        plots.plot_pr_curves(os.path.join(workdir, "pr_curves.png"), scores.precision, scores.iou_thrs,
                             scores.rec_thrs, scores.names, worst, best)
    breakdown = _error_breakdown(eval_cfg, workdir, evaluated, coco_set)
    if breakdown is not None:
        extra["error_breakdown"] = breakdown
    return extra


def _error_breakdown(eval_cfg, workdir: str, evaluated: EvalRun, coco_set) -> dict[str, float] | None:
    """error_breakdown.md and .png when eval.error_analysis asks for it (True: always, False: never, unset:
    on sets of at most ERROR_ANALYSIS_MAX_IMAGES images); returns {kind: AP}, or None when it did not run."""
    num_images = len(evaluated.img_ids)
    setting = eval_cfg.error_analysis
    if setting is False:
        return None
    if setting is None and num_images > ERROR_ANALYSIS_MAX_IMAGES:
        log.info("error breakdown skipped: %d images (more than %d); --config.eval.error_analysis=True runs it",
                 num_images, ERROR_ANALYSIS_MAX_IMAGES)
        return None
    if not evaluated.results:
        log.info("error breakdown skipped: no detections")
        return None
    from retina_fn.eval import error_breakdown, plots

    start = time.perf_counter()
    breakdown = error_breakdown.error_breakdown(coco_set, evaluated.results, evaluated.img_ids,
                                                use_faster=eval_cfg.use_faster_coco_eval)
    ap, overall, curves = analysis.breakdown_summary(breakdown.precision)
    table = analysis.format_breakdown(breakdown.kinds, overall, ap, breakdown.names, error_breakdown.DESCRIPTIONS)
    notes = "".join(f"\n{kind} is left out: {why}.\n" for kind, why in breakdown.skipped.items())
    _write_text(os.path.join(workdir, "error_breakdown.md"),
                f"# COCO error breakdown\n\n{coco_set.ann_file}, {num_images} images; area all, 100 detections per "
                f"image; each curve relaxes the one above it; AP is averaged over the classes with ground "
                f"truth.\n{notes}\n{table}\n")
    plots.plot_error_breakdown(os.path.join(workdir, "error_breakdown.png"), breakdown.kinds, curves, overall,
                               breakdown.rec_thrs, f"{int((breakdown.num_gt > 0).sum())} classes")
    summary = {kind: float(v) for kind, v in zip(breakdown.kinds, overall)}
    log.info("error breakdown (AP, %.1f s): %s", time.perf_counter() - start,
             " | ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    return summary


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def vis_images(vis: list[dict[str, Any]], coco_set, class_names, out_dir: str, score_thr: float = 0.3,
               min_side: int = 480) -> list[str]:
    """Writes PNGs of `vis` detections and ground truth drawn over the original images, enlarged to a shorter side
    of at least `min_side`; returns the paths."""
    from retina_fn.data.coco import load_record_image
    from retina_fn.viz import draw_detections

    by_id = {r.image_id: r for r in coco_set.records}
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for item in vis:
        record = by_id[item["image_id"]]
        image = load_record_image(record)
        img = draw_detections(image, item["boxes"], item["scores"], item["labels"], class_names, score_thr,
                              gt_boxes=np.asarray(record.boxes), min_side=min_side)
        path = os.path.join(out_dir, f"val_{item['image_id']}.png")
        img.save(path)
        paths.append(path)
    return paths
