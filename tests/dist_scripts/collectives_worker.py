"""Exercises the Runtime's collectives under torchrun and saves what each rank saw to <out>/rank<r>.pt.

--scenario full: launch facts, reduce_sum / reduce_mean of sample_tree(rank) with a count of the
all_reduce calls (default and 4096-byte buckets), input purity, broadcast_tree, verify_same (equal, then
rank 1 perturbs a leaf), a structure mismatch, a bad dtype, gather_objects, all_gather_object, broadcast_object,
timed checkpoints on clocks that differ between ranks, barrier.
--scenario reduce: launch facts and the two reductions only (the multi-node test).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as torch_dist

from retina_fn import parallel, tree
from retina_fn.parallel import collectives
from tests.dist_scripts.common import make_dist_cfg
from tests.dist_scripts.sample_trees import float_part, sample_tree

SMALL_BUCKET_BYTES = 4096


class CallCounter:
    """Wraps torch.distributed.all_reduce (what retina_fn.parallel.collectives calls) and counts the calls."""

    def __init__(self):
        self.calls = 0
        self._original = torch_dist.all_reduce

    def __enter__(self):
        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        torch_dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        torch_dist.all_reduce = self._original


def storages(t) -> set[int]:
    return {leaf.untyped_storage().data_ptr() for leaf in tree.leaves(t)}


def launch_facts(runtime) -> dict:
    facts = dict(
        env=runtime.env._asdict(),
        backend=runtime.backend,
        device=str(runtime.device),
        is_main=runtime.is_main,
        group_ranks=torch_dist.get_process_group_ranks(runtime.group),
    )
    return facts


def reductions(runtime, out: dict) -> None:
    mine = sample_tree(runtime.rank)
    untouched = tree.map(torch.clone, mine)
    with CallCounter() as counter:
        out["sum"] = runtime.reduce_sum(mine)
    out["sum_calls"] = counter.calls
    with CallCounter() as counter:
        out["mean"] = runtime.reduce_mean(float_part(mine))
    out["mean_calls"] = counter.calls
    with CallCounter() as counter:
        collectives.all_reduce_tree(mine, "sum", group=runtime.group, bucket_bytes=SMALL_BUCKET_BYTES)
    out["small_bucket_sum_calls"] = counter.calls
    out["input_unchanged"] = tree.all_equal(mine, untouched)
    out["shares_storage"] = bool(storages(mine) & (storages(out["sum"]) | storages(out["mean"])))
    out["num_leaves"] = len(tree.leaves(mine))


def expect_error(out: dict, name: str, fn) -> None:
    try:
        fn()
        out[name] = None
    except Exception as error:  # noqa: BLE001 - the test inspects type and message
        out[name] = (type(error).__name__, str(error))


def full(runtime, out: dict) -> None:
    reductions(runtime, out)
    mine = sample_tree(runtime.rank)

    shared = runtime.broadcast_tree(mine, src=0)
    out["broadcast"] = shared
    out["checksum"] = runtime.tree_checksum(shared)
    expect_error(out, "verify_equal_error", lambda: runtime.verify_same(shared))

    perturbed = tree.map(torch.clone, shared)
    if runtime.rank == 1:
        perturbed["backbone"]["layer07"]["weight"].view(-1)[5] += 1.0
    expect_error(out, "verify_perturbed_error", lambda: runtime.verify_same(perturbed))

    if runtime.rank == 1:
        mine = dict(mine, extra={"surplus": torch.zeros(3)})
    expect_error(out, "broadcast_mismatch_error", lambda: runtime.broadcast_tree(mine))
    expect_error(out, "mean_of_ints_error", lambda: runtime.reduce_mean(sample_tree(runtime.rank)))

    item = {"rank": runtime.rank, "image_ids": list(range(runtime.rank * 3, runtime.rank * 3 + 3))}
    out["gathered"] = runtime.gather_objects(item)
    out["all_gathered"] = runtime.all_gather_object(item)
    out["broadcast_object"] = runtime.broadcast_object(item)
    timed_saves(runtime, out)
    runtime.barrier()
    # Still in step after all of the above: a final reduction agrees.
    out["final_sum"] = runtime.reduce_sum({"one": torch.ones(2)})


def timed_saves(runtime, out: dict) -> None:
    """retina_fn.engine.hooks.TimedDecisions (a checkpoint every 100 s of training) over 250 steps, each rank on
    its own clock: rank 0's steps take 1 s, rank 1's 2.5 s. Records the steps each rank saved at."""
    from retina_fn.engine.hooks import TimedDecisions

    step_s = 1.0 if runtime.rank == 0 else 2.5
    timer = TimedDecisions(100.0, None, runtime, step=0, train_s=0.0)
    out["timed_saves"] = []
    for step in range(1, 251):
        if timer.due(step, step * step_s).save:
            out["timed_saves"].append(step)
            timer.saved(step * step_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=("full", "reduce"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    with parallel.init(make_dist_cfg(args.timeout)) as runtime:
        out = launch_facts(runtime)
        if args.scenario == "full":
            full(runtime, out)
        else:
            reductions(runtime, out)
        torch.save(out, os.path.join(args.out, f"rank{runtime.rank}.pt"))
        runtime.barrier()


if __name__ == "__main__":
    main()
