"""mmdetection v2 RetinaNet checkpoints <-> parameter trees.

An mmdetection checkpoint is {'state_dict': {...}, 'meta': {...}} (the wrapper is optional here). Keys:
  backbone/<p>              <-> backbone.<p dotted>            (mmdetection's ResNet names = torchvision's)
  fpn/lateral/<i>/<w|b>     <-> neck.lateral_convs.<i>.conv.<w|b>   (C3, C4, C5: start_level 1)
  fpn/output/<i>/<w|b>      <-> neck.fpn_convs.<i>.conv.<w|b>       (P3, P4, P5)
  fpn/p6, fpn/p7            <-> neck.fpn_convs.3.conv, neck.fpn_convs.4.conv   (the extra convs)
  head/cls_convs/<j>/<w|b>  <-> bbox_head.cls_convs.<j>.conv.<w|b>  (ConvModule; GroupNorm: .gn.<w|b>)
  head/reg_convs/<j>/<w|b>  <-> bbox_head.reg_convs.<j>.conv.<w|b>
  head/cls_logits           <-> bbox_head.retina_cls
  head/bbox_reg             <-> bbox_head.retina_reg
BatchNorm's `num_batches_tracked` is ignored on import and written as 0 on export. The class head's
channel layout (anchor-major, channel = a * K + k) is ours, so nothing is permuted. mmdetection v2
models have 80 COCO classes (no background output).
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
    parts = path.split(tree.SEP)
    top, rest = parts[0], parts[1:]
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
    """An mmdetection v2 RetinaNet checkpoint ({'state_dict', 'meta'} or the bare state_dict) -> our
    full parameter tree for spec (float32, CPU).

    A class count other than model.num_classes is reported, unless reinit_class_head=True draws a
    fresh classification conv from `key` (fine-tuning on other classes).
    Raises CheckpointMismatch with one report of every missing, unexpected and mis-shaped key."""
    state_dict = unwrap_state_dict(checkpoint, source)
    return import_detector(state_dict, spec, mmdet_key, source=source, ignore=("num_batches_tracked",),
                           reinit_class_head=reinit_class_head, key=key)


def to_mmdet(params: dict, spec, *, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Our parameter tree -> {'state_dict': {key: tensor}, 'meta': {...}} as mmdetection saves a
    checkpoint, each BatchNorm with num_batches_tracked = 0 (int64). meta['CLASSES'] holds class_names
    when given (mmdetection reads the class names from there)."""
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
