"""RetinaNet as a trainable detector: targets, loss and prediction over a batch, with the anchors they share.

    detector = Detector(cfg.model, canvases=[(800, 1344), (1344, 800)], device="cpu")
    targets, normalizer = detector.prepare(batch)            # no gradient; per step
    loss, metrics = detector.loss(params, batch, targets, normalizer)
    detections = detector.predict(params, batch)             # postprocess.Detections

This is the one place that knows how anchors, assignment, the model, the losses and post-processing fit
together. `retina_fn.train.step` is generic: it sees `prepare` and `loss` only (the `Objective`
protocol), splits the batch and the targets into micro-batches, differentiates `loss` and applies the
update. The functions here are pure; `AnchorCache` memoises the anchors of each canvas (a pure function
of the canvas and the config) so a compiled or captured step finds them as constants.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from retina_fn import anchors as anchor_lib
from retina_fn import assign, losses, postprocess
from retina_fn.model import inputs, retinanet


class AnchorCache:
    """Anchors [A, 4] and per-level counts for each canvas (H, W), computed once per canvas and device.

    Call `warm` for the known canvases before compiling a step, so tracing finds them ready."""

    def __init__(self, model_cfg):
        self.model_cfg = model_cfg
        self._anchors: dict = {}
        self._bases: dict = {}

    def warm(self, canvases: Sequence[tuple[int, int]], device) -> "AnchorCache":
        """Computes the anchors of every canvas (H, W), and each level's base anchors, on `device`; returns self."""
        for hw in canvases:
            self.get(tuple(hw), device)
        self.bases(device)
        return self

    def get(self, canvas_hw: tuple[int, int], device) -> torch.Tensor:
        """Args: canvas_hw (H, W); device. Returns: float32 [A, 4] xyxy, in the model's output order."""
        key = (int(canvas_hw[0]), int(canvas_hw[1]), str(torch.device(device)))
        if key not in self._anchors:
            self._anchors[key] = anchor_lib.anchors(key[:2], self.model_cfg).to(device)
        return self._anchors[key]

    def bases(self, device) -> list[torch.Tensor]:
        """Args: device. Returns: each level's base anchors [n, 4] float32 (anchors.level_bases) on `device`."""
        key = str(torch.device(device))
        if key not in self._bases:
            self._bases[key] = anchor_lib.level_bases(self.model_cfg, device)
        return self._bases[key]

    def level_counts(self, canvas_hw: tuple[int, int]) -> tuple[int, ...]:
        """Args: canvas_hw (H, W). Returns: anchors per pyramid level P3..P7 (they sum to A)."""
        return anchor_lib.level_counts(tuple(int(v) for v in canvas_hw), self.model_cfg)


class Targets(NamedTuple):
    """What the loss needs besides the head outputs and the anchors; every leaf is per image [B, ...], so
    a step can split it into micro-batches along dim 0."""

    anchor_valid: torch.Tensor  # bool [B, A]: inside the image's padded extent
    assignment: assign.Assignment  # [B, A] fields


@torch.no_grad()
def compute_targets(anchors: torch.Tensor, batch: dict, model_cfg) -> Targets:
    """Anchor validity and the MaxIoU assignment of a batch (no gradient).

    Args:
      anchors: float32 [A, 4] of the batch's canvas.
      batch: docs/conventions.md's batch; reads image [B, 3, H, W] (its shape), image_hw [B, 2], boxes
        [B, G, 4], box_valid [B, G] and, when present, ignore_boxes [B, Gi, 4] / ignore_valid [B, Gi].
      model_cfg: the model config (anchors, assigner).

    Returns:
      Targets(anchor_valid bool [B, A], assignment with [B, A] fields).
    """
    canvas = tuple(batch["image"].shape[-2:])
    anchor_valid = anchor_lib.valid_flags(canvas, batch["image_hw"], model_cfg)
    assignment = assign.assign(anchors, anchor_valid, batch["boxes"], batch["box_valid"], model_cfg.assigner,
                               batch.get("ignore_boxes"), batch.get("ignore_valid"))
    return Targets(anchor_valid, assignment)


def loss(params: dict, batch: dict, targets: Targets, *, anchors: torch.Tensor, normalizer: torch.Tensor,
         model_cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RetinaNet loss of a batch (focal + box loss), differentiable with respect to `params`.

    Args:
      params: the full parameter tree {'backbone', 'fpn', 'head'}.
      batch: reads image float or uint8 [B, 3, H, W] (uint8: normalised on the device,
        model.inputs.model_input), boxes float32 [B, G, 4], labels int64 [B, G], image_hw [B, 2].
      targets: `compute_targets` for this batch (or its slice of a micro-batch split).
      anchors: float32 [A, 4] of the batch's canvas.
      normalizer: float32 [], the divisor of the summed loss terms (see losses.retinanet_loss).
      model_cfg: the model config.

    Returns:
      (loss float32 [], metrics {'loss', 'loss_cls', 'loss_box', 'num_pos'}: 0-d tensors that add up over
      micro-batches sharing one normaliser).
    """
    cls_logits, box_deltas = retinanet.apply(params, inputs.model_input(batch, model_cfg), model_cfg,
                                             batch["image_hw"])
    return losses.retinanet_loss(cls_logits, box_deltas, anchors, targets.anchor_valid, targets.assignment,
                                 batch["boxes"], batch["labels"], model_cfg.loss, model_cfg.coder,
                                 normalizer=normalizer)


def head_outputs(params: dict, batch: dict, model_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The network half of `predict`: (cls_logits float [B, A, K], box_deltas float [B, A, 4]).

    Args:
      params: the full parameter tree.
      batch: reads image float or uint8 [B, 3, H, W] (uint8: normalised on the device,
        model.inputs.model_input) and image_hw int64 [B, 2].
      model_cfg: the model config.
    """
    return retinanet.apply(params, inputs.model_input(batch, model_cfg), model_cfg, batch["image_hw"])


def detections(cls_logits: torch.Tensor, box_deltas: torch.Tensor, batch: dict, anchors: torch.Tensor,
               level_counts: tuple[int, ...], model_cfg, bases: list[torch.Tensor] | None = None
               ) -> postprocess.Detections:
    """The post-processing half of `predict`, on the head outputs of a batch.

    Args:
      cls_logits: float [B, A, K]; box_deltas: float [B, A, 4] (`head_outputs`).
      batch: reads image (its canvas size), image_hw int64 [B, 2] and, when present, scale_factor float32
        [B, 2] (then boxes come back in original-image pixels).
      anchors: float32 [A, 4] and level_counts: anchors per level, of the batch's canvas.
      model_cfg: the model config (test, coder, canvas_exact).
      bases: each level's base anchors on the batch's device (AnchorCache.bases), for torchvision-style
        anchors; None: made from host data on each call.

    Returns:
      postprocess.Detections with [B, model.test.max_per_img] rows. With model.canvas_exact, those of
      each image padded alone to model.size_divisor: anchors outside its extent are never candidates, and
      torchvision-style anchors follow the image's own padded size.
    """
    anchor_valid = None
    if model_cfg.get("canvas_exact", False):
        canvas = tuple(batch["image"].shape[-2:])
        anchor_valid = anchor_lib.valid_flags(canvas, batch["image_hw"], model_cfg)
        if model_cfg.anchors.style == "torchvision":  # its P6 / P7 grid steps follow each image's size
            anchors = anchor_lib.image_anchors(canvas, batch["image_hw"], model_cfg, bases)
    return postprocess.detect(cls_logits, box_deltas, anchors, level_counts, batch["image_hw"],
                              batch.get("scale_factor"), model_cfg.test, model_cfg.coder, anchor_valid=anchor_valid)


def predict(params: dict, batch: dict, anchors: torch.Tensor, level_counts: tuple[int, ...], model_cfg
            ) -> postprocess.Detections:
    """Detections for a batch: `head_outputs`, then `detections` (no gradient needed).

    Args:
      params: the full parameter tree.
      batch: as for `head_outputs` and `detections`.
      anchors: float32 [A, 4] and level_counts: anchors per level, of the batch's canvas.
      model_cfg: the model config.

    Returns:
      postprocess.Detections with [B, model.test.max_per_img] rows (see `detections`).
    """
    cls_logits, box_deltas = head_outputs(params, batch, model_cfg)
    return detections(cls_logits, box_deltas, batch, anchors, level_counts, model_cfg)


class Detector:
    """RetinaNet bound to its config and anchor cache; satisfies retina_fn.train.step.Objective.

    Args:
      model_cfg: the model config.
      canvases: the (H, W) canvases whose anchors are computed up front (the data's aspect groups).
      device: where the anchors live.
    """

    def __init__(self, model_cfg, canvases: Sequence[tuple[int, int]] = (), device: torch.device | str = "cpu"):
        self.model_cfg = model_cfg
        self.anchors = AnchorCache(model_cfg).warm(canvases, device)

    def prepare(self, batch: dict) -> tuple[Targets, torch.Tensor]:
        """The per-step work outside the gradient.

        Args:
          batch: the whole step's batch [B, ...] (all micro-batches together).

        Returns:
          (targets, normalizer float32 []): the targets of every image and this replica's loss normaliser
          (losses.loss_normalizer), which the step may average over replicas.
        """
        canvas = tuple(batch["image"].shape[-2:])
        targets = compute_targets(self.anchors.get(canvas, batch["image"].device), batch, self.model_cfg)
        positive = targets.assignment.positive & targets.anchor_valid
        return targets, losses.loss_normalizer(positive, self.model_cfg.loss)

    def loss(self, params: dict, batch: dict, targets: Targets, normalizer: torch.Tensor):
        """The module's `loss` with this detector's config and the anchors of the batch's canvas."""
        canvas = tuple(batch["image"].shape[-2:])
        return loss(params, batch, targets, anchors=self.anchors.get(canvas, batch["image"].device),
                    normalizer=normalizer, model_cfg=self.model_cfg)

    def predict(self, params: dict, batch: dict) -> postprocess.Detections:
        """`predict` with the anchors of the batch's canvas (see the module function)."""
        return self.detections(*head_outputs(params, batch, self.model_cfg), batch)

    def detections(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, batch: dict) -> postprocess.Detections:
        """`detections` with the anchors of the batch's canvas (see the module function)."""
        canvas = tuple(batch["image"].shape[-2:])
        device = batch["image"].device
        return detections(cls_logits, box_deltas, batch, self.anchors.get(canvas, device),
                          self.anchors.level_counts(canvas), self.model_cfg, self.anchors.bases(device))
