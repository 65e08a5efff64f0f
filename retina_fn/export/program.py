"""What experiments.export traces: `Detector.predict` with the weights closed over, on one canvas with static
shapes, and inputs of the exported shapes.

    spec = export_spec(spec, (512, 512))            # one canvas for both aspect groups, static_shapes on
    module = InferenceModule(Detector(spec, [(512, 512)], "cpu"), params)
    program = torch.export.export(module, example_inputs(batch=1, canvas_hw=(512, 512)))
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from retina_fn import errors
from retina_fn.detector import Detector
from retina_fn.spec import DetectorSpec, InputSpec


class InferenceModule(torch.nn.Module):
    """`Detector.predict` with the parameters closed over, as the module torch.export traces.

    Args:
      detector: the Detector of the export spec (its anchors for the canvas are computed once).
      params: the full parameter tree, float32 on the CPU; they become constants of the program.
    """

    def __init__(self, detector: Detector, params: dict):
        super().__init__()
        self._detector = detector
        self._params = params

    def forward(self, image: torch.Tensor, image_hw: torch.Tensor, scale_factor: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: image float32 [N, 3, H, W], image_hw int64 [N, 2], scale_factor float32 [N, 2].
        Returns: (boxes float32 [N, M, 4], scores float32 [N, M], labels int64 [N, M], valid bool [N, M])."""
        detections = self._detector.predict(self._params, {"image": image, "image_hw": image_hw,
                                                           "scale_factor": scale_factor})
        return tuple(detections)


def default_canvas(spec: InputSpec) -> tuple[int, int]:
    """The smallest canvas holding both of the input's canvases: (max H, max W) of landscape_canvas and
    portrait_canvas, e.g. (1344, 1344) for (800, 1344) and (1344, 800)."""
    land, port = tuple(spec.landscape_canvas), tuple(spec.portrait_canvas)
    return max(land[0], port[0]), max(land[1], port[1])


def export_spec(spec: DetectorSpec, canvas_hw: Sequence[int] | None = None) -> DetectorSpec:
    """The detector an export runs: one canvas for both aspect groups and static shapes in post-processing.

    Args:
      spec: the trained detector's spec.
      canvas_hw: (H, W), or None for `default_canvas`.

    Returns:
      spec with input.landscape_canvas = input.portrait_canvas = the canvas and test.static_shapes = True.

    Raises:
      ConfigError: a canvas that is not a multiple of the size divisor, or that cannot hold every image resized
        with the input's scale (naming --canvas and --config.data.scale).
    """
    canvas = tuple(int(v) for v in (default_canvas(spec.input) if canvas_hw is None else canvas_hw))
    divisor = int(spec.size_divisor)
    if len(canvas) != 2 or min(canvas) <= 0 or canvas[0] % divisor or canvas[1] % divisor:
        raise errors.ConfigError(f"--canvas {canvas} must be two positive multiples of the size divisor {divisor}")
    longest = max(spec.input.scale)
    if min(canvas) < longest:
        raise errors.ConfigError(f"--canvas {canvas[0]}x{canvas[1]} cannot hold every image resized with data.scale="
                                 f"{tuple(spec.input.scale)} (one canvas serves landscape and portrait images, so "
                                 f"both sides need >= {longest}): pass a larger --canvas or a smaller scale, e.g. "
                                 f"--config.data.scale={min(canvas)},{min(canvas)} --use_config_for=data.scale")
    return spec.replace(input=dataclasses.replace(spec.input, landscape_canvas=canvas, portrait_canvas=canvas),
                        test=dataclasses.replace(spec.test, static_shapes=True))


def example_inputs(batch: int, canvas_hw: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the exported shapes: a zero image [N, 3, H, W], image_hw = the canvas [N, 2], scale 1 [N, 2]."""
    h, w = (int(v) for v in canvas_hw)
    return (torch.zeros(batch, 3, h, w), torch.tensor([[h, w]] * batch, dtype=torch.int64),
            torch.ones(batch, 2))

