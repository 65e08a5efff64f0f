"""Evaluation on the host: COCO bbox metrics."""

from retina_fn.eval.coco_eval import (
    METRIC_NAMES,
    category_id_table,
    detections_to_coco,
    evaluate,
    evaluate_with_summary,
    faster_coco_eval_backend,
    merge_results,
)

__all__ = [
    "METRIC_NAMES",
    "category_id_table",
    "detections_to_coco",
    "evaluate",
    "evaluate_with_summary",
    "faster_coco_eval_backend",
    "merge_results",
]
