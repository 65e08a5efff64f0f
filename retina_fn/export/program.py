"""What experiments.export traces: `Detector.predict` with the weights closed over, on one canvas with static
shapes, and inputs of the exported shapes.

    cfg = export_config(cfg, (512, 512))            # one canvas for both aspect groups, static_shapes on
    module = InferenceModule(Detector(cfg.model, [(512, 512)], "cpu"), params)
    program = torch.export.export(module, example_inputs(batch=1, canvas_hw=(512, 512)))
"""

from __future__ import annotations

from typing import Sequence

import torch

from retina_fn import errors
from retina_fn.detector import Detector


class InferenceModule(torch.nn.Module):
    """`Detector.predict` with the parameters closed over, as the module torch.export traces.

    Args:
      detector: the Detector of the export config (its anchors for the canvas are computed once).
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


def default_canvas(data_cfg) -> tuple[int, int]:
    """The smallest canvas holding both configured canvases: (max H, max W) of data.landscape_canvas and
    data.portrait_canvas, e.g. (1344, 1344) for (800, 1344) and (1344, 800)."""
    land, port = tuple(data_cfg.landscape_canvas), tuple(data_cfg.portrait_canvas)
    return max(land[0], port[0]), max(land[1], port[1])


def export_config(cfg, canvas_hw: Sequence[int] | None = None):
    """The config an export runs: one canvas for both aspect groups and static shapes in post-processing.

    Args:
      cfg: the whole config (not changed).
      canvas_hw: (H, W), or None for `default_canvas`.

    Returns:
      A copy of cfg with data.landscape_canvas = data.portrait_canvas = the canvas and
      model.test.static_shapes = True.

    Raises:
      ConfigError (a ValueError): a canvas that is not a multiple of model.size_divisor, or that cannot hold
        every image resized with data.scale (naming --canvas and --config.data.scale).
    """
    cfg = cfg.copy_and_resolve_references()
    canvas = tuple(int(v) for v in (default_canvas(cfg.data) if canvas_hw is None else canvas_hw))
    divisor = int(cfg.model.size_divisor)
    if len(canvas) != 2 or min(canvas) <= 0 or canvas[0] % divisor or canvas[1] % divisor:
        raise errors.ConfigError(f"--canvas {canvas} must be two positive multiples of model.size_divisor={divisor}")
    longest = max(cfg.data.scale)
    if min(canvas) < longest:
        raise errors.ConfigError(f"--canvas {canvas[0]}x{canvas[1]} cannot hold every image resized with data.scale="
                         f"{tuple(cfg.data.scale)} (one canvas serves landscape and portrait images, so both "
                         f"sides need >= {longest}): pass a larger --canvas or a smaller scale, e.g. "
                         f"--config.data.scale={min(canvas)},{min(canvas)}")
    cfg.data.landscape_canvas = canvas
    cfg.data.portrait_canvas = canvas
    cfg.model.test.static_shapes = True
    return cfg


def example_inputs(batch: int, canvas_hw: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the exported shapes: a zero image [N, 3, H, W], image_hw = the canvas [N, 2], scale 1 [N, 2]."""
    h, w = (int(v) for v in canvas_hw)
    return (torch.zeros(batch, 3, h, w), torch.tensor([[h, w]] * batch, dtype=torch.int64),
            torch.ones(batch, 2))

