"""torchvision checkpoints <-> parameter trees.

torchvision's ResNet keys are ours with '.' for '/': 'layer1.0.downsample.0.weight' is
'layer1/0/downsample/0/weight'. `fc.*` (the classifier) and `*.num_batches_tracked` are dropped.
"""

from __future__ import annotations

from retina_fn import rng, tree
from retina_fn.interop.mapping import load_mapped
from retina_fn.model import resnet


def resnet_key_mapping(params: dict, prefix: str = "") -> dict[str, str]:
    """{our backbone path: torchvision key} for a ResNet parameter tree."""
    return {p: prefix + p.replace(tree.SEP, ".") for p in tree.paths(params)}


def resnet_from_torchvision(state_dict: dict, backbone_cfg, source: str = "torchvision ResNet checkpoint") -> dict:
    """A torchvision ResNet classification state_dict (resnet50-*.pth) -> backbone parameters.
    The classifier is dropped; depth must match backbone_cfg.depth (the report says otherwise)."""
    like = resnet.init(rng.key(0), backbone_cfg)  # only its paths and shapes are used
    return load_mapped(state_dict, like, resnet_key_mapping(like), ignore=("fc.weight", "fc.bias", "num_batches_tracked"),
                       source=source)
