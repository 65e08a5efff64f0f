"""torchvision checkpoints <-> parameter trees.

ResNet classification checkpoints (resnet50-*.pth): torchvision's keys are ours with '.' for '/':
'layer1.0.downsample.0.weight' is 'layer1/0/downsample/0/weight'. `fc.*` (the classifier) and
`*.num_batches_tracked` are dropped.

RetinaNet checkpoints (retinanet_resnet50_fpn_coco-*.pth, v1), key by key:
  backbone/<p>            <-> backbone.body.<p dotted>
  fpn/lateral/<i>/<w|b>   <-> backbone.fpn.inner_blocks.<i>.0.<w|b>   (1x1 on C3, C4, C5)
  fpn/output/<i>/<w|b>    <-> backbone.fpn.layer_blocks.<i>.0.<w|b>   (3x3 giving P3, P4, P5)
  fpn/p6, fpn/p7          <-> backbone.fpn.extra_blocks.p6 / .p7
  head/cls_convs/<j>      <-> head.classification_head.conv.<j>.0     (.1 for a GroupNorm, v2 layout)
  head/cls_logits         <-> head.classification_head.cls_logits
  head/reg_convs/<j>      <-> head.regression_head.conv.<j>.0
  head/bbox_reg           <-> head.regression_head.bbox_reg
Files written by older torchvision releases (the published v1 weights among them) name the FPN convs
'inner_blocks.<i>.<w|b>' / 'layer_blocks.<i>.<w|b>' and the head towers 'conv.<0|2|4|6>.<w|b>'; they are
renamed to the layout above first, as torchvision does when loading.

Classes: torchvision's v1 head has 91 outputs indexed by the COCO category id (see coco_names). Into a
91-class config it loads as it is. Into an 80-class config its 80 real COCO channels are taken in
ascending id order, the order of an 80-class COCO label map, so an 80-class evaluation scores the same
boxes (the 11 never-trained outputs are dropped). Other class counts are reported unless the class head
is re-initialised (`reinit_class_head=True`).

The v1 checkpoint was trained with FrozenBatchNorm eps = 0 (model.backbone.bn_eps = 0.0 in
configs/torchvision_retinanet_v1.py).
"""

from __future__ import annotations

import re

import torch

from retina_fn import anchors, rng, tree
from retina_fn.interop import coco_names
from retina_fn.interop.detector import CLASS_HEAD, export_detector, import_detector
from retina_fn.interop.mapping import CheckpointMismatch, load_mapped
from retina_fn.model import resnet

# Logit given to the never-trained torchvision outputs when an 80-class head is exported as 91 classes:
# sigmoid(-100) ~ 4e-44, far below any score threshold.
_UNUSED_CLASS_LOGIT = -100.0
_HEADS = {"cls": "head.classification_head.", "reg": "head.regression_head."}
_FPN_BLOCKS = {"lateral": "inner_blocks", "output": "layer_blocks"}


def resnet_key_mapping(params: dict, prefix: str = "") -> dict[str, str]:
    """{our backbone path: torchvision key} for a ResNet parameter tree."""
    return {p: prefix + p.replace(tree.SEP, ".") for p in tree.paths(params)}


def resnet_from_torchvision(state_dict: dict, backbone, source: str = "torchvision ResNet checkpoint") -> dict:
    """A torchvision ResNet classification state_dict (resnet50-*.pth) -> backbone parameters.
    The classifier is dropped; depth must match backbone.depth (the report says otherwise)."""
    like = resnet.init(rng.key(0), backbone)  # only its paths and shapes are used
    return load_mapped(state_dict, like, resnet_key_mapping(like),
                       ignore=("fc.weight", "fc.bias", "num_batches_tracked"), source=source)


def retinanet_key(path: str) -> str:
    """torchvision's RetinaNet key (current layout) of our leaf path, e.g.
    'fpn/lateral/0/weight' -> 'backbone.fpn.inner_blocks.0.0.weight'."""
    parts = path.split(tree.SEP)
    top, rest = parts[0], parts[1:]
    if top == "backbone":
        return "backbone.body." + ".".join(rest)
    if top == "fpn":
        if rest[0] in _FPN_BLOCKS:
            return f"backbone.fpn.{_FPN_BLOCKS[rest[0]]}.{rest[1]}.0.{rest[2]}"
        if rest[0] in ("p6", "p7"):
            return f"backbone.fpn.extra_blocks.{rest[0]}.{rest[1]}"
    if top == "head":
        if rest[0] in ("cls_convs", "reg_convs"):
            prefix = _HEADS[rest[0][:3]] + f"conv.{rest[1]}."
            if rest[2] == "norm":  # GroupNorm after the conv (torchvision's v2 head)
                return prefix + "1." + rest[3]
            return prefix + "0." + rest[2]
        if rest[0] == "cls_logits":
            return _HEADS["cls"] + "cls_logits." + rest[1]
        if rest[0] == "bbox_reg":
            return _HEADS["reg"] + "bbox_reg." + rest[1]
    raise ValueError(f"internal error: no torchvision key for parameter {path!r}")


_OLD_HEAD_CONV = re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$")
_OLD_FPN_CONV = re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks)\.(\d+)\.(weight|bias)$")


def upgrade_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a torchvision RetinaNet state_dict in the current key layout: the old head towers
    'conv.{0,2,4,6}.<w|b>' (conv, ReLU, conv, ...) become 'conv.{0,1,2,3}.0.<w|b>', the old FPN convs
    '<inner|layer>_blocks.<i>.<w|b>' become '<...>_blocks.<i>.0.<w|b>'. Keys already in the current
    layout are kept."""
    out = {}
    for k, v in state_dict.items():
        head = _OLD_HEAD_CONV.match(k)
        fpn = _OLD_FPN_CONV.match(k)
        if head and int(head.group(2)) % 2 == 0:
            k = f"{head.group(1)}.{int(head.group(2)) // 2}.0.{head.group(3)}"
        elif fpn:
            k = f"{fpn.group(1)}.{fpn.group(2)}.0.{fpn.group(3)}"
        if k in out:
            raise CheckpointMismatch(f"torchvision checkpoint holds both the old and the new name of {k}")
        out[k] = v
    return out


def coco91_channels(num_anchors: int) -> torch.Tensor:
    """Indices of the 80 real COCO outputs among a 91-class torchvision classification conv's channels
    (channel a * 91 + class): [num_anchors * 80] int64, anchor-major, ids ascending."""
    ids = torch.tensor(coco_names.COCO80_IDS, dtype=torch.int64)
    return (torch.arange(num_anchors, dtype=torch.int64)[:, None] * len(coco_names.COCO91_NAMES) + ids).reshape(-1)


def _coco91_to_80(state_dict: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """When the checkpoint's head has 91 classes and the config 80, the 80 COCO channels of it."""
    n = anchors.anchors_per_cell(spec.anchors)
    weight_key = retinanet_key(CLASS_HEAD + "/weight")
    bias_key = retinanet_key(CLASS_HEAD + "/bias")
    channels = state_dict.get(weight_key)
    if (int(spec.num_classes) != len(coco_names.COCO80_IDS) or channels is None
            or channels.shape[0] != n * len(coco_names.COCO91_NAMES)):
        return state_dict
    index = coco91_channels(n)
    out = dict(state_dict)
    out[weight_key] = state_dict[weight_key].index_select(0, index)
    if bias_key in state_dict:
        out[bias_key] = state_dict[bias_key].index_select(0, index)
    return out


def _check_not_classifier(state_dict: dict, source: str) -> None:
    if "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        raise CheckpointMismatch(
            f"{source} is a ResNet classification checkpoint, not a RetinaNet: use it as the backbone's "
            f"initialisation (model.backbone.pretrained), or load it with resnet_from_torchvision")


def from_torchvision(state_dict: dict[str, torch.Tensor], spec, *, reinit_class_head: bool = False,
                     key: rng.Key | None = None, source: str = "torchvision RetinaNet checkpoint") -> dict:
    """A torchvision RetinaNet state_dict (e.g. `retinanet_resnet50_fpn(...).state_dict()`, old or new
    key layout, FrozenBN or BatchNorm backbone) -> our full parameter tree for spec (float32, CPU).

    Class counts: see the module docstring (91 -> 91 as is, 91 -> 80 COCO channels, otherwise a report
    or, with reinit_class_head=True, a fresh classification conv drawn from `key`).
    Raises CheckpointMismatch with one report of every missing, unexpected and mis-shaped key; a ResNet
    classification checkpoint is named as such."""
    _check_not_classifier(state_dict, source)
    state_dict = upgrade_keys(state_dict)
    if not reinit_class_head:
        state_dict = _coco91_to_80(state_dict, spec)
    return import_detector(state_dict, spec, retinanet_key, source=source, ignore=("num_batches_tracked",),
                           reinit_class_head=reinit_class_head, key=key)


def to_torchvision(params: dict, spec, *, coco91: bool = False) -> dict[str, torch.Tensor]:
    """Our parameter tree -> a torchvision RetinaNet state_dict in the current key layout (FrozenBN
    entries: weight, bias, running_mean, running_var; no num_batches_tracked), loadable with
    `load_state_dict` into torchvision's RetinaNet built with the same structure and class count.

    coco91: for an 80-class COCO model, write torchvision's 91-output layout (class index = COCO
    category id) so the state_dict loads into the stock `retinanet_resnet50_fpn(num_classes=91)`; the
    11 unused outputs get zero weights and a bias of -100 (never above a score threshold)."""
    state_dict = export_detector(params, spec, retinanet_key)
    if not coco91:
        return state_dict
    if int(spec.num_classes) != len(coco_names.COCO80_IDS):
        raise ValueError(f"coco91=True needs an 80-class COCO model, the config has model.num_classes="
                         f"{spec.num_classes}")
    n = anchors.anchors_per_cell(spec.anchors)
    index = coco91_channels(n)
    weight_key, bias_key = retinanet_key(CLASS_HEAD + "/weight"), retinanet_key(CLASS_HEAD + "/bias")
    weight, bias = state_dict[weight_key], state_dict[bias_key]
    wide_weight = weight.new_zeros((n * len(coco_names.COCO91_NAMES),) + tuple(weight.shape[1:]))
    wide_bias = bias.new_full((n * len(coco_names.COCO91_NAMES),), _UNUSED_CLASS_LOGIT)
    state_dict[weight_key] = wide_weight.index_copy(0, index, weight)
    state_dict[bias_key] = wide_bias.index_copy(0, index, bias)
    return state_dict

