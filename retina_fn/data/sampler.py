"""Which samples form each batch on each rank: aspect-ratio groups, a per-epoch order that is a pure function
of (key, epoch), and equal steps on every rank; `set_epoch(epoch, start_step)` resumes exactly. A step takes
a *global batch* of images_per_device * world_size * accum_steps samples from one aspect group, so all ranks
share the step's canvas. Loader batch j of a step on a rank takes the slice of virtual rank
v = j * world_size + rank, [v * ipd, (v + 1) * ipd), so 8 ranks x 2 images and 1 rank x 2 images x 8
accumulated batches see the same 16 images and a run can resume on another world size.

Training (mmdetection's group sampler, rank-synchronous): each group is permuted and padded to a multiple of
the global batch by wrapping its permutation (wrapped entries are flagged `padding` but trained on, as in
mmdetection); all groups' global batches are then shuffled. Evaluation: groups in dataset order, the last
global batch filled with `padding` slots that become blank samples (image_id -1)."""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from retina_fn import errors, rng


class SampleRef(NamedTuple):
    """What a batch sampler hands the dataset: index, epoch (selects the augmentation key), and padding
    (train: a wrapped repeat; eval: an empty slot)."""
    index: int
    epoch: int
    padding: bool = False


class EpochPlan(NamedTuple):
    """indices int64 [S, global_batch] and padding bool [S, global_batch] for one epoch of S steps."""
    indices: np.ndarray
    padding: np.ndarray


def _group_ids(groups: np.ndarray) -> list[np.ndarray]:
    """Dataset indices of each non-empty group, groups in ascending id order."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0:
        raise ValueError(f"groups must be a non-empty 1-d array, got shape {groups.shape}")
    return [np.flatnonzero(groups == g) for g in np.unique(groups)]


def train_plan(groups: np.ndarray, global_batch: int, key: torch.Tensor, epoch: int) -> EpochPlan:
    """The training order of one epoch; groups: int [N], the aspect group of each dataset index. Each row is
    one global batch of one group; each index appears once with padding False, wrapped repeats True."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    gen = rng.numpy_generator(rng.fold_in(key, epoch))
    rows, pads = [], []
    for members in _group_ids(groups):
        order = members[gen.permutation(members.size)]
        total = -(-members.size // global_batch) * global_batch
        rows.append(np.resize(order, total).reshape(-1, global_batch))  # np.resize repeats cyclically
        pads.append((np.arange(total) >= members.size).reshape(-1, global_batch))
    rows, pads = np.concatenate(rows), np.concatenate(pads)
    shuffle = gen.permutation(rows.shape[0])
    return EpochPlan(rows[shuffle].astype(np.int64), pads[shuffle])


def eval_plan(groups: np.ndarray, global_batch: int) -> EpochPlan:
    """The evaluation order: each group's indices ascending, its last global batch filled with padding slots
    (index: the group's first member, so the slot knows its canvas)."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    rows, pads = [], []
    for members in _group_ids(groups):
        total = -(-members.size // global_batch) * global_batch
        filled = np.full(total, members[0], dtype=np.int64)
        filled[: members.size] = members
        rows.append(filled.reshape(-1, global_batch))
        pads.append((np.arange(total) >= members.size).reshape(-1, global_batch))
    return EpochPlan(np.concatenate(rows), np.concatenate(pads))


class GroupBatchSampler(torch.utils.data.Sampler):
    """Yields, for one rank, lists of `images_per_device` SampleRefs, `accum_steps` lists per step, from
    `train_plan` with the order `key` (train) or `eval_plan`; len() counts the next iteration's lists."""

    def __init__(self, groups: np.ndarray, *, images_per_device: int, rank: int, world_size: int, train: bool,
                 key: torch.Tensor | None = None, epoch: int = 0, start_step: int = 0, accum_steps: int = 1):
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if images_per_device <= 0:
            raise ValueError(f"images_per_device must be positive, got {images_per_device}")
        if train and key is None:
            raise ValueError("a training sampler needs a key")
        if accum_steps < 1:
            raise errors.ConfigError(f"optim.accum_steps must be >= 1, got {accum_steps}")
        self.groups, self.images_per_device, self.accum_steps = np.asarray(groups), images_per_device, accum_steps
        self.rank, self.world_size, self.train, self.key = rank, world_size, train, key
        self.global_batch = images_per_device * world_size * accum_steps
        self._eval_plan = None if train else eval_plan(self.groups, self.global_batch)
        self.steps_per_epoch = self.plan(0).indices.shape[0]  # the same every epoch
        self.set_epoch(epoch, start_step)

    def plan(self, epoch: int) -> EpochPlan:
        """The whole (all ranks) plan of an epoch."""
        if self.train:
            return train_plan(self.groups, self.global_batch, self.key, epoch)
        return self._eval_plan

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Position the next iteration at (epoch, start_step)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch} (steps per epoch)")
        self.epoch, self.start_step = epoch, start_step

    def rank_plan(self, epoch: int) -> EpochPlan:
        """This rank's columns of the epoch plan: [S, accum_steps, images_per_device]."""
        p = self.plan(epoch)
        ipd = self.images_per_device
        cols = np.stack([(j * self.world_size + self.rank) * ipd + np.arange(ipd) for j in range(self.accum_steps)])
        return EpochPlan(p.indices[:, cols], p.padding[:, cols])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[SampleRef]]:
        epoch = self.epoch
        mine = self.rank_plan(epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            for j in range(self.accum_steps):
                yield [SampleRef(int(i), epoch, bool(p)) for i, p in zip(mine.indices[step, j],
                                                                         mine.padding[step, j])]
