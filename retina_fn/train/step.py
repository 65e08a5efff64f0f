"""The pure train step and eval step.

    train_step = make_train_step(cfg, steps_per_epoch=..., global_batch=..., reduce=runtime.reduce_mean)
    state, metrics = train_step(state, batch, key)      # never mutates state or batch
    detections = make_eval_step(cfg)(params, batch)

One step: anchors for the batch's canvas (cached), assignment for the whole batch (no gradient), the
loss normaliser over the whole batch (averaged over replicas by `reduce` when dist.normalizer is
'global'), then for each of optim.accum_steps micro-batches the gradient of the loss with respect to the
trainable parameters only (torch.func.grad with aux, the transform torch_npu supports; frozen leaves are
passed as constants, so nothing is differentiated through the frozen stem), summed. Gradients are
averaged over replicas by
`reduce` (the distribution layer binds it; identity on one device), unscaled, checked, clipped and
applied. A step whose gradients are not finite is skipped with torch.where (no Python branch): the
parameters and optimiser state stay as they were, the loss scale is halved (fp16) and the 'nonfinite'
counter grows; the host loop decides when to stop.
"""

from __future__ import annotations

from typing import Callable

import torch

from retina_fn import anchors as anchor_lib
from retina_fn import assign, losses, postprocess, precision, tree
from retina_fn.model import retinanet
from retina_fn.optim import clip_by_global_norm, make_lr_schedule, make_optimizer

Reduce = Callable[[tree.Tree], tree.Tree]


def _identity(x):
    return x


class AnchorCache:
    """Anchors [A, 4] and per-level counts for each canvas (H, W), computed once per canvas and device.

    Call `warm` for the known canvases before compiling a step, so tracing finds them ready."""

    def __init__(self, model_cfg):
        self.model_cfg = model_cfg
        self._anchors: dict = {}

    def warm(self, canvases, device) -> "AnchorCache":
        for hw in canvases:
            self.get(tuple(hw), device)
        return self

    def get(self, canvas_hw: tuple[int, int], device) -> torch.Tensor:
        key = (int(canvas_hw[0]), int(canvas_hw[1]), str(torch.device(device)))
        if key not in self._anchors:
            self._anchors[key] = anchor_lib.anchors(key[:2], self.model_cfg).to(device)
        return self._anchors[key]

    def level_counts(self, canvas_hw: tuple[int, int]) -> tuple[int, ...]:
        return anchor_lib.level_counts(tuple(int(v) for v in canvas_hw), self.model_cfg)


def _canvases(cfg) -> list[tuple[int, int]]:
    return [tuple(cfg.data.landscape_canvas), tuple(cfg.data.portrait_canvas)]


def _split(batch: dict, parts: int) -> list[dict]:
    """Splits every [B, ...] entry of a batch into `parts` equal micro-batches."""
    size = batch["image"].shape[0]
    if size % parts:
        raise ValueError(f"batch of {size} images cannot be split into optim.accum_steps={parts} equal micro-batches")
    chunks = {k: torch.chunk(v, parts) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(parts)]


def make_train_step(cfg, *, steps_per_epoch: int, global_batch: int, reduce: Reduce = _identity,
                    device: torch.device | str = "cpu", overflow_check=None) -> Callable:
    """Builds `train_step(state, batch, key) -> (new_state, metrics)`.

    cfg: the whole config (model, optim, train, dist, data canvases). steps_per_epoch and global_batch
    (images per optimiser step over all replicas) fix the learning-rate schedule. reduce: a mean over
    replicas of a pytree (gradients, the loss normaliser when dist.normalizer == 'global', metrics).
    overflow_check: replaces the configured train.overflow_check (e.g. an NPU flag reader).

    batch: the dict of docs/conventions.md with B = images per replica per step (all accum_steps
    micro-batches together). key: per-step randomness; RetinaNet's step draws none (augmentation runs
    on the host), so it is accepted for the interface and unused.
    metrics: 0-d tensors 'loss', 'loss_cls', 'loss_box', 'num_pos', 'normalizer', 'lr', 'grad_norm',
    'loss_scale', 'finite' (1.0 when the update was applied), averaged over replicas.

    Compilation: train.compile compiles the whole step (one graph, no breaks on one process; the
    cross-replica `reduce` stays outside the graph). docs/benchmarks.md has its measured effect.
    """
    model_cfg = cfg.model
    optimizer = make_optimizer(cfg.optim)
    schedule = make_lr_schedule(cfg.optim, steps_per_epoch, global_batch)
    prec = precision.precision_from_config(cfg.train)
    check = precision.make_overflow_check(overflow_check or cfg.train.overflow_check)
    accum = int(cfg.optim.accum_steps)
    clip_norm = cfg.optim.clip_norm
    norm_reduce = reduce if cfg.dist.normalizer == "global" else _identity
    per_image = model_cfg.loss.normalizer == "image"
    cache = AnchorCache(model_cfg).warm(_canvases(cfg), device)
    device_type = torch.device(device).type
    @torch.no_grad()
    def targets(anchors, canvas, image_hw, boxes, box_valid, ignore_boxes, ignore_valid):
        """-> (anchor_valid [B, A], Assignment, sum over images of max(#positives, 1) before reduce)."""
        anchor_valid = anchor_lib.valid_flags(canvas, image_hw, model_cfg)
        assignment = assign.assign(anchors, anchor_valid, boxes, box_valid, model_cfg.assigner, ignore_boxes,
                                   ignore_valid)
        positives = assignment.positive.logical_and(anchor_valid).sum(1).clamp(min=1).sum().to(torch.float32)
        return anchor_valid, assignment, positives

    def loss_of_outputs(cls_logits, box_deltas, anchors, anchor_valid, assignment, boxes, labels, normalizer, scale):
        """The (scaled) loss of one micro-batch's head outputs, and its metrics."""
        loss, metrics = losses.retinanet_loss(
            cls_logits, box_deltas, anchors, anchor_valid, assignment, boxes, labels, model_cfg.loss,
            model_cfg.coder, reduce=lambda _: normalizer)
        if per_image:
            loss, metrics = loss / accum, {k: v / accum for k, v in metrics.items()}
        scaled = precision.scale_loss(loss, scale) if prec.loss_scaling else loss
        return scaled, metrics

    def objective(trainable, frozen, images, *loss_args):
        with precision.autocast(prec, device_type):
            cls_logits, box_deltas = retinanet.apply(tree.merge(trainable, frozen), images, model_cfg)
        return loss_of_outputs(cls_logits, box_deltas, *loss_args)

    def update(grads, state):
        """Unscale, check, clip and apply the replica-averaged gradients; a non-finite step keeps the old
        parameters and optimiser state. -> (params, opt_state, loss_scale, finite, grad_norm, lr)."""
        scale = state["loss_scale"]
        if prec.loss_scaling:
            grads = precision.unscale_grads(grads, scale)
        finite = check(grads, scale.scale if prec.loss_scaling else None)
        grads, grad_norm = clip_by_global_norm(grads, clip_norm)
        lr = schedule(state["step"])
        new_params, new_opt = optimizer.update(grads, state["opt"], state["params"], lr)
        params, opt_state = precision.select_tree(finite, (new_params, new_opt), (state["params"], state["opt"]))
        new_scale = precision.update_loss_scale(scale, finite, cfg.train.loss_scale) if prec.loss_scaling else scale
        return params, opt_state, new_scale, finite, grad_norm, lr

    grad_fn = torch.func.grad(objective, has_aux=True)  # with respect to the trainable leaves only

    def train_step(state: dict, batch: dict, key: torch.Tensor) -> tuple[dict, dict]:
        del key
        canvas = tuple(batch["image"].shape[-2:])
        anchors = cache.get(canvas, batch["image"].device)
        anchor_valid, assignment, positives = targets(anchors, canvas, batch["image_hw"], batch["boxes"],
                                                         batch["box_valid"], batch.get("ignore_boxes"),
                                                         batch.get("ignore_valid"))
        # mmdetection's normaliser, over the whole step's batch so micro-batches add up exactly
        normalizer = norm_reduce(positives)
        frozen, scale = state["frozen"], state["loss_scale"]

        micro = _split(batch, accum)
        valid_parts, assignment_parts = torch.chunk(anchor_valid, accum), [
            assign.Assignment(*parts) for parts in zip(*(torch.chunk(t, accum) for t in assignment))]
        grads, metrics = None, None
        for mb, mb_valid, mb_assignment in zip(micro, valid_parts, assignment_parts):
            g, m = grad_fn(state["params"], frozen, mb["image"], anchors, mb_valid, mb_assignment, mb["boxes"],
                           mb["labels"], normalizer, scale)
            grads = g if grads is None else tree.map(torch.add, grads, g)
            metrics = m if metrics is None else tree.map(torch.add, metrics, m)

        params, opt_state, new_scale, finite, grad_norm, lr = update(reduce(grads), state)
        metrics = {
            "loss": metrics["loss_cls"] + metrics["loss_box"],
            "loss_cls": metrics["loss_cls"],
            "loss_box": metrics["loss_box"],
            "num_pos": metrics["num_pos"] * (accum if per_image else 1),
            "normalizer": normalizer,
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": new_scale.scale if prec.loss_scaling else torch.ones_like(new_scale.scale),
            "finite": finite.to(torch.float32),
        }
        new_state = dict(
            state,
            params=params,
            opt=opt_state,
            step=state["step"] + 1,
            loss_scale=new_scale,
            nonfinite=torch.where(finite, torch.zeros_like(state["nonfinite"]), state["nonfinite"] + 1),
        )
        return new_state, reduce(metrics)

    if cfg.train.compile:
        return torch.compile(train_step)
    return train_step


def make_eval_step(cfg, device: torch.device | str = "cpu") -> Callable:
    """Builds `eval_step(params, batch) -> postprocess.Detections` (boxes in original-image pixels,
    [B, max_per_img]) from the full parameter tree and a batch (image, image_hw, scale_factor)."""
    model_cfg = cfg.model
    prec = precision.precision_from_config(cfg.train)
    cache = AnchorCache(model_cfg).warm(_canvases(cfg), device)
    device_type = torch.device(device).type

    @torch.no_grad()
    def eval_step(params: dict, batch: dict) -> postprocess.Detections:
        canvas = tuple(batch["image"].shape[-2:])
        with precision.autocast(prec, device_type):
            cls_logits, box_deltas = retinanet.apply(params, batch["image"], model_cfg)
        return postprocess.detect(cls_logits, box_deltas, cache.get(canvas, batch["image"].device),
                                  cache.level_counts(canvas), batch["image_hw"], batch.get("scale_factor"),
                                  model_cfg.test, model_cfg.coder)

    return eval_step
