"""Evaluation on the host: the COCO results format (`coco_results`), the COCO libraries and ground truth
(`coco_backend`), COCO bbox metrics (`coco_eval`), per-class tables (`analysis`), the COCO error breakdown
(`error_breakdown`) and evaluation figures (`plots`, imported on its own: it loads matplotlib)."""

from retina_fn.eval.coco_backend import faster_coco_eval_backend
from retina_fn.eval.coco_eval import METRIC_NAMES, CocoEvaluation, evaluate, evaluate_detailed
from retina_fn.eval.coco_results import category_id_table, detections_to_coco, merge_results, write_results

__all__ = ["METRIC_NAMES", "CocoEvaluation", "category_id_table", "detections_to_coco", "evaluate", "evaluate_detailed",
           "faster_coco_eval_backend", "merge_results", "write_results"]
