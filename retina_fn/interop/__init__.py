"""Weights in and out: torchvision and mmdetection checkpoints."""

from retina_fn.interop.mapping import CheckpointMismatch, load_mapped, load_state_dict
from retina_fn.interop.torchvision import resnet_from_torchvision

__all__ = ["CheckpointMismatch", "load_mapped", "load_state_dict", "resnet_from_torchvision"]
