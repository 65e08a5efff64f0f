import collections

import numpy as np
import pytest

from retina_fn import rng
from retina_fn.data.sampler import GroupBatchSampler, SampleRef, eval_plan, train_plan

KEY = rng.key(5)
# 23 images: 14 landscape (group 1), 9 portrait (group 0), interleaved
GROUPS = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0])


def _all_ranks(world_size, ipd, train, epoch=0):
    steps = []
    for rank in range(world_size):
        s = GroupBatchSampler(GROUPS, images_per_device=ipd, rank=rank, world_size=world_size, train=train,
                              key=KEY if train else None, epoch=epoch)
        steps.append(list(s))
    return steps


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("train", [True, False])
def test_shards_cover_dataset_and_agree_on_group(world_size, train):
    ipd = 2
    per_rank = _all_ranks(world_size, ipd, train)
    num_steps = {len(steps) for steps in per_rank}
    assert len(num_steps) == 1  # every rank steps equally often
    real = collections.Counter()
    for steps in per_rank:
        for batch in steps:
            assert len(batch) == ipd
            for ref in batch:
                assert isinstance(ref, SampleRef) and ref.epoch == 0
                if not ref.padding:
                    real[ref.index] += 1
    assert real == collections.Counter(range(len(GROUPS)))  # each image exactly once, off padding
    for step in range(num_steps.pop()):
        groups = {GROUPS[ref.index] for steps in per_rank for ref in steps[step]}
        assert len(groups) == 1  # one canvas per step across all ranks
    # the padding is the least needed: per group, round up to the global batch
    total = sum(len(b) for steps in per_rank for b in steps)
    gb = ipd * world_size
    assert total == sum(-(-int((GROUPS == g).sum()) // gb) * gb for g in (0, 1))


def test_train_padding_wraps_within_the_group():
    plan = train_plan(GROUPS, 8, KEY, epoch=0)
    for row, pad in zip(plan.indices, plan.padding):
        group = GROUPS[row[0]]
        assert (GROUPS[row] == group).all()
        real = set(row[~pad].tolist())
        assert set(row[pad].tolist()) <= set(np.flatnonzero(GROUPS == group).tolist())
        assert len(real) == (~pad).sum()


def test_order_is_pure_function_of_key_and_epoch():
    a, b = train_plan(GROUPS, 4, KEY, 3), train_plan(GROUPS, 4, KEY, 3)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.padding, b.padding)
    assert not np.array_equal(a.indices, train_plan(GROUPS, 4, KEY, 4).indices)
    assert not np.array_equal(a.indices, train_plan(GROUPS, 4, rng.key(6), 3).indices)
    firsts = {tuple(train_plan(GROUPS, 4, KEY, e).indices[0]) for e in range(6)}
    assert len(firsts) > 1  # batches are shuffled across groups and epochs


def test_eval_order_and_padding_slots():
    plan = eval_plan(GROUPS, 4)
    portrait = np.flatnonzero(GROUPS == 0)
    landscape = np.flatnonzero(GROUPS == 1)
    flat = plan.indices.reshape(-1)[~plan.padding.reshape(-1)]
    assert flat.tolist() == portrait.tolist() + landscape.tolist()
    assert plan.padding.sum() == (4 - 9 % 4) + (4 - 14 % 4)
    assert (plan.indices[plan.padding][:3] == portrait[0]).all()


def test_resume_at_epoch_and_step():
    full = GroupBatchSampler(GROUPS, images_per_device=2, rank=1, world_size=2, train=True, key=KEY, epoch=2)
    steps = list(full)
    resumed = GroupBatchSampler(GROUPS, images_per_device=2, rank=1, world_size=2, train=True, key=KEY,
                                epoch=2, start_step=3)
    assert len(resumed) == len(steps) - 3
    assert list(resumed) == steps[3:]
    resumed.set_epoch(2)
    assert list(resumed) == steps
    resumed.set_epoch(3)
    assert all(ref.epoch == 3 for batch in resumed for ref in batch)
    with pytest.raises(ValueError, match="start_step 99 outside"):
        resumed.set_epoch(0, 99)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        GroupBatchSampler(GROUPS, images_per_device=2, rank=2, world_size=2, train=False)
    with pytest.raises(ValueError, match="key"):
        GroupBatchSampler(GROUPS, images_per_device=2, rank=0, world_size=1, train=True)
    with pytest.raises(ValueError, match="non-empty"):
        eval_plan(np.array([]), 2)


@pytest.mark.parametrize("world_size, accum", [(1, 4), (2, 2)])
def test_accumulated_batches_see_what_more_devices_see(world_size, accum):
    """4 ranks x 2 images and (1 rank x 4 accumulated, 2 ranks x 2 accumulated) batches of 2 take the same 8
    images at every step, in the same slots ("virtual rank" j * world_size + rank), and resume alike."""
    wide = _all_ranks(4, 2, True, epoch=1)  # [rank][step] -> list of 2 refs
    samplers = [GroupBatchSampler(GROUPS, images_per_device=2, rank=r, world_size=world_size, train=True, key=KEY,
                                  epoch=1, accum_steps=accum) for r in range(world_size)]
    lists = [list(s) for s in samplers]  # [rank][step * accum + j]
    assert samplers[0].steps_per_epoch == len(wide[0]) and len(samplers[0]) == len(wide[0]) * accum
    for step in range(len(wide[0])):
        for rank in range(world_size):
            for j in range(accum):
                assert lists[rank][step * accum + j] == wide[j * world_size + rank][step]
    resumed = GroupBatchSampler(GROUPS, images_per_device=2, rank=0, world_size=world_size, train=True, key=KEY,
                                epoch=1, start_step=2, accum_steps=accum)
    assert list(resumed) == lists[0][2 * accum:]
    with pytest.raises(ValueError, match="accum_steps"):
        GroupBatchSampler(GROUPS, images_per_device=2, rank=0, world_size=1, train=True, key=KEY, accum_steps=0)
