"""Input pipeline: COCO-format files -> transformed samples -> static-shape batches on fixed canvases.

coco (parsing, filters, category table, decoding) -> transforms (resize, flip, normalise, pad) ->
dataset (per-sample keys, bad-image policy) -> sampler (aspect groups, per-epoch order, rank slices) ->
batching (padded ground truth) -> loader (torch DataLoader, totals). throughput measures a loader.
"""

from retina_fn.data.coco import CocoFormatError, CocoSet, ImageLoadError, ImageRecord, LabelMap, load_coco, load_split
from retina_fn.data.loader import DetectionLoader, make_eval_loader, make_train_loader

__all__ = [
    "CocoFormatError", "CocoSet", "DetectionLoader", "ImageLoadError", "ImageRecord", "LabelMap", "load_coco",
    "load_split", "make_eval_loader", "make_train_loader",
]
