"""Input pipeline: COCO-format files -> transformed samples -> static-shape batches on fixed canvases.

coco (parsing and filters; coco_schema: field checks; images: decoding) -> transforms (resize, flip,
normalise, pad; resize: the resize modes, mmdetection's and torchvision's, and the canvases) -> dataset
(per-sample keys, bad-image policy) -> sampler (aspect groups, per-epoch order, rank slices) -> batching
(padded ground truth) -> loader (torch DataLoader, totals, to_device). throughput measures a loader.
synthetic (with synthetic_shapes, synthetic_render) writes the built-in shapes dataset; random_batch makes
batches of noise for tests and benchmarks."""

from retina_fn.data.coco import CocoFormatError, CocoSet, ImageLoadError, ImageRecord, LabelMap, load_coco, load_split
from retina_fn.data.loader import DetectionLoader, make_eval_loader, make_train_loader

__all__ = ["CocoFormatError", "CocoSet", "DetectionLoader", "ImageLoadError", "ImageRecord", "LabelMap", "load_coco",
           "load_split", "make_eval_loader", "make_train_loader"]
