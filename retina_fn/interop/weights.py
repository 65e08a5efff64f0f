"""Detector weights from a local file, whatever wrote it: retina_fn, torchvision or mmdetection.

The format is recognised by the keys (`detect_format`); every format goes through the same class-head
rules (see retina_fn.interop.detector) and the same one-report error on a mismatch. `count_in_weights`
reads the class count a file was made for (what model.num_classes='auto' resolves to).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from retina_fn import anchors, checkpoint, rng, tree
from retina_fn.interop import coco_names, mmdet, torchvision
from retina_fn.interop.detector import CLASS_HEAD, import_detector
from retina_fn.interop.mapping import CheckpointMismatch, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)

FORMATS = ("retina_fn", "torchvision", "mmdet", "torchvision_resnet")

# The classification conv's weight in each detector format's key naming.
_CLASS_WEIGHT_KEYS = {
    "retina_fn": CLASS_HEAD + tree.SEP + "weight",
    "torchvision": torchvision.retinanet_key(CLASS_HEAD + tree.SEP + "weight"),
    "mmdet": mmdet.mmdet_key(CLASS_HEAD + tree.SEP + "weight"),
}


def detect_format(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """'retina_fn' ('/'-joined paths such as 'backbone/conv1/weight'), 'torchvision' (RetinaNet:
    'backbone.body.*', 'head.classification_head.*'), 'mmdet' ('neck.*', 'bbox_head.*') or
    'torchvision_resnet' (an ImageNet classifier: 'conv1.weight', 'layer1.*', 'fc.*').
    Raises CheckpointMismatch naming a few keys when none fits."""
    keys = [str(k) for k in state_dict]

    def any_prefix(*prefixes):
        return any(k.startswith(prefixes) for k in keys)

    if any_prefix("backbone" + tree.SEP, "fpn" + tree.SEP, "head" + tree.SEP):
        return "retina_fn"
    if any_prefix("backbone.body.", "head.classification_head.", "head.regression_head."):
        return "torchvision"
    if any_prefix("neck.", "bbox_head."):
        return "mmdet"
    if "conv1.weight" in state_dict and any_prefix("layer1."):
        return "torchvision_resnet"
    if any_prefix("backbone.bottom_up."):
        raise CheckpointMismatch(f"{source} looks like a detectron2 checkpoint, which is not supported; "
                                 f"supported: retina_fn, torchvision RetinaNet, mmdetection v2 RetinaNet")
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointMismatch(f"{source}: unknown checkpoint layout (keys such as {sample}); supported: "
                             f"retina_fn, torchvision RetinaNet, mmdetection v2 RetinaNet")


def from_state_dict(state_dict: dict[str, torch.Tensor], model_cfg, *, reinit_class_head: bool = False,
                    key: rng.Key | None = None, source: str = "checkpoint") -> dict:
    """Our full parameter tree for model_cfg from a state_dict of any supported format (see
    `detect_format`); a flat retina_fn dict maps path to path. See from_torchvision / from_mmdet."""
    fmt = detect_format(state_dict, source)
    if fmt == "torchvision_resnet":
        raise CheckpointMismatch(
            f"{source} is a ResNet classification checkpoint, not a detector: use it as the backbone's "
            f"initialisation (--config.model.backbone.pretrained={source})")
    if fmt == "torchvision":
        if float(model_cfg.backbone.bn_eps) != 0.0:
            log.warning("%s: torchvision's RetinaNet v1 weights were trained with FrozenBN eps 0; the config has "
                        "model.backbone.bn_eps=%g (configs/torchvision_retinanet_v1.py sets 0.0)", source,
                        model_cfg.backbone.bn_eps)
        return torchvision.from_torchvision(state_dict, model_cfg, reinit_class_head=reinit_class_head, key=key,
                                            source=source)
    if fmt == "mmdet":
        return mmdet.from_mmdet(state_dict, model_cfg, reinit_class_head=reinit_class_head, key=key, source=source)
    return import_detector(state_dict, model_cfg, lambda p: p, source=source,
                           reinit_class_head=reinit_class_head, key=key)


class DetectorWeights(NamedTuple):
    """params: the full parameter tree {'backbone', 'fpn', 'head'} (float32, CPU); meta: a retina_fn
    checkpoint's metadata (config, label_map, data_position, ...), {} for other files; format: one of
    FORMATS."""

    params: dict
    meta: dict
    format: str


def load_detector_weights(path: str | os.PathLike, model_cfg, *, reinit_class_head: bool = False,
                          key: rng.Key | None = None) -> DetectorWeights:
    """Detector weights for model_cfg from a local file, read weights-only.

    Args:
      path: a retina_fn checkpoint (its trained and frozen parameters; the digest is verified), a
        torchvision or mmdetection RetinaNet checkpoint, or a flat {path: tensor} dict.
      model_cfg: the model the weights must fit.
      reinit_class_head: keep everything but the classification conv, drawn afresh from `key` (for
        fine-tuning on model.num_classes classes).

    Returns:
      DetectorWeights(params, meta, format).

    Raises:
      FileNotFoundError; CheckpointMismatch: one report of every missing, unexpected and mis-shaped key,
      or why the file is not a detector.
    """
    path = os.fspath(path)
    obj = read_checkpoint(path)
    meta: dict = {}
    if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT:
        try:
            restored = checkpoint.load(path)
        except checkpoint.CorruptCheckpoint as e:
            raise CheckpointMismatch(str(e)) from e
        state, meta = restored.state, dict(restored.meta or {})
        if not isinstance(state, dict) or "params" not in state:
            raise CheckpointMismatch(f"{path}: a retina_fn checkpoint without 'params'")
        parts = [state["params"]] + ([state["frozen"]] if state.get("frozen") else [])
        state_dict = tree.flatten_by_path(tree.merge(*parts))
    else:
        state_dict = unwrap_state_dict(obj, path)
    fmt = detect_format(state_dict, path)
    params = from_state_dict(state_dict, model_cfg, reinit_class_head=reinit_class_head, key=key, source=path)
    return DetectorWeights(params, meta, fmt)


def count_in_weights(path: str | os.PathLike, model_cfg) -> tuple[int, str]:
    """The class count a weights file was made for, and what said so.

    Args:
      path: a retina_fn checkpoint, or torchvision / mmdetection RetinaNet weights.
      model_cfg: the `model` block (its anchors give the anchors per cell).

    Returns:
      (count, source): a retina_fn checkpoint's stored label map, else the classification conv's output
      channels / anchors per cell.

    Raises:
      FileNotFoundError; CheckpointMismatch: not a detector, no classification conv, or a conv whose outputs
      are not a multiple of the anchors per cell.
    """
    path = os.fspath(path)
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT:
        try:
            restored = checkpoint.load(path)
        except checkpoint.CorruptCheckpoint as e:
            raise CheckpointMismatch(str(e)) from e
        label_map = (restored.meta or {}).get("label_map")
        if label_map:
            return len(label_map["category_ids"]), f"the label map stored in {path}"
        state_dict = tree.flatten_by_path(restored.state.get("params", {}))
    else:
        state_dict = unwrap_state_dict(obj, path)
    fmt = detect_format(state_dict, path)
    key = _CLASS_WEIGHT_KEYS.get(fmt)
    if key is None or key not in state_dict:
        raise CheckpointMismatch(f"{path} ({fmt}) has no classification conv ({key}) to count classes from")
    channels, per_cell = int(state_dict[key].shape[0]), anchors.anchors_per_cell(model_cfg.anchors)
    if channels % per_cell:
        raise CheckpointMismatch(f"{path}: {key} has {channels} output channels, not a multiple of the {per_cell} "
                                 f"anchors per cell of model.anchors")
    return channels // per_cell, f"{path} ({key}: {channels} channels / {per_cell} anchors per cell)"


def label_table(num_classes: int, meta: dict | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The category id and name of each class index.

    Args:
        num_classes: the model's class count K.
        meta: a retina_fn checkpoint's metadata ({} or None for other weights).

    Returns:
        (ids, names), K each: the checkpoint's label map (meta['label_map']) when there is one, else
        `coco_names.label_map_for(K)` (91: torchvision's layout, 80: mmdetection's, other K: ids 1..K).

    Raises:
        ValueError: the stored label map has another class count than K.
    """
    label_map = (meta or {}).get("label_map")
    if label_map:
        ids = tuple(int(i) for i in label_map["category_ids"])
        names = tuple(str(n) for n in label_map["names"])
        if len(ids) != num_classes:
            raise ValueError(f"the checkpoint's label map has {len(ids)} classes but model.num_classes is "
                             f"{num_classes}")
        return ids, names
    return coco_names.label_map_for(num_classes)
