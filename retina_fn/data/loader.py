"""Train and eval loaders: CocoSet -> DetectionDataset -> GroupBatchSampler -> torch DataLoader -> batch
dicts, plus running totals of what the pipeline had to give up (boxes beyond max_boxes, replaced images).

    loader = make_train_loader(cfg.data, train_set, rank=r, world_size=n, key=data_key,
                               start_epoch=e0, start_step=s0)
    for epoch in range(e0, epochs):
        loader.set_epoch(epoch, s0 if epoch == e0 else 0)
        for batch in loader: ...

The data key is split once: one half orders the epochs, the other keys the per-sample augmentation.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from retina_fn import rng
from retina_fn.data.batching import Collate
from retina_fn.data.coco import CocoSet
from retina_fn.data.dataset import DetectionDataset
from retina_fn.data.sampler import GroupBatchSampler
from retina_fn.data.transforms import TransformConfig

logger = logging.getLogger(__name__)


class DetectionLoader:
    """An iterable of batch dicts for one rank, positioned by `set_epoch(epoch, start_step)`.

    len() is the number of batches the next iteration yields; `steps_per_epoch` is the full count.
    `totals` holds running sums over everything yielded: images (real slots), boxes_dropped,
    images_replaced."""

    def __init__(self, dataset: DetectionDataset, sampler: GroupBatchSampler, collate_fn: Collate, *,
                 workers: int, pin_memory: bool):
        self.dataset = dataset
        self.sampler = sampler
        self.totals = dict(images=0, boxes_dropped=0, images_replaced=0)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers,
            pin_memory=pin_memory, persistent_workers=workers > 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields steps start_step.. of `epoch`."""
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def accum_steps(self) -> int:
        return self.sampler.accum_steps

    def updates(self) -> Iterator[tuple[dict[str, torch.Tensor], ...]]:
        """The next iteration grouped by optimiser step: tuples of accum_steps consecutive batches (all from
        one global batch of the plan, so on one canvas)."""
        group: list[dict[str, torch.Tensor]] = []
        for batch in self:
            group.append(batch)
            if len(group) == self.accum_steps:
                yield tuple(group)
                group = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        before = dict(self.totals)
        for batch in self._loader:
            self.totals["images"] += int((batch["image_id"] >= 0).sum())
            self.totals["boxes_dropped"] += int(batch["boxes_dropped"].sum())
            self.totals["images_replaced"] += int(batch["replaced"].sum())
            yield batch
        dropped = self.totals["boxes_dropped"] - before["boxes_dropped"]
        replaced = self.totals["images_replaced"] - before["images_replaced"]
        if dropped or replaced:
            logger.warning("epoch %d (rank %d): %d ground-truth boxes beyond data.max_boxes dropped, %d "
                           "unreadable images replaced", self.epoch, self.sampler.rank, dropped, replaced)


def make_train_loader(data_cfg, dataset: CocoSet, *, rank: int, world_size: int, key: torch.Tensor,
                      start_epoch: int = 0, start_step: int = 0, pin_memory: bool = False,
                      accum_steps: int = 1) -> DetectionLoader:
    """The training loader of one rank.

    data_cfg: the config's `data` block; dataset: the training CocoSet; key: int64[2] data key;
    (start_epoch, start_step): the position of the first iteration, in optimiser steps. pin_memory: set
    when batches go to an accelerator. accum_steps: loader batches per optimiser step (optim.accum_steps;
    iterate with `updates()`). Every rank gets the same steps_per_epoch and, at each step, the same canvas."""
    order_key, augment_key = rng.split(key)
    ds = DetectionDataset(dataset, TransformConfig.from_config(data_cfg), train=True, key=augment_key,
                          skip_bad_images=data_cfg.skip_bad_images, preload=data_cfg.preload)
    sampler = GroupBatchSampler(ds.groups, images_per_device=data_cfg.images_per_device, rank=rank,
                                world_size=world_size, train=True, key=order_key, epoch=start_epoch,
                                start_step=start_step, accum_steps=accum_steps)
    return DetectionLoader(ds, sampler, Collate(data_cfg.max_boxes, data_cfg.max_ignore_boxes),
                           workers=data_cfg.workers, pin_memory=pin_memory)


def make_eval_loader(data_cfg, dataset: CocoSet, *, rank: int, world_size: int,
                     pin_memory: bool = False) -> DetectionLoader:
    """The evaluation loader of one rank: no flip, every image exactly once over all ranks, padding slots
    (image_id -1) filling the last batch of each aspect group; batches of data.eval_images_per_device."""
    ds = DetectionDataset(dataset, TransformConfig.from_config(data_cfg), train=False, preload=data_cfg.preload)
    sampler = GroupBatchSampler(ds.groups, images_per_device=data_cfg.eval_images_per_device, rank=rank,
                                world_size=world_size, train=False)
    return DetectionLoader(ds, sampler, Collate(data_cfg.max_boxes, data_cfg.max_ignore_boxes),
                           workers=data_cfg.workers, pin_memory=pin_memory)


def to_device(batch, device: torch.device):
    """A loader batch (or a tuple of them) moved to `device` (asynchronously from pinned memory).

    Args:
      batch: {name: tensor} as the loaders yield it (docs/conventions.md), or a tuple of such dicts.
      device: the target device.

    Returns:
      The same structure, tensors on `device`.
    """
    if isinstance(batch, tuple):
        return tuple(to_device(b, device) for b in batch)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
