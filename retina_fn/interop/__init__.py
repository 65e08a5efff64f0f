"""Weights in and out: torchvision and mmdetection checkpoints (e.g. `load_detector_weights(path, spec).params`)."""

from retina_fn.interop.coco_names import COCO80_IDS, COCO80_NAMES, COCO91_NAMES, label_map_for
from retina_fn.interop.mapping import CheckpointMismatch, load_mapped, load_state_dict
from retina_fn.interop.mmdet import from_mmdet, to_mmdet
from retina_fn.interop.torchvision import from_torchvision, resnet_from_torchvision, to_torchvision
from retina_fn.interop.weights import (DetectorWeights, count_in_weights, detect_format, from_state_dict,
                                      label_table, load_detector_weights)

__all__ = [
    "COCO80_IDS", "COCO80_NAMES", "COCO91_NAMES", "CheckpointMismatch", "DetectorWeights", "count_in_weights",
    "detect_format", "from_mmdet", "from_state_dict", "from_torchvision", "label_map_for", "label_table",
    "load_detector_weights", "load_mapped", "load_state_dict", "resnet_from_torchvision", "to_mmdet", "to_torchvision",
]
