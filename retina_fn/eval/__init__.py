"""Evaluation on the host: COCO bbox metrics (`coco_eval`), per-class tables (`analysis`), the COCO error
breakdown (`error_breakdown`) and evaluation figures (`plots`, imported on its own: it loads matplotlib)."""

from retina_fn.eval.coco_eval import (
    METRIC_NAMES,
    CocoEvaluation,
    category_id_table,
    detections_to_coco,
    evaluate,
    evaluate_detailed,
    faster_coco_eval_backend,
    merge_results,
    write_results,
)

__all__ = [
    "METRIC_NAMES",
    "CocoEvaluation",
    "category_id_table",
    "detections_to_coco",
    "evaluate",
    "evaluate_detailed",
    "faster_coco_eval_backend",
    "merge_results",
    "write_results",
]
