"""mmdetection v2 RetinaNet checkpoints <-> parameter trees.

A checkpoint is {'state_dict': {...}, 'meta': {...}} (the wrapper is optional here); `mmdet_key` names each leaf
(backbone.*, neck.lateral_convs / fpn_convs with P6, P7 as fpn_convs.3, .4, bbox_head.*). BatchNorm's
`num_batches_tracked` is ignored on import, written as 0 on export. The class head's channel layout (a * K + k)
is ours, so nothing is permuted; mmdetection v2 models have 80 COCO classes (no background).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from retina_fn import rng, tree
from retina_fn.interop.detector import export_detector, import_detector
from retina_fn.interop.mapping import unwrap_state_dict

_FPN_CONVS = {"lateral": "lateral_convs", "output": "fpn_convs"}
_EXTRA_LEVELS = {"p6": 3, "p7": 4}  # fpn_convs index of the extra levels after P3..P5
_HEAD_OUTPUTS = {"cls_logits": "retina_cls", "bbox_reg": "retina_reg"}


def mmdet_key(path: str) -> str:
    """mmdetection's key of our leaf path, e.g. 'fpn/p6/weight' -> 'neck.fpn_convs.3.conv.weight'."""
    top, *rest = path.split(tree.SEP)
    if top == "backbone":
        return "backbone." + ".".join(rest)
    if top == "fpn":
        if rest[0] in _FPN_CONVS:
            return f"neck.{_FPN_CONVS[rest[0]]}.{rest[1]}.conv.{rest[2]}"
        if rest[0] in _EXTRA_LEVELS:
            return f"neck.fpn_convs.{_EXTRA_LEVELS[rest[0]]}.conv.{rest[1]}"
    if top == "head":
        if rest[0] in ("cls_convs", "reg_convs"):
            if rest[2] == "norm":
                return f"bbox_head.{rest[0]}.{rest[1]}.gn.{rest[3]}"
            return f"bbox_head.{rest[0]}.{rest[1]}.conv.{rest[2]}"
        if rest[0] in _HEAD_OUTPUTS:
            return f"bbox_head.{_HEAD_OUTPUTS[rest[0]]}.{rest[1]}"
    raise ValueError(f"internal error: no mmdetection key for parameter {path!r}")


def from_mmdet(checkpoint: dict[str, Any], spec, *, reinit_class_head: bool = False,
               key: rng.Key | None = None, source: str = "mmdetection RetinaNet checkpoint") -> dict:
    """An mmdetection v2 RetinaNet checkpoint (wrapped or bare) -> our parameter tree for spec (float32, CPU);
    reinit_class_head, key: as `detector.import_detector`. Raises CheckpointMismatch (one report of every key)."""
    state_dict = unwrap_state_dict(checkpoint, source)
    return import_detector(state_dict, spec, mmdet_key, source=source, ignore=("num_batches_tracked",),
                           reinit_class_head=reinit_class_head, key=key)


def to_mmdet(params: dict, spec, *, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Our parameter tree -> {'state_dict', 'meta'} as mmdetection saves it; meta['CLASSES']: class_names."""
    state_dict = export_detector(params, spec, mmdet_key)
    for key in list(state_dict):
        if key.startswith("backbone.") and key.endswith(".running_var"):
            state_dict[key[: -len("running_var")] + "num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
    meta: dict[str, Any] = {}
    if class_names is not None:
        if len(class_names) != int(spec.num_classes):
            raise ValueError(f"{len(class_names)} class names for a model with model.num_classes="
                             f"{spec.num_classes}")
        meta["CLASSES"] = tuple(str(n) for n in class_names)
    return {"state_dict": state_dict, "meta": meta}
