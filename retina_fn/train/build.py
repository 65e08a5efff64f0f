"""The RetinaNet train state, train step and eval step that a config names.

    optimizer = build_optimizer(cfg)                     # once: state and step share it
    state = init_train_state(cfg, key, optimizer, device=device)
    train_step = make_train_step(cfg, optimizer, steps_per_epoch=..., global_batch=..., reduce=runtime.reduce_mean)
    eval_step = make_eval_step(cfg, device=device)       # eval_step(params, batch) -> Detections

This is where the config meets the generic engine (retina_fn.train.step) and the detector
(retina_fn.detector), and where accelerator extras (apex's fused SGD, torch_npu's overflow flag) are taken
from retina_fn.accel and passed in.
"""

from __future__ import annotations

from typing import Callable

import torch

from retina_fn import accel, precision, rng, tree
from retina_fn.detector import Detector
from retina_fn.model import retinanet
from retina_fn.optim import Optimizer, make_lr_schedule, make_optimizer
from retina_fn.postprocess import Detections
from retina_fn.train import step as step_lib
from retina_fn.train.state import new_train_state


def canvases(cfg) -> list[tuple[int, int]]:
    """The data's fixed canvases (H, W): landscape, then portrait."""
    return [tuple(cfg.data.landscape_canvas), tuple(cfg.data.portrait_canvas)]


def build_optimizer(cfg) -> Optimizer:
    """The optimiser of cfg.optim, with apex's fused SGD when optim.backend == 'apex'. Build it once per run
    and hand the same object to `init_train_state` and `make_train_step` (an in-place optimiser keeps its
    buffers inside)."""
    fused = accel.apex_sgd if cfg.optim.backend == "apex" else None
    return make_optimizer(cfg.optim, fused_sgd=fused)


def overflow_check(cfg, override: precision.OverflowCheck | str | None = None) -> precision.OverflowCheck:
    """The overflow check of train.overflow_check ('isfinite' | 'saturation' | 'npu'), or `override`."""
    kind = override or cfg.train.overflow_check
    if kind == "npu":
        return accel.npu_flag_check()
    return precision.make_overflow_check(kind)


def init_train_state(cfg, key: rng.Key, optimizer: Optimizer, params: dict | None = None,
                     device: torch.device | str = "cpu") -> dict:
    """A fresh RetinaNet train state (see retina_fn.train.state).

    Args:
      cfg: the whole config (model, train.loss_scale).
      key: int64 [2]; split into the model's init key and the run's key.
      optimizer: from `build_optimizer(cfg)`, the same object the step gets.
      params: a full parameter tree (e.g. with a pretrained backbone) replacing the random init.
      device: where everything lives.

    Returns:
      The state dict, parameters float32 on `device`, split into trainable and frozen by the model config.
    """
    k_model, k_run = rng.split(key)
    if params is None:
        params = retinanet.init(k_model, cfg.model)
    params = tree.cast(params, torch.float32, device)
    trainable, frozen = retinanet.split_trainable(params, cfg.model)
    return new_train_state(trainable, frozen, optimizer, k_run, cfg.train.loss_scale, device)


def make_train_step(cfg, optimizer: Optimizer, *, steps_per_epoch: int, global_batch: int,
                    reduce: step_lib.Reduce = step_lib.identity, device: torch.device | str = "cpu",
                    overflow_check_override=None) -> step_lib.TrainStep:
    """The RetinaNet train step of a config: `train_step(state, batch, key) -> (new_state, metrics)`.

    Args:
      cfg: the whole config (model, optim, train, dist, data canvases).
      optimizer: the one `init_train_state` used.
      steps_per_epoch: optimiser steps per epoch; global_batch: images per optimiser step over all replicas
        and accumulated loader batches (images_per_device x world_size x optim.accum_steps); together they
        fix the schedule and the linearly scaled lr.
      reduce: a mean over replicas of a tree (gradients, metrics and, for dist.normalizer 'global', the
        loss normaliser); the distribution layer binds it.
      device: where the anchors live and which autocast applies.
      overflow_check_override: replaces train.overflow_check (a callable or a name).

    Returns:
      The step of retina_fn.train.step over retina_fn.detector.Detector, called with one batch or a tuple
      of optim.accum_steps loader batches; metrics 'loss', 'loss_cls',
      'loss_box', 'num_pos', 'normalizer', 'lr', 'grad_norm', 'loss_scale', 'finite'. With train.compile the
      whole step is compiled (one graph on one process; the cross-replica `reduce` stays outside).
    """
    prec = precision.precision_from_config(cfg.train)
    train_step = step_lib.make_train_step(
        Detector(cfg.model, canvases(cfg), device),
        optimizer,
        make_lr_schedule(cfg.optim, steps_per_epoch, global_batch),
        precision=prec,
        loss_scale_cfg=cfg.train.loss_scale,
        overflow_check=overflow_check(cfg, overflow_check_override),
        micro_batches=int(cfg.optim.micro_batches),
        clip_norm=cfg.optim.clip_norm,
        reduce=reduce,
        reduce_normalizer=cfg.dist.normalizer == "global",
        device_type=torch.device(device).type,
    )
    return torch.compile(train_step) if cfg.train.compile else train_step


def make_eval_step(cfg, device: torch.device | str = "cpu") -> Callable[[dict, dict], Detections]:
    """`eval_step(params, batch) -> Detections` ([B, model.test.max_per_img], boxes in original-image
    pixels when the batch has scale_factor) at the configured precision, from the full parameter tree and a
    batch with image [B, 3, H, W], image_hw [B, 2] and scale_factor [B, 2]."""
    prec = precision.precision_from_config(cfg.train)
    detector = Detector(cfg.model, canvases(cfg), device)
    device_type = torch.device(device).type

    @torch.no_grad()
    def eval_step(params: dict, batch: dict) -> Detections:
        with precision.autocast(prec, device_type):
            return detector.predict(params, batch)

    return eval_step
