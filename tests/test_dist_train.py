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


def test_elastic_restart_resumes_from_the_newest_checkpoint(tmp_path):
    import subprocess
    import sys
    import time

    from retina_fn import checkpoint

    workdir = tmp_path / "run"
    env = dict(launch.worker_env(), CRASH_AFTER_CHECKPOINT_STEP="4")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
               "--master_addr=127.0.0.1", f"--master_port={launch.free_port()}", "--monitor_interval=0.2",
               f"{launch.SCRIPTS}/crash_once_entry.py", "--config", "configs/smoke.py", f"--workdir={workdir}",
               f"--config.data.root={tmp_path / 'data'}", "--config.train.max_steps=6", "--config.train.validate=False",
               "--config.train.checkpoint_every_steps=2", "--config.data.images_per_device=4",
               "--config.dist.timeout_s=60"]
    process = subprocess.Popen(command, cwd=launch.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    done = launch.wait(process, time.monotonic(), 300)
    assert done.returncode == 0, done.output[-3000:]
    assert "resumed from" in done.output and "ckpt_000000004.pt" in done.output
    final = checkpoint.restore_latest(str(workdir / "checkpoints"))
    assert final.step == 6 and final.meta["world_size"] == 2
