"""Our model as benchmark subjects: the pure train step, the eval step, and inference split into forward and
post-processing."""

from __future__ import annotations

import contextlib
import statistics
from typing import Callable

import torch

from experiments.benchmark.measurement import Subject, count_flops, time_call
from experiments.benchmark.variants import with_patch
from retina_fn import rng
from retina_fn import precision as precision_lib
from retina_fn.detector import Detector
from retina_fn.train import build_optimizer, full_params, init_train_state, make_eval_step, make_train_step

STEPS_PER_EPOCH = 1000  # fixes the lr schedule only; the benchmark never reaches an epoch boundary


def ours_train(cfg, batch: dict, device: torch.device, seed: int = 0, name: str = "ours",
               patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Subject:
    """The pure train step (compiled as train.compile says), stepping one state forward on every call.

    Args:
      cfg: the whole config.
      batch: the static batch every call trains on.
      device: where the state and the step live.
      seed: of the initial state and of each step's key.
      name: the subject's name.
      patch: a context active while the step is built and called (a variant's code path).

    Returns:
      The Subject; its FLOP count runs one eager step (forward + backward + update).
    """
    batch_size = batch["image"].shape[0]
    optimizer = build_optimizer(cfg)
    with patch():
        state = {"s": init_train_state(cfg, rng.key(seed), optimizer, device=device)}
        step = make_train_step(cfg, optimizer, steps_per_epoch=STEPS_PER_EPOCH, global_batch=batch_size,
                               device=device)

    def call():
        state["s"], metrics = step(state["s"], batch)
        return metrics

    def flops():
        eager_cfg = cfg.copy_and_resolve_references()  # the FLOP counter's dispatch mode cannot enter compiled code
        eager_cfg.train.compile = eager_cfg.train.cuda_graph = False  # nor a graph
        eager = make_train_step(eager_cfg, optimizer, steps_per_epoch=STEPS_PER_EPOCH, global_batch=batch_size,
                                device=device)
        return count_flops(lambda: eager(state["s"], batch))

    return Subject(name, with_patch(patch, call), with_patch(patch, flops))


def _fresh_params(cfg, device: torch.device, dense_scores: bool, seed: int) -> dict:
    """A freshly initialised full parameter tree; with dense_scores the classification bias is zero, so every
    (anchor, class) pair passes the score threshold (instead of none at the prior-probability bias)."""
    params = full_params(init_train_state(cfg, rng.key(seed), build_optimizer(cfg), device=device))
    if not dense_scores:
        return params
    head = dict(params["head"])
    head["cls_logits"] = dict(head["cls_logits"], bias=torch.zeros_like(head["cls_logits"]["bias"]))
    return dict(params, head=head)


def ours_infer(cfg, batch: dict, device: torch.device, dense_scores: bool, seed: int = 0, name: str = "ours",
               patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Subject:
    """The eval step (forward + post-processing) on a fresh model; torch.compile'd when train.compile, its
    forward a CUDA graph when train.cuda_graph (not both: a compiled caller cannot trace the graph's runner).

    Args:
      cfg: the whole config.
      batch: the static batch every call predicts.
      device: where the model lives.
      dense_scores: zero the classification bias (post-processing at full load).
      seed: of the initial parameters.
      name: the subject's name.
      patch: a context active while the step is built and called.

    Returns:
      The Subject; its FLOP count runs the eager eval step.

    Raises:
      ValueError: train.compile and train.cuda_graph together.
    """
    if cfg.train.compile and cfg.train.cuda_graph:
        raise ValueError("infer: train.compile and train.cuda_graph together are not supported (the eval step "
                         "would compile the graph's runner); choose one")
    params = _fresh_params(cfg, device, dense_scores, seed)
    eager_cfg = cfg.copy_and_resolve_references()  # the FLOP counter's dispatch mode cannot enter a graph
    eager_cfg.train.cuda_graph = False
    with patch():
        eval_step = make_eval_step(cfg, device=device)
        eager_step = make_eval_step(eager_cfg, device=device) if cfg.train.cuda_graph else eval_step
    timed = torch.compile(eval_step) if cfg.train.compile else eval_step
    return Subject(name, with_patch(patch, lambda: timed(params, batch)),
                   with_patch(patch, lambda: count_flops(lambda: eager_step(params, batch))))


def ours_detect_share(cfg, batch: dict, device: torch.device, dense_scores: bool, iters: int, seed: int = 0) -> dict:
    """How inference time divides between the forward and post-processing (both eager).

    Args:
      cfg: the whole config.
      batch: the batch to predict.
      device: where the model lives.
      dense_scores: as in `ours_infer`.
      iters: timed calls of each half (at least 1).
      seed: of the initial parameters.

    Returns:
      {'forward_s', 'detect_s': median seconds of the forward alone and of post-processing alone on its
      outputs, 'detect_share': detect_s / (detect_s + forward_s)}.
    """
    params = _fresh_params(cfg, device, dense_scores, seed)
    detector = Detector(cfg.model, [tuple(batch["image"].shape[-2:])], device)
    prec = precision_lib.precision_from_config(cfg.train)

    @torch.no_grad()
    def forward():
        with precision_lib.autocast(prec, device.type):
            return detector.head_outputs(params, batch)

    logits, deltas = forward()

    @torch.no_grad()
    def detect():
        return detector.detections(logits, deltas, batch)

    detect()
    out = {key: statistics.median(time_call(fn, device) for _ in range(max(iters, 1)))
           for key, fn in (("forward_s", forward), ("detect_s", detect))}
    out["detect_share"] = out["detect_s"] / (out["detect_s"] + out["forward_s"])
    return out
