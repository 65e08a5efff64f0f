"""RetinaNet as a trainable detector: targets, loss and prediction over a batch (docs/conventions.md's batch),
the one place that knows how anchors, assignment, model, losses and post-processing fit together.

`retina_fn.train.step` sees `prepare` and `loss` only (its `Objective`). Methods are pure functions of their
arguments and the spec; each canvas's anchors are memoised, so a compiled step finds them as constants.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from retina_fn import anchors as anchor_lib
from retina_fn import assign, losses, postprocess
from retina_fn.model import inputs, retinanet
from retina_fn.spec import DetectorSpec


class Targets(NamedTuple):
    """What the loss needs besides the head outputs and anchors; every leaf is per image [B, ...]."""

    anchor_valid: torch.Tensor  # bool [B, A]: inside the image's padded extent
    assignment: assign.Assignment  # [B, A] fields


class Detector:
    """RetinaNet bound to its spec; `canvases` (H, W) get their anchors on `device` up front, others on first use."""

    def __init__(self, spec: DetectorSpec, canvases: Sequence[tuple[int, int]] = (),
                 device: torch.device | str = "cpu"):
        self.spec = spec
        self._anchors: dict = {}
        self._bases: dict = {}
        for hw in canvases:
            self.anchors(tuple(hw), device)
        self._level_bases(device)

    def anchors(self, canvas_hw: tuple[int, int], device) -> torch.Tensor:
        """float32 [A, 4] xyxy anchors of the (H, W) canvas, in the model's output order."""
        key = (int(canvas_hw[0]), int(canvas_hw[1]), str(torch.device(device)))
        if key not in self._anchors:
            self._anchors[key] = anchor_lib.anchors(key[:2], self.spec.anchors).to(device)
        return self._anchors[key]

    def _level_bases(self, device) -> list[torch.Tensor]:
        key = str(torch.device(device))
        if key not in self._bases:
            self._bases[key] = anchor_lib.level_bases(self.spec.anchors, device)
        return self._bases[key]

    def _batch_anchors(self, batch: dict) -> torch.Tensor:
        return self.anchors(tuple(batch["image"].shape[-2:]), batch["image"].device)

    @torch.no_grad()
    def targets(self, batch: dict) -> Targets:
        """Anchor validity and the MaxIoU assignment of a batch: reads image (its shape), image_hw, boxes, box_valid
        and, when present, ignore_boxes / ignore_valid."""
        canvas = tuple(batch["image"].shape[-2:])
        anchor_valid = anchor_lib.valid_flags(canvas, batch["image_hw"], self.spec.anchors, self.spec.size_divisor)
        assignment = assign.assign(self._batch_anchors(batch), anchor_valid, batch["boxes"], batch["box_valid"],
                                   self.spec.assigner, batch.get("ignore_boxes"), batch.get("ignore_valid"))
        return Targets(anchor_valid, assignment)

    def prepare(self, batch: dict) -> tuple[Targets, torch.Tensor]:
        """(targets, normalizer float32 []) of the whole step's batch: the per-step work outside the gradient; the
        normaliser (losses.loss_normalizer) is this replica's."""
        targets = self.targets(batch)
        positive = targets.assignment.positive & targets.anchor_valid
        return targets, losses.loss_normalizer(positive, self.spec.loss)

    def head_outputs(self, params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The network on batch image (float, or uint8 normalised on the device) and image_hw:
        (cls_logits float [B, A, K], box_deltas float [B, A, 4])."""
        return retinanet.apply(params, inputs.model_input(batch, self.spec.input), self.spec, batch["image_hw"])

    def loss(self, params: dict, batch: dict, targets: Targets, normalizer: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`losses.retinanet_loss` of a batch (reads image, image_hw, boxes, labels), differentiable in `params`;
        targets: this batch's (or its micro-batch slice)."""
        cls_logits, box_deltas = self.head_outputs(params, batch)
        return losses.retinanet_loss(cls_logits, box_deltas, self._batch_anchors(batch), targets.anchor_valid,
                                     targets.assignment, batch["boxes"], batch["labels"], self.spec.loss,
                                     self.spec.coder, normalizer=normalizer)

    def detections(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, batch: dict) -> postprocess.Detections:
        """postprocess.detect of `head_outputs` (reads image, image_hw and, when present, scale_factor). With
        spec.canvas_exact, the detections of each image padded alone to spec.size_divisor."""
        spec = self.spec
        canvas = tuple(batch["image"].shape[-2:])
        anchors, anchor_valid = self._batch_anchors(batch), None
        if spec.canvas_exact:
            anchor_valid = anchor_lib.valid_flags(canvas, batch["image_hw"], spec.anchors, spec.size_divisor)
            if spec.anchors.style == "torchvision":  # its P6 / P7 grid steps follow each image's size
                anchors = anchor_lib.image_anchors(canvas, batch["image_hw"], spec.anchors, spec.size_divisor,
                                                   self._level_bases(batch["image"].device))
        return postprocess.detect(cls_logits, box_deltas, anchors, anchor_lib.level_counts(canvas, spec.anchors),
                                  batch["image_hw"], batch.get("scale_factor"), spec.test, spec.coder,
                                  anchor_valid=anchor_valid)

    def predict(self, params: dict, batch: dict) -> postprocess.Detections:
        """Detections for a batch: `head_outputs`, then `detections` (no gradient needed)."""
        return self.detections(*self.head_outputs(params, batch), batch)
