"""The train step under the distribution layer: data parallelism must equal one big batch."""

import torch

from tests.dist_scripts import launch


def test_two_processes_of_batch_2_equal_one_process_of_batch_4(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for nproc, out in ((1, one), (2, two)):
        done = launch.run("step_worker.py", [str(out), "3"], nproc=nproc, limit_s=240)
        assert done.returncode == 0, done.output[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-5)
    worst = 0.0
    for path, value in a["params"].items():
        diff = float((value - b["params"][path]).abs().max())
        worst = max(worst, diff)
        assert torch.allclose(value, b["params"][path], rtol=1e-5, atol=1e-5), (path, diff)
    print(f"largest parameter difference after 3 steps: {worst:.2e}")


def test_two_nodes_over_loopback_train_and_checkpoint_together(tmp_path):
    from retina_fn import checkpoint

    workdir = tmp_path / "run"
    args = ["--config", "configs/smoke.py", f"--workdir={workdir}", f"--config.data.root={tmp_path / 'data'}",
            "--config.train.max_steps=4", "--config.train.validate=False", "--config.data.images_per_device=4",
            "--config.dist.timeout_s=60"]
    nodes = launch.run_nodes("train_entry.py", args, nnodes=2, nproc=1, limit_s=300)
    for node in nodes:
        assert node.returncode == 0, node.output[-3000:]
    restored = checkpoint.restore_latest(str(workdir / "checkpoints"))
    assert restored.step == 4 and restored.meta["world_size"] == 2
    # 64 training images, 4 per device on 2 nodes: 8 steps per epoch; the run stopped after 4 of them
    assert restored.meta["data_position"] == {"epoch": 0, "step_in_epoch": 4}
