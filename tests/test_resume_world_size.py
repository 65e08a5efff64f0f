"""Resuming on another number of processes, through torchrun: with the same global batch (images per
device x processes x optim.accum_steps) the run continues the same data order and schedule; with another
global batch it refuses and says what to pass."""

import pytest
import torch

from retina_fn import checkpoint, tree
from tests.dist_scripts import launch


def _args(workdir, data, *, accum: int, max_steps: int) -> list[str]:
    return ["--config", "configs/smoke.py", f"--workdir={workdir}", f"--config.data.root={data}",
            "--config.data.images_per_device=2", f"--config.optim.accum_steps={accum}",
            f"--config.train.max_steps={max_steps}", "--config.train.validate=False", "--config.optim.name=sgd",
            "--config.optim.lr=0.01", "--config.optim.warmup_iters=2", "--config.dist.timeout_s=60"]


def _train(workdir, data, *, nproc: int, accum: int, max_steps: int):
    done = launch.run("train_entry.py", _args(workdir, data, accum=accum, max_steps=max_steps), nproc=nproc,
                      limit_s=300)
    return done


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps of 4 images on one process (2 images x 2 accumulated loader batches), uninterrupted."""
    base = tmp_path_factory.mktemp("resize")
    done = _train(base / "straight", base / "data", nproc=1, accum=2, max_steps=6)
    assert done.returncode == 0, done.output[-3000:]
    return base, checkpoint.restore_latest(str(base / "straight" / "checkpoints"))


@pytest.mark.parametrize("first, then", [((1, 2), (2, 1)), ((2, 1), (1, 2))], ids=["1to2", "2to1"])
def test_resuming_on_another_world_size_continues_the_same_run(straight, first, then):
    base, reference = straight
    workdir = base / f"run_{first[0]}to{then[0]}"
    done = _train(workdir, base / "data", nproc=first[0], accum=first[1], max_steps=3)
    assert done.returncode == 0, done.output[-3000:]
    done = _train(workdir, base / "data", nproc=then[0], accum=then[1], max_steps=6)
    assert done.returncode == 0, done.output[-3000:]
    assert "resumed from" in done.output
    final = checkpoint.restore_latest(str(workdir / "checkpoints"))
    assert final.step == reference.step == 6
    assert final.meta["data_position"] == reference.meta["data_position"]
    assert final.meta["global_batch"] == 4 and final.meta["world_size"] == then[0]
    worst = 0.0
    ours, theirs = tree.flatten_by_path(final.state["params"]), tree.flatten_by_path(reference.state["params"])
    for path, value in theirs.items():
        worst = max(worst, float((ours[path] - value).abs().max()))
        # Same images, same schedule; only the order of float additions differs (all-reduce vs accumulation).
        torch.testing.assert_close(ours[path], value, rtol=1e-4, atol=1e-5, msg=path)
    lr_ours, lr_ref = final.state["step"], reference.state["step"]
    assert int(lr_ours) == int(lr_ref)
    print(f"{first} -> {then}: largest parameter difference from the straight run {worst:.2e}")


def test_resuming_with_another_global_batch_is_refused(straight):
    base, _ = straight
    workdir = base / "refused"
    done = _train(workdir, base / "data", nproc=1, accum=2, max_steps=2)
    assert done.returncode == 0, done.output[-3000:]
    done = _train(workdir, base / "data", nproc=2, accum=2, max_steps=4)  # 2 x 2 x 2 = 8 images per step
    assert done.returncode != 0
    assert "global batch of 4" in done.output and "--config.optim.accum_steps=1" in done.output
    assert checkpoint.restore_latest(str(workdir / "checkpoints")).step == 2  # nothing lost
