"""torchvision checkpoints <-> parameter trees.

ResNet classifiers: keys are our paths with '.' for '/' (`fc.*`, `num_batches_tracked` dropped). RetinaNet
(retinanet_resnet50_fpn_coco v1): `retinanet_key` names each leaf; older files' names (the published v1 weights':
FPN '<inner|layer>_blocks.<i>.<w|b>', head towers 'conv.<0|2|4|6>') are renamed first, as torchvision does.

Classes: the v1 head has 91 outputs indexed by COCO category id. It loads as is into a 91-class config; into an
80-class one its 80 real channels are taken in ascending id order (an 80-class COCO label map's). Other counts
are reported unless `reinit_class_head=True`. v1 was trained with FrozenBN eps 0 (model.backbone.bn_eps = 0.0).
"""

from __future__ import annotations

import re

import torch

from retina_fn import anchors, rng, tree
from retina_fn.interop import coco_names
from retina_fn.interop.detector import CLASS_HEAD, export_detector, import_detector
from retina_fn.interop.mapping import CheckpointMismatch, load_mapped
from retina_fn.model import resnet

# Logit of the never-trained outputs when an 80-class head is exported as 91: sigmoid(-100) ~ 4e-44.
_UNUSED_CLASS_LOGIT = -100.0
_HEADS = {"cls": "head.classification_head.", "reg": "head.regression_head."}
_FPN_BLOCKS = {"lateral": "inner_blocks", "output": "layer_blocks"}


def resnet_from_torchvision(state_dict: dict, backbone, source: str = "torchvision ResNet checkpoint") -> dict:
    """A torchvision ResNet classification state_dict -> backbone parameters; CheckpointMismatch for another depth."""
    like = resnet.init(rng.key(0), backbone)  # only its paths and shapes are used
    return load_mapped(state_dict, like, {p: p.replace(tree.SEP, ".") for p in tree.paths(like)},
                       ignore=("fc.weight", "fc.bias", "num_batches_tracked"), source=source)


def retinanet_key(path: str) -> str:
    """torchvision's key of our leaf path ('fpn/lateral/0/weight' -> 'backbone.fpn.inner_blocks.0.0.weight')."""
    top, *rest = path.split(tree.SEP)
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
    """A copy of a torchvision RetinaNet state_dict with old key names renamed (head conv.{0,2,4,6} ->
    conv.{0,1,2,3}.0, FPN <i> -> <i>.0)."""
    out = {}
    for k, v in state_dict.items():
        head, fpn = _OLD_HEAD_CONV.match(k), _OLD_FPN_CONV.match(k)
        if head and int(head.group(2)) % 2 == 0:
            k = f"{head.group(1)}.{int(head.group(2)) // 2}.0.{head.group(3)}"
        elif fpn:
            k = f"{fpn.group(1)}.{fpn.group(2)}.0.{fpn.group(3)}"
        if k in out:
            raise CheckpointMismatch(f"torchvision checkpoint holds both the old and the new name of {k}")
        out[k] = v
    return out


def coco91_channels(num_anchors: int) -> torch.Tensor:
    """int64 [num_anchors * 80]: the 80 real COCO channels (a * 91 + id) of a 91-class conv, ids ascending."""
    ids = torch.tensor(coco_names.COCO80_IDS, dtype=torch.int64)
    return (torch.arange(num_anchors, dtype=torch.int64)[:, None] * len(coco_names.COCO91_NAMES) + ids).reshape(-1)


def from_torchvision(state_dict: dict[str, torch.Tensor], spec, *, reinit_class_head: bool = False,
                     key: rng.Key | None = None, source: str = "torchvision RetinaNet checkpoint") -> dict:
    """A torchvision RetinaNet state_dict (old or new layout) -> our parameter tree for spec (float32, CPU).

    Class counts: see the module docstring; reinit_class_head, key: as `detector.import_detector`.
    Raises CheckpointMismatch (one report of every key; a ResNet classifier is named as such)."""
    if "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        raise CheckpointMismatch(
            f"{source} is a ResNet classification checkpoint, not a RetinaNet: use it as the backbone's "
            f"initialisation (model.backbone.pretrained), or load it with resnet_from_torchvision")
    state_dict = upgrade_keys(state_dict)  # a copy
    n = anchors.anchors_per_cell(spec.anchors)
    weight_key, bias_key = retinanet_key(CLASS_HEAD + "/weight"), retinanet_key(CLASS_HEAD + "/bias")
    channels = state_dict.get(weight_key)
    if (not reinit_class_head and int(spec.num_classes) == len(coco_names.COCO80_IDS) and channels is not None
            and channels.shape[0] == n * len(coco_names.COCO91_NAMES)):  # the 80 COCO channels of a 91-class head
        index = coco91_channels(n)
        state_dict[weight_key] = channels.index_select(0, index)
        if bias_key in state_dict:
            state_dict[bias_key] = state_dict[bias_key].index_select(0, index)
    return import_detector(state_dict, spec, retinanet_key, source=source, ignore=("num_batches_tracked",),
                           reinit_class_head=reinit_class_head, key=key)


def to_torchvision(params: dict, spec, *, coco91: bool = False) -> dict[str, torch.Tensor]:
    """Our parameter tree -> a torchvision RetinaNet state_dict (current layout, no num_batches_tracked).

    coco91: write an 80-class COCO model in the 91-output layout of the stock `retinanet_resnet50_fpn` (the 11
    unused outputs: zero weights, bias -100)."""
    state_dict = export_detector(params, spec, retinanet_key)
    if not coco91:
        return state_dict
    if int(spec.num_classes) != len(coco_names.COCO80_IDS):
        raise ValueError(f"coco91=True needs an 80-class COCO model, the config has model.num_classes="
                         f"{spec.num_classes}")
    n = anchors.anchors_per_cell(spec.anchors)
    index = coco91_channels(n)
    weight_key, bias_key = retinanet_key(CLASS_HEAD + "/weight"), retinanet_key(CLASS_HEAD + "/bias")
    weight, bias, wide = state_dict[weight_key], state_dict[bias_key], n * len(coco_names.COCO91_NAMES)
    state_dict[weight_key] = weight.new_zeros((wide,) + tuple(weight.shape[1:])).index_copy(0, index, weight)
    state_dict[bias_key] = bias.new_full((wide,), _UNUSED_CLASS_LOGIT).index_copy(0, index, bias)
    return state_dict

