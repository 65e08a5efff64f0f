"""What a run needs before its first step: the dataset on disk, the starting state. (The class count is
resolved in experiments.class_count.)"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from experiments import global_batch, segments
from retina_fn import checkpoint, rng, tree
from retina_fn.data import synthetic
from retina_fn.model import retinanet
from retina_fn.optim import Optimizer
from retina_fn.train import init_train_state

log = logging.getLogger(__name__)

DATASETS = ("coco", "synthetic")


def prepare_data(cfg, runtime) -> None:
    """Makes sure the configured dataset is on disk.

    data.dataset 'coco': nothing to do (the loaders report missing files). 'synthetic': generates the
    shapes dataset under data.root on rank 0 when it is absent or incomplete (the other ranks wait); the
    config's data.train_ann / train_images / val_ann / val_images must name the generator's layout
    (configs/demo.py sets them), so a run reads exactly the files its config names.

    Raises:
      ValueError: an unknown data.dataset, or synthetic paths that are not the generator's layout.
    """
    if cfg.data.dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {DATASETS}, got {cfg.data.dataset!r}")
    if cfg.data.dataset == "coco":
        return
    wrong = {k: cfg.data[k] for k, v in synthetic.LAYOUT.items() if cfg.data[k] != v}
    if wrong:
        fix = " ".join(f"--config.data.{k}={v}" for k, v in synthetic.LAYOUT.items())
        raise ValueError(f"data.dataset='synthetic' writes {dict(synthetic.LAYOUT)} under data.root, but the config "
                         f"names {wrong}; pass {fix}")
    s = cfg.data.synthetic
    if runtime.is_main:
        paths = synthetic.ensure_synthetic(cfg.data.root, s.num_train, s.num_val, s.seed, s.image_size, s.num_classes)
        log.info("synthetic dataset at %s\n%s", cfg.data.root, synthetic.format_summary(paths.summary))
    runtime.barrier()


def initial_params(cfg, key: rng.Key) -> dict:
    """Random init (model.init from `key`), with the backbone from model.backbone.pretrained (a torchvision
    ResNet file) when set. Returns the full parameter tree."""
    params = retinanet.init(key, cfg.model)
    if cfg.model.backbone.pretrained:
        from retina_fn import interop

        state_dict = interop.load_state_dict(cfg.model.backbone.pretrained)
        params["backbone"] = interop.resnet_from_torchvision(state_dict, cfg.model.backbone,
                                                             source=cfg.model.backbone.pretrained)
        log.info("backbone initialised from %s", cfg.model.backbone.pretrained)
    return params


class StartingPoint(NamedTuple):
    """state: the train state on the device; epoch, step_in_epoch: where the data resumes; batch: the
    experiments.global_batch.BatchPlan of this start; segments: the run's earlier segments (experiments.segments),
    [] for a first start."""

    state: dict
    epoch: int
    step_in_epoch: int
    batch: global_batch.BatchPlan
    segments: list


def restore_or_init(cfg, workdir: str, key: rng.Key, optimizer: Optimizer, device: torch.device,
                    world_size: int = 1) -> StartingPoint:
    """The newest usable checkpoint of workdir/checkpoints restored into a fresh state's structure, or the
    fresh state itself (from `initial_params`) when there is none, with the global batch and accumulation of
    `world_size` processes (`global_batch.plan`: the checkpoint's global batch is kept).

    Raises:
      global_batch.GlobalBatchError: the processes present cannot make the run's global batch; raised before
        anything is built or written.
    """
    restored = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"))
    meta = (restored.meta or {}) if restored is not None else None
    batch = global_batch.plan(cfg, world_size, meta, restored.path if restored is not None else None)
    params = None if restored else initial_params(cfg, key)
    template = init_train_state(cfg, key, optimizer, params=params, device=device)
    if restored is None:
        return StartingPoint(template, 0, 0, batch, [])
    state = tree.cast(checkpoint.restore_into(restored.state, template, restored.path), device=device)
    position = restored.meta["data_position"]
    epoch, step_in_epoch = int(position["epoch"]), int(position["step_in_epoch"])
    log.info("resumed from %s at step %d (epoch %d, step %d of it), written by %d process(es); global batch %d = %d "
             "per device x %d process(es) x %d accumulated", restored.path, restored.step, epoch + 1, step_in_epoch,
             meta.get("world_size", 1), batch.global_batch, batch.images_per_device, batch.world_size,
             batch.accum_steps)
    return StartingPoint(state, epoch, step_in_epoch, batch, segments.earlier_segments(meta))
