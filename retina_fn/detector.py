"""RetinaNet as a trainable detector: targets, loss and prediction over a batch, with the anchors they share.

    detector = Detector(spec, canvases=[(800, 1344), (1344, 800)], device="cpu")   # spec: a DetectorSpec
    targets, normalizer = detector.prepare(batch)            # no gradient; per step
    loss, metrics = detector.loss(params, batch, targets, normalizer)
    detections = detector.predict(params, batch)             # postprocess.Detections

This is the one place that knows how anchors, assignment, the model, the losses and post-processing fit
together. `retina_fn.train.step` is generic: it sees `prepare` and `loss` only (the `Objective` protocol),
splits the batch and the targets into micro-batches, differentiates `loss` and applies the update. Every method
is a pure function of its arguments and the spec; the anchors of each canvas (a pure function of the canvas
and the spec) are memoised on first use, so a compiled or captured step finds them as constants.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from retina_fn import anchors as anchor_lib
from retina_fn import assign, losses, postprocess
from retina_fn.model import inputs, retinanet
from retina_fn.spec import DetectorSpec


class Targets(NamedTuple):
    """What the loss needs besides the head outputs and the anchors; every leaf is per image [B, ...], so
    a step can split it into micro-batches along dim 0."""

    anchor_valid: torch.Tensor  # bool [B, A]: inside the image's padded extent
    assignment: assign.Assignment  # [B, A] fields


class Detector:
    """RetinaNet bound to its spec; satisfies retina_fn.train.step.Objective.

    Args:
      spec: the detector's spec.
      canvases: the (H, W) canvases whose anchors are computed up front (the data's aspect groups); others are
        computed on their first use.
      device: where those anchors live.
    """

    def __init__(self, spec: DetectorSpec, canvases: Sequence[tuple[int, int]] = (),
                 device: torch.device | str = "cpu"):
        self.spec = spec
        self._anchors: dict = {}
        self._bases: dict = {}
        for hw in canvases:
            self.anchors(tuple(hw), device)
        self._level_bases(device)

    def anchors(self, canvas_hw: tuple[int, int], device) -> torch.Tensor:
        """Args: canvas_hw (H, W); device. Returns: float32 [A, 4] xyxy, in the model's output order."""
        key = (int(canvas_hw[0]), int(canvas_hw[1]), str(torch.device(device)))
        if key not in self._anchors:
            self._anchors[key] = anchor_lib.anchors(key[:2], self.spec.anchors).to(device)
        return self._anchors[key]

    def _level_bases(self, device) -> list[torch.Tensor]:
        """Each level's base anchors [n, 4] float32 (anchors.level_bases) on `device`."""
        key = str(torch.device(device))
        if key not in self._bases:
            self._bases[key] = anchor_lib.level_bases(self.spec.anchors, device)
        return self._bases[key]

    def _batch_anchors(self, batch: dict) -> torch.Tensor:
        return self.anchors(tuple(batch["image"].shape[-2:]), batch["image"].device)

    @torch.no_grad()
    def targets(self, batch: dict) -> Targets:
        """Anchor validity and the MaxIoU assignment of a batch (no gradient).

        Args:
          batch: docs/conventions.md's batch; reads image [B, 3, H, W] (its shape), image_hw [B, 2], boxes
            [B, G, 4], box_valid [B, G] and, when present, ignore_boxes [B, Gi, 4] / ignore_valid [B, Gi].

        Returns:
          Targets(anchor_valid bool [B, A], assignment with [B, A] fields).
        """
        canvas = tuple(batch["image"].shape[-2:])
        anchor_valid = anchor_lib.valid_flags(canvas, batch["image_hw"], self.spec.anchors, self.spec.size_divisor)
        assignment = assign.assign(self._batch_anchors(batch), anchor_valid, batch["boxes"], batch["box_valid"],
                                   self.spec.assigner, batch.get("ignore_boxes"), batch.get("ignore_valid"))
        return Targets(anchor_valid, assignment)

    def prepare(self, batch: dict) -> tuple[Targets, torch.Tensor]:
        """The per-step work outside the gradient.

        Args:
          batch: the whole step's batch [B, ...] (all micro-batches together).

        Returns:
          (targets, normalizer float32 []): the targets of every image and this replica's loss normaliser
          (losses.loss_normalizer), which the step may average over replicas.
        """
        targets = self.targets(batch)
        positive = targets.assignment.positive & targets.anchor_valid
        return targets, losses.loss_normalizer(positive, self.spec.loss)

    def head_outputs(self, params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The network: (cls_logits float [B, A, K], box_deltas float [B, A, 4]).

        Args:
          params: the full parameter tree {'backbone', 'fpn', 'head'}.
          batch: reads image float or uint8 [B, 3, H, W] (uint8: normalised on the device,
            model.inputs.model_input) and image_hw int64 [B, 2].
        """
        return retinanet.apply(params, inputs.model_input(batch, self.spec.input), self.spec, batch["image_hw"])

    def loss(self, params: dict, batch: dict, targets: Targets, normalizer: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The RetinaNet loss of a batch (focal + box loss), differentiable with respect to `params`.

        Args:
          params: the full parameter tree.
          batch: reads image, image_hw, boxes float32 [B, G, 4] and labels int64 [B, G].
          targets: `targets` (or `prepare`) of this batch, or its slice of a micro-batch split.
          normalizer: float32 [], the divisor of the summed loss terms (see losses.retinanet_loss).

        Returns:
          (loss float32 [], metrics {'loss', 'loss_cls', 'loss_box', 'num_pos'}: 0-d tensors that add up over
          micro-batches sharing one normaliser).
        """
        cls_logits, box_deltas = self.head_outputs(params, batch)
        return losses.retinanet_loss(cls_logits, box_deltas, self._batch_anchors(batch), targets.anchor_valid,
                                     targets.assignment, batch["boxes"], batch["labels"], self.spec.loss,
                                     self.spec.coder, normalizer=normalizer)

    def detections(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, batch: dict) -> postprocess.Detections:
        """Post-processing of a batch's head outputs (`head_outputs`).

        Args:
          cls_logits: float [B, A, K]; box_deltas: float [B, A, 4].
          batch: reads image (its canvas size), image_hw int64 [B, 2] and, when present, scale_factor float32
            [B, 2] (then boxes come back in original-image pixels).

        Returns:
          postprocess.Detections with [B, spec.test.max_per_img] rows. With spec.canvas_exact, those of each
          image padded alone to spec.size_divisor: anchors outside its extent are never candidates, and
          torchvision-style anchors follow the image's own padded size.
        """
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
