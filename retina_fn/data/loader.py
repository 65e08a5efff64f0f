"""Train and eval loaders: CocoSet -> DetectionDataset -> GroupBatchSampler -> torch DataLoader -> batch
dicts, with running totals of what the pipeline gave up (boxes beyond max_boxes, replaced images). Position a
loader with `set_epoch(epoch, start_step)` before iterating. The data key is split once: one half orders the
epochs, the other keys the per-sample augmentation."""

from __future__ import annotations

import logging
import os
from typing import Iterable, Iterator

import torch

from retina_fn import errors, rng
from retina_fn.data.batching import Collate, pad_ground_truth
from retina_fn.data.coco import CocoSet
from retina_fn.data.dataset import DetectionDataset
from retina_fn.data.sampler import GroupBatchSampler
from retina_fn.data.transforms import TransformConfig

logger = logging.getLogger(__name__)

AUTO_WORKERS_CAP = 16  # data.workers='auto' never starts more loader processes per training process


class DetectionLoader:
    """An iterable of batch dicts for one rank, positioned by `set_epoch(epoch, start_step)`; len() counts
    the batches of the next iteration. `totals`: running sums of images (real slots), boxes_dropped and
    images_replaced over everything yielded."""

    def __init__(self, dataset: DetectionDataset, sampler: GroupBatchSampler, collate_fn: Collate, *,
                 workers: int, pin_memory: bool):
        self.dataset, self.sampler = dataset, sampler
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
        """The next iteration as tuples of accum_steps batches (one global batch, one canvas), their ground
        truth padded to the group's largest G."""
        group: list[dict[str, torch.Tensor]] = []
        for batch in self:
            group.append(batch)
            if len(group) == self.accum_steps:
                g = max(b["box_valid"].shape[1] for b in group)
                yield tuple(pad_ground_truth(b, g) for b in group)
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


def resolve_workers(setting, local_processes: int = 1, cpus: int | None = None) -> int:
    """The loader processes of one training process: data.workers `setting` when an int >= 0 (0: load in the
    training process), for 'auto' min(cpus // local_processes - 1, AUTO_WORKERS_CAP), at least 0 (one CPU per
    training process stays with the training loop); ConfigError for anything else. local_processes: training
    processes on this machine (LOCAL_WORLD_SIZE); cpus: CPUs this process may use (None: the affinity mask,
    else os.cpu_count())."""
    if setting == "auto":
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(cpus // max(1, int(local_processes)) - 1, AUTO_WORKERS_CAP))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise errors.ConfigError(f"data.workers must be an int >= 0 or 'auto', got {setting!r}")
    return setting


def make_train_loader(data_cfg, dataset: CocoSet, *, rank: int, world_size: int, key: torch.Tensor,
                      start_epoch: int = 0, start_step: int = 0, pin_memory: bool = False,
                      accum_steps: int = 1, local_processes: int = 1) -> DetectionLoader:
    """The training loader of one rank; every rank gets the same steps_per_epoch and canvas at each step.
    Args:
      data_cfg: the `data` block; dataset: the training CocoSet; key: int64 [2] data key.
      start_epoch, start_step: the first iteration's position, in optimiser steps.
      pin_memory: `pin_memory_for(device)`. accum_steps: loader batches per optimiser step (iterate with
        `updates()`). local_processes: for data.workers='auto' (`resolve_workers`)."""
    order_key, augment_key = rng.split(key)
    ds = DetectionDataset(dataset, TransformConfig.from_config(data_cfg), train=True, key=augment_key,
                          skip_bad_images=data_cfg.skip_bad_images, preload=data_cfg.preload)
    sampler = GroupBatchSampler(ds.groups, images_per_device=data_cfg.images_per_device, rank=rank,
                                world_size=world_size, train=True, key=order_key, epoch=start_epoch,
                                start_step=start_step, accum_steps=accum_steps)
    return DetectionLoader(ds, sampler, _collate(data_cfg), workers=resolve_workers(data_cfg.workers, local_processes),
                           pin_memory=pin_memory)


def make_eval_loader(data_cfg, dataset: CocoSet, *, rank: int, world_size: int,
                     pin_memory: bool = False, local_processes: int = 1) -> DetectionLoader:
    """The evaluation loader of one rank: no flip, every image once over all ranks, padding slots (image_id
    -1) filling each aspect group's last batch; pin_memory and local_processes as for `make_train_loader`."""
    ds = DetectionDataset(dataset, TransformConfig.from_config(data_cfg), train=False, preload=data_cfg.preload)
    sampler = GroupBatchSampler(ds.groups, images_per_device=data_cfg.eval_images_per_device, rank=rank,
                                world_size=world_size, train=False)
    return DetectionLoader(ds, sampler, _collate(data_cfg), workers=resolve_workers(data_cfg.workers, local_processes),
                           pin_memory=pin_memory)


def _collate(data_cfg) -> Collate:
    return Collate(data_cfg.max_boxes, data_cfg.max_ignore_boxes, tuple(data_cfg.box_buckets))


def pin_memory_for(device: torch.device) -> bool:
    """Whether batches bound for `device` ('cuda', 'npu') should be page-locked for asynchronous copies."""
    return device.type in ("cuda", "npu")


def to_device(batch, device: torch.device):
    """A batch dict (or a tuple of them) with its tensors on `device` (non-blocking copies)."""
    if isinstance(batch, tuple):
        return tuple(to_device(b, device) for b in batch)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def prefetch_to_device(batches: Iterable, device: torch.device) -> Iterator:
    """The items of `batches` (batch dicts or tuples of them, e.g. `DetectionLoader.updates()`) on `device`.

    On CUDA item n+1 is copied on a side stream before item n is handed out, overlapping item n's kernels;
    the compute stream waits for the copy when n+1 is handed out, and record_stream keeps the allocator
    from reusing its memory early. Elsewhere each item is moved by `to_device` when handed out."""
    device = torch.device(device)
    if device.type != "cuda":
        for item in batches:
            yield to_device(item, device)
        return
    copy_stream = torch.cuda.Stream(device)

    def issue(item):
        with torch.cuda.stream(copy_stream):
            return to_device(item, device)

    it, end = iter(batches), object()
    item = next(it, end)
    ahead = None if item is end else issue(item)
    while ahead is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        for d in ahead if isinstance(ahead, tuple) else (ahead,):
            for tensor in d.values():
                tensor.record_stream(compute)
        current = ahead
        item = next(it, end)
        ahead = None if item is end else issue(item)
        yield current
