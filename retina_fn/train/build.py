"""The RetinaNet train state, train step and eval step of a spec and the step's settings.

    optimizer = build_optimizer(settings)                 # once: state and step share it
    state = init_train_state(spec, settings, key, optimizer, device=device)
    train_step = make_train_step(spec, settings, optimizer, steps_per_epoch=..., global_batch=...)

Accelerator extras (apex's fused SGD, torch_npu's overflow flag) come in from retina_fn.accel here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch.torch_version import TorchVersion

from retina_fn import accel, precision, rng, tree
from retina_fn.detector import Detector
from retina_fn.model import retinanet
from retina_fn.optim import OptimSettings, Optimizer, make_lr_schedule, make_optimizer
from retina_fn.postprocess import Detections
from retina_fn.spec import DetectorSpec
from retina_fn.train import graph
from retina_fn.train import step as step_lib
from retina_fn.train.state import new_train_state

log = logging.getLogger(__name__)

COMPILE_SCOPES = ("auto",) + step_lib.COMPILE_SCOPES


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """How the train step runs (configs/common.py's optim and train blocks; retina_fn.schema builds them):
    overflow_check 'isfinite' | 'saturation' | 'npu'; micro_batches: equal parts of each loader batch (memory
    only); normalizer 'local' (each replica's own positives) | 'global' (their mean); compile_scope 'auto' |
    'step' | 'gradients'."""

    optim: OptimSettings
    precision: str
    loss_scale: precision.LossScaleSettings
    overflow_check: str
    clip_norm: float | None
    micro_batches: int
    normalizer: str
    compile: bool
    compile_scope: str
    cuda_graph: bool


def canvases(spec: DetectorSpec) -> list[tuple[int, int]]:
    """The data's fixed canvases (H, W): landscape, then portrait."""
    return [tuple(spec.input.landscape_canvas), tuple(spec.input.portrait_canvas)]


def build_optimizer(settings: StepSettings) -> Optimizer:
    """The optimiser of the settings (apex's fused SGD for optim.backend 'apex'). Build it once per run and hand
    the same object to `init_train_state` and `make_train_step` (an in-place optimiser keeps its buffers inside)."""
    fused = accel.apex_sgd if settings.optim.backend == "apex" else None
    return make_optimizer(settings.optim, fused_sgd=fused)


def overflow_check(kind: precision.OverflowCheck | str) -> precision.OverflowCheck:
    """The overflow check called `kind` ('isfinite' | 'saturation' | 'npu'), or `kind` itself if callable."""
    if kind == "npu":
        return accel.npu_flag_check()
    return precision.make_overflow_check(kind)


def init_train_state(spec: DetectorSpec, settings: StepSettings, key: rng.Key, optimizer: Optimizer,
                     params: dict | None = None, device: torch.device | str = "cpu") -> dict:
    """A fresh RetinaNet train state (retina_fn.train.state), float32 on `device`, split by the spec; key int64
    [2] is split into the model's init key and the run's key; `params` (a full tree) replaces the random init."""
    k_model, k_run = rng.split(key)
    if params is None:
        params = retinanet.init(k_model, spec)
    params = tree.cast(params, torch.float32, device)
    trainable, frozen = retinanet.split_trainable(params, spec)
    return new_train_state(trainable, frozen, optimizer, k_run, settings.loss_scale, device)


def resolve_compile_scope(scope: str, device_type: str, torch_version: str = torch.__version__) -> str:
    """train.compile_scope with 'auto' resolved: 'gradients' on CUDA with torch < 2.13 (inductor's loop
    reordering fails when the foreach update shares a graph with other reductions: pytorch#176591, fixed by
    pytorch#176849), else 'step'; ValueError for an unknown scope."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    if scope != "auto":
        return scope
    return "gradients" if device_type == "cuda" and TorchVersion(torch_version) < (2, 13) else "step"


def make_train_step(spec: DetectorSpec, settings: StepSettings, optimizer: Optimizer, *, steps_per_epoch: int,
                    global_batch: int, reduce: step_lib.Reduce | None = None, device: torch.device | str = "cpu",
                    overflow_check_override=None, graph_capture: graph.Capture | None = None) -> step_lib.TrainStep:
    """The RetinaNet train step: `train_step(state, batches) -> (new_state, metrics)` (retina_fn.train.step).

    steps_per_epoch and global_batch (images per optimiser step: images_per_device x world_size x accum_steps) fix
    the schedule and the scaled lr; reduce: the mean over replicas (None: one process); graph_capture: tests' stand-in
    for CUDA graphs. Metrics: 'loss', 'loss_cls', 'loss_box', 'num_pos', 'normalizer', 'lr', 'grad_norm',
    'loss_scale', 'finite'. With train.cuda_graph on CUDA, one process and a pure optimiser, a graph.GraphedFunction
    (its state and metrics are overwritten by the next call); elsewhere it logs why and runs eagerly.
    """
    device_type = torch.device(device).type
    compile_scope = resolve_compile_scope(settings.compile_scope, device_type)
    if settings.compile:
        log.info("train.compile: compiling the %s (train.compile_scope=%r, torch %s on %s)",
                 "whole step" if compile_scope == "step" else "gradient part of the step (the update runs eagerly)",
                 settings.compile_scope, torch.__version__, device_type)
    train_step = step_lib.make_train_step(
        Detector(spec, canvases(spec), device), optimizer,
        make_lr_schedule(settings.optim, steps_per_epoch, global_batch),
        precision=precision.precision_from_name(settings.precision), loss_scale=settings.loss_scale,
        overflow_check=overflow_check(overflow_check_override or settings.overflow_check),
        micro_batches=settings.micro_batches, clip_norm=settings.clip_norm, reduce=reduce,
        reduce_normalizer=settings.normalizer == "global", device_type=device_type,
        compile_fn=torch.compile if settings.compile else None, compile_scope=compile_scope)
    if not settings.cuda_graph:
        return train_step
    if optimizer.inplace:
        log.warning("train.cuda_graph: the train step runs without CUDA graphs: optim.backend='apex' updates in "
                    "place, reads the learning rate on the host and decides skipped steps there (the native "
                    "optimisers select on the device and can be captured)")
        return train_step
    if reduce is not None:
        log.warning("train.cuda_graph: the train step runs without CUDA graphs with more than one process (its "
                    "all-reduce is not captured); the eval forward still is")
        return train_step
    return graph.graph_or_eager(train_step, device, what="the train step", updates_state=True,
                                lift_constants=not settings.compile, capture=graph_capture)


def make_eval_step(spec: DetectorSpec, device: torch.device | str = "cpu", *, precision_name: str = "fp32",
                   cuda_graph: bool = False, graph_capture: graph.Capture | None = None
                   ) -> Callable[[dict, dict], Detections]:
    """`eval_step(params, batch) -> Detections` [B, spec.test.max_per_img] from the full parameter tree and a
    batch with image [B, 3, H, W], image_hw [B, 2] and scale_factor [B, 2] (boxes then in original-image pixels).
    With cuda_graph the network's forward is a CUDA graph per canvas and post-processing (NMS reads the host) runs
    eagerly on its outputs."""
    prec = precision.precision_from_name(precision_name)
    detector = Detector(spec, canvases(spec), device)
    device_type = torch.device(device).type

    @torch.no_grad()
    def eval_step(params: dict, batch: dict) -> Detections:
        with precision.autocast(prec, device_type):
            return detector.predict(params, batch)

    if not cuda_graph:
        return eval_step

    @torch.no_grad()
    def forward(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The network half of detector.predict: (cls_logits [B, A, K], box_deltas [B, A, 4])."""
        with precision.autocast(prec, device_type):
            return detector.head_outputs(params, batch)

    graphed = graph.graph_or_eager(forward, device, what="the eval forward", updates_state=False,
                                   capture=graph_capture)
    if graphed is forward:
        return eval_step

    @torch.no_grad()
    def graphed_eval_step(params: dict, batch: dict) -> Detections:
        return detector.detections(*graphed(params, batch), batch)

    return graphed_eval_step
