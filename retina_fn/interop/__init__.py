"""Weights in and out: torchvision and mmdetection checkpoints.

    params = load_detector_weights("retinanet_resnet50_fpn_coco-eeacb38b.pth", spec).params   # a DetectorSpec
    params = from_mmdet(torch.load(f, weights_only=True), spec, reinit_class_head=True)  # fine-tune
    torch.save(to_torchvision(params, spec), "exported.pth")
"""

from retina_fn.interop.coco_names import COCO80_IDS, COCO80_NAMES, COCO91_NAMES, label_map_for
from retina_fn.interop.mapping import CheckpointMismatch, load_mapped, load_state_dict
from retina_fn.interop.mmdet import from_mmdet, to_mmdet
from retina_fn.interop.torchvision import from_torchvision, resnet_from_torchvision, to_torchvision
from retina_fn.interop.weights import (DetectorWeights, count_in_weights, detect_format, from_state_dict,
                                      label_table, load_detector_weights)

__all__ = [
    "COCO80_IDS", "COCO80_NAMES", "COCO91_NAMES", "CheckpointMismatch", "DetectorWeights", "count_in_weights",
    "detect_format",
    "from_mmdet",
    "from_state_dict", "from_torchvision", "label_map_for", "label_table", "load_detector_weights", "load_mapped",
    "load_state_dict", "resnet_from_torchvision", "to_mmdet", "to_torchvision",
]
