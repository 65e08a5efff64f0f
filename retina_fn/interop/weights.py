"""Detector weights from a local file, whatever wrote it: retina_fn, torchvision or mmdetection.

The format is recognised by the keys (`detect_format`); every format goes through the same class-head
rules (see retina_fn.interop.detector) and the same one-report error on a mismatch. `count_in_weights`
reads the class count a file was made for (what model.num_classes='auto' resolves to).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import NamedTuple

import torch

from retina_fn import checkpoint, errors, rng, tree
from retina_fn import spec as spec_lib
from retina_fn.interop import coco_names, mmdet, torchvision
from retina_fn.interop.detector import CLASS_HEAD, import_detector
from retina_fn.interop.mapping import CheckpointMismatch, unwrap_state_dict

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


def from_state_dict(state_dict: dict[str, torch.Tensor], spec, *, reinit_class_head: bool = False,
                    key: rng.Key | None = None, source: str = "checkpoint") -> dict:
    """Our full parameter tree for spec from a state_dict of any supported format (see
    `detect_format`); a flat retina_fn dict maps path to path. See from_torchvision / from_mmdet."""
    fmt = detect_format(state_dict, source)
    if fmt == "torchvision_resnet":
        raise CheckpointMismatch(
            f"{source} is a ResNet classification checkpoint, not a detector: use it as the backbone's "
            f"initialisation (--config.model.backbone.pretrained={source})")
    if fmt == "torchvision":
        if float(spec.backbone.bn_eps) != 0.0:
            log.warning("%s: torchvision's RetinaNet v1 weights were trained with FrozenBN eps 0; the config has "
                        "model.backbone.bn_eps=%g (configs/torchvision_retinanet_v1.py sets 0.0)", source,
                        spec.backbone.bn_eps)
        return torchvision.from_torchvision(state_dict, spec, reinit_class_head=reinit_class_head, key=key,
                                            source=source)
    if fmt == "mmdet":
        return mmdet.from_mmdet(state_dict, spec, reinit_class_head=reinit_class_head, key=key, source=source)
    return import_detector(state_dict, spec, lambda p: p, source=source,
                           reinit_class_head=reinit_class_head, key=key)


class DetectorWeights(NamedTuple):
    """params: the full parameter tree {'backbone', 'fpn', 'head'} (float32, CPU); meta: a retina_fn
    checkpoint's metadata (config, label_map, data_position, ...), {} for other files; format: one of
    FORMATS."""

    params: dict
    meta: dict
    format: str


class RawWeights(NamedTuple):
    """A weights file as read: state_dict {key: tensor} in its own format's keys (a retina_fn checkpoint's
    trained and frozen parameters by path); meta: a retina_fn checkpoint's metadata, {} for other files;
    format: one of FORMATS."""

    state_dict: dict
    meta: dict
    format: str


def resolve(path: str | os.PathLike) -> str:
    """A weights path with a run folder (or its checkpoints/ folder) replaced by its newest checkpoint (logged).

    Raises:
      MissingFileError: no such file, or a folder holding no checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = checkpoint.list_checkpoints(os.path.join(path, "checkpoints")) or checkpoint.list_checkpoints(path)
        if not found:
            hint = ("an export folder: pass it with --exported DIR" if os.path.exists(os.path.join(path, "model.json"))
                    else "a folder holding no checkpoints/ckpt_N.pt: pass a weights file")
            raise errors.MissingFileError(f"{path} is {hint}")
        log.info("%s is a run folder: using its newest checkpoint %s", path, found[0])
        return found[0]
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"checkpoint file not found: {path}")
    return path


def read_weights(path: str | os.PathLike) -> RawWeights:
    """A local weights file read weights-only (a retina_fn checkpoint's digests verified), not yet mapped.

    Args:
      path: a weights file, or a run folder (its newest checkpoint, see `resolve`).

    Raises:
      MissingFileError; CheckpointMismatch: naming the file: unreadable, no PyTorch file (saying what it is), a
      retina_fn checkpoint with a bad field, a non-finite tensor, or not a detector of a supported layout.
    """
    path = resolve(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointMismatch(f"{path}: cannot read: {e}") from e
    obj = checkpoint.read_torch(data, path, CheckpointMismatch)
    meta: dict = {}
    if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT:
        try:
            restored = checkpoint.load(path)
        except checkpoint.CorruptCheckpoint as e:
            raise CheckpointMismatch(str(e)) from e
        state, meta = restored.state, dict(restored.meta)
        if not isinstance(state.get("params"), dict) or not isinstance(state.get("frozen", {}), dict):
            raise CheckpointMismatch(f"{path}: field 'state' holds no 'params' tree: not a detector's checkpoint")
        parts = [state["params"]] + ([state["frozen"]] if state.get("frozen") else [])
        state_dict = tree.flatten_by_path(tree.merge(*parts))
    else:
        state_dict = unwrap_state_dict(obj, path)
        for key, value in state_dict.items():
            checkpoint.nonfinite_refusal(value, f"tensor {key!r}", path, CheckpointMismatch)
    return RawWeights(state_dict, meta, detect_format(state_dict, path))


def load_detector_weights(path: str | os.PathLike, spec, *, reinit_class_head: bool = False,
                          key: rng.Key | None = None) -> DetectorWeights:
    """Detector weights for spec from a local file, read weights-only.

    Args:
      path: a retina_fn checkpoint (its trained and frozen parameters; the digest is verified), a
        torchvision or mmdetection RetinaNet checkpoint, or a flat {path: tensor} dict.
      spec: the detector the weights must fit.
      reinit_class_head: keep everything but the classification conv, drawn afresh from `key` (for
        fine-tuning on spec.num_classes classes).

    Returns:
      DetectorWeights(params, meta, format).

    Raises:
      FileNotFoundError; CheckpointMismatch: one report of every missing, unexpected and mis-shaped key,
      or why the file is not a detector.
    """
    raw = read_weights(path)
    params = from_state_dict(raw.state_dict, spec, reinit_class_head=reinit_class_head, key=key,
                             source=os.fspath(path))
    return DetectorWeights(params, raw.meta, raw.format)


def count_in_weights(path: str | os.PathLike, per_cell: int) -> tuple[int, str]:
    """The class count a weights file was made for, and what said so.

    Args:
      path: a retina_fn checkpoint, or torchvision / mmdetection RetinaNet weights.
      per_cell: anchors per feature-map cell (retina_fn.anchors.anchors_per_cell).

    Returns:
      (count, source): a retina_fn checkpoint's stored label map, else the classification conv's output
      channels / anchors per cell.

    Raises:
      FileNotFoundError; CheckpointMismatch: not a detector, no classification conv, or a conv whose outputs
      are not a multiple of the anchors per cell.
    """
    path = os.fspath(path)
    return classes_in(read_weights(path), per_cell, path)


def classes_in(raw: RawWeights, per_cell: int, source: str) -> tuple[int, str]:
    """(K, where K was read) for weights already read: a stored label map's length, else the classification
    conv's output channels / anchors per cell.

    Raises:
      CheckpointMismatch: no classification conv, or a channel count that is no multiple of per_cell.
    """
    labels = stored_label_map(raw.meta)
    if labels:
        return len(labels[0]), f"the label map stored in {source}"
    key = _CLASS_WEIGHT_KEYS.get(raw.format)
    if key is None or key not in raw.state_dict:
        raise CheckpointMismatch(f"{source} ({raw.format}) has no classification conv ({key}) to count classes from")
    channels = class_channels(raw.state_dict, key, source)
    if channels % per_cell:
        raise CheckpointMismatch(f"{source}: {key} has {channels} output channels, not a multiple of the {per_cell} "
                                 f"anchors per cell")
    return channels // per_cell, f"{source} ({key}: {channels} channels / {per_cell} anchors per cell)"


def class_channels(state_dict: dict, key: str, source: str) -> int:
    """The output channels of the classification conv weight `key`.

    Raises:
      CheckpointMismatch: naming `source` and `key`, a weight that is no [A*K, C, 3, 3] tensor.
    """
    weight = state_dict.get(key)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not weight.shape[0]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise CheckpointMismatch(f"{source}: {key} has shape {shape}; a classification conv weight is "
                                 f"[anchors x classes, channels, 3, 3]")
    return int(weight.shape[0])


def label_table(num_classes: int, meta: dict | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The category id and name of each class index: a retina_fn checkpoint's stored label map
    (`stored_label_map`), else `coco_names.label_map_for(K)` (91: torchvision's layout, 80: mmdetection's, other
    K: ids 1..K).

    Raises:
      CheckpointMismatch: the stored label map has another class count than K.
    """
    stored = stored_label_map(meta)
    if stored is None:
        return coco_names.label_map_for(num_classes)
    ids, names = tuple(int(i) for i in stored[0]), tuple(str(n) for n in stored[1])
    if len(ids) != num_classes:
        raise CheckpointMismatch(f"the checkpoint's label map has {len(ids)} classes but the detector has "
                                 f"{num_classes}")
    return ids, names


def stored_label_map(meta: dict | None) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    """The (category ids, names) a retina_fn checkpoint stores: its spec's, else its older 'label_map'; None
    for other weights."""
    meta = meta or {}
    if meta.get("spec"):
        return tuple(meta["spec"]["category_ids"]), tuple(meta["spec"]["names"])
    if meta.get("label_map"):
        return tuple(meta["label_map"]["category_ids"]), tuple(meta["label_map"]["names"])
    return None


def _mmdet_1x(depth: int, num_classes: int) -> spec_lib.DetectorSpec:
    """mmdetection v2.9.0's retinanet_r<depth>_fpn_1x_coco (configs/retinanet_r50_fpn_1x_coco.py)."""
    ids, names = coco_names.label_map_for(num_classes)
    s = spec_lib
    return s.DetectorSpec(
        num_classes=num_classes, category_ids=ids, names=names,
        backbone=s.BackboneSpec(depth=depth, style="pytorch", norm="frozen_bn", bn_eps=1e-5, gn_groups=32,
                                base_width=64, frozen_stages=1, norm_affine_trainable=True, channels_last=False),
        fpn=s.FPNSpec(out_channels=256, extra_source="input", relu_before_extra=False),
        head=s.HeadSpec(feat_channels=256, stacked_convs=4, norm="none", gn_groups=32, prior_prob=0.01),
        anchors=s.AnchorSpec(style="mmdet", octave_base_scale=4.0, scales_per_octave=3, ratios=(0.5, 1.0, 2.0),
                             strides=(8, 16, 32, 64, 128)),
        coder=s.CoderSpec(means=(0.0,) * 4, stds=(1.0,) * 4, scale_clamp=math.log(1000.0 / 16.0), clamp_lower=True),
        assigner=s.AssignerSpec(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=True,
                                low_quality="mmdet", ignore_iof_thr=-1.0),
        loss=s.LossSpec(focal_alpha=0.25, focal_gamma=2.0, fused_focal=False, cls_weight=1.0, box_loss="l1",
                        box_weight=1.0, normalizer="batch"),
        test=s.PostprocessSpec(nms_pre=1000, pre_select="anchor", score_thr=0.05, nms_iou=0.5, max_per_img=100,
                               max_candidates=5000, static_shapes=False),
        size_divisor=32, canvas_exact=True,
        input=s.InputSpec(resize_mode="mmdet", scale=(1333, 800), mean=(123.675, 116.28, 103.53),
                          std=(58.395, 57.12, 57.375), landscape_canvas=(800, 1344), portrait_canvas=(1344, 800)))


def _torchvision_v1() -> spec_lib.DetectorSpec:
    """torchvision's retinanet_resnet50_fpn v1 (configs/torchvision_retinanet_v1.py)."""
    base = _mmdet_1x(50, 91)
    return base.replace(
        backbone=dataclasses.replace(base.backbone, bn_eps=0.0, norm_affine_trainable=False),
        fpn=dataclasses.replace(base.fpn, extra_source="output", relu_before_extra=True),
        anchors=dataclasses.replace(base.anchors, style="torchvision"),
        coder=dataclasses.replace(base.coder, clamp_lower=False),
        assigner=dataclasses.replace(base.assigner, low_quality="torchvision"),
        loss=dataclasses.replace(base.loss, normalizer="image"),
        test=dataclasses.replace(base.test, pre_select="pair", max_per_img=300),
        input=dataclasses.replace(base.input, resize_mode="torchvision"))


def _depth_of(state_dict: dict, prefix: str) -> int:
    """The ResNet depth a state_dict's backbone has: its block count in layer3 and its block type."""
    blocks = {k[len(prefix):].split(".")[1] for k in state_dict if k.startswith(prefix + "layer3.")}
    bottleneck = any(k.startswith(prefix + "layer1.0.conv3.") for k in state_dict)
    by_blocks = {(6, True): 50, (23, True): 101, (36, True): 152, (6, False): 34, (2, False): 18}
    depth = by_blocks.get((len(blocks), bottleneck))
    if depth is None:
        raise CheckpointMismatch(f"a ResNet backbone of {len(blocks)} blocks in layer3 is no standard depth")
    return depth


def reference_spec(state_dict: dict, fmt: str, source: str) -> spec_lib.DetectorSpec:
    """The spec of the layout foreign weights come from: mmdetection's retinanet_r<depth>_fpn_1x (depth and class
    count read off the weights) or torchvision's retinanet_resnet50_fpn v1 (91 classes).

    Args:
      state_dict: the weights (as `unwrap_state_dict` gives them); fmt: 'mmdet' or 'torchvision'.
      source: the file, for messages.

    Raises:
      CheckpointMismatch: another format, or a backbone of no standard depth.
    """
    if fmt == "torchvision":
        return _torchvision_v1()
    if fmt != "mmdet":
        raise CheckpointMismatch(f"{source}: {fmt} weights have no reference layout to take a spec from")
    channels = class_channels(state_dict, _CLASS_WEIGHT_KEYS["mmdet"], source)
    return _mmdet_1x(_depth_of(state_dict, "backbone."), channels // 9)
