"""The folder `experiments.export` writes, and reading it back: file names, the tensors' names, model.json and
the torch.export program as a callable (what `experiments.predict --exported` runs).

    spec = read_spec("exported/demo")                  # model.json, checked
    run = load_program("exported/demo", spec)          # run(batch) -> postprocess.Detections
    cfg = transform_config(spec)                       # the input pipeline onto the export's canvas
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

from retina_fn.data import transforms
from retina_fn.postprocess import Detections

SPEC_FORMAT = "retina_fn-export"
SPEC_VERSION = 1
SPEC_FILE = "model.json"
PROGRAM_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
INPUT_NAMES = ("image", "image_hw", "scale_factor")
OUTPUT_NAMES = ("boxes", "scores", "labels", "valid")


def read_spec(directory: str) -> dict[str, Any]:
    """The model.json of an export folder.

    Args:
      directory: a folder written by experiments.export.

    Returns:
      The spec (experiments.export.make_spec's dict).

    Raises:
      FileNotFoundError: no model.json in the folder; ValueError: not an export of this format and version.
    """
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {SPEC_FILE}: not a folder written by experiments.export")
    with open(path) as f:
        spec = json.load(f)
    if spec.get("format") != SPEC_FORMAT or spec.get("version") != SPEC_VERSION:
        raise ValueError(f"{path}: format {spec.get('format')!r} version {spec.get('version')!r}; expected "
                         f"{SPEC_FORMAT!r} version {SPEC_VERSION}")
    return spec


def transform_config(spec: dict[str, Any]) -> transforms.TransformConfig:
    """The input pipeline an export expects: its resize mode, scale, mean and std, onto its one canvas.

    Args:
      spec: `read_spec`'s dict.

    Returns:
      A TransformConfig whose landscape and portrait canvases are both the export's canvas (no flip).
    """
    pre = spec["preprocess"]
    canvas = tuple(int(v) for v in spec["canvas"])
    return transforms.TransformConfig(scale=tuple(pre["scale"]), mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                                      flip_prob=0.0, landscape_canvas=canvas, portrait_canvas=canvas,
                                      resize_mode=pre["resize_mode"])


def load_program(directory: str, spec: dict[str, Any]) -> Callable[[dict], Detections]:
    """The torch.export program of a folder as `run(batch) -> Detections`.

    Args:
      directory: the export folder.
      spec: its `read_spec`.

    Returns:
      run(batch): batch holds image float32 [B, 3, H, W], image_hw int64 [B, 2] and scale_factor float32
      [B, 2] on the export's canvas, 1 <= B <= N (fewer than N images are padded with copies of the first,
      whose rows are dropped); returns Detections with B rows (ValueError for another B).

    Raises:
      FileNotFoundError: the folder has no .pt2 (exported with --format onnx).
    """
    name = spec["files"].get("exported")
    if name is None:
        raise FileNotFoundError(f"{directory} holds no torch.export program (it was exported with --format onnx); "
                                f"export with --format exported or both")
    program = torch.export.load(os.path.join(directory, name)).module()
    size = int(spec["batch"])

    def run(batch: dict) -> Detections:
        count = batch["image"].shape[0]
        if not 1 <= count <= size:
            raise ValueError(f"the exported program takes 1 to {size} images per call, got {count}")
        args = [batch[key] for key in INPUT_NAMES]
        if count < size:
            args = [torch.cat([a, a[:1].expand(size - count, *a.shape[1:])]) for a in args]
        with torch.no_grad():
            outputs = program(*args)
        return Detections(*(t[:count] for t in outputs))

    return run
