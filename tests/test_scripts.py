"""The seed-equivalent shell scripts: arguments mapped onto torchrun and overrides, the seed's closing lines.

They run the smoke config here (the COCO configs need COCO and an accelerator to be worth running)."""

import json
import os
import subprocess
import sys
import time

from retina_fn import checkpoint
from tests.dist_scripts import launch

ROOT = launch.ROOT


def script_env() -> dict:
    env = launch.worker_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the scripts call `python`
    return env


def run_script(name: str, *args: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", name), *args], cwd=ROOT, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout)


def smoke_args(tmp_path, *extra: str) -> list[str]:
    return ["--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}", f"--data_path={tmp_path / 'data'}",
            "--batch_size=4", f"--master_port={launch.free_port()}", *extra]


def test_performance_1p_prints_the_seeds_lines(tmp_path):
    done = run_script("train_performance_1p.sh", *smoke_args(tmp_path, "--config.train.performance_steps=3"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    perf = [line for line in lines if line.startswith("Final Performance images/sec : ")]
    assert len(perf) == 1 and float(perf[0].rsplit(":", 1)[1]) > 0
    assert "Final Train Accuracy : (not evaluated)" in lines
    assert any(line.startswith("E2E Training Duration sec : ") for line in lines)
    # --batch_size became images per device; --performance: 3 steps, then the epoch counts as done
    restored = checkpoint.restore_latest(str(tmp_path / "run" / "checkpoints"))
    assert restored.step == 3 and restored.meta["data_position"] == {"epoch": 1, "step_in_epoch": 0}
    assert os.path.exists(tmp_path / "run" / "RetinaNet_ID0427_for_PyTorch_1p_perf.log")
    resolved = json.load(open(tmp_path / "run" / "config.json"))
    assert resolved["data"]["images_per_device"] == 4 and resolved["data"]["root"] == str(tmp_path / "data")
    assert resolved["train"]["validate"] is False and resolved["optim"]["epochs"] == 1


def test_unknown_precision_mode_is_refused_before_launching(tmp_path):
    done = run_script("train_full_1p.sh", *smoke_args(tmp_path, "--precision_mode=O3"), timeout=60)
    assert done.returncode == 2
    assert "unknown --precision_mode=O3" in done.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_multinodes_script_on_two_loopback_nodes(tmp_path):
    env = script_env()
    env["NPROC_PER_NODE"] = "1"
    args = smoke_args(tmp_path, "--nnodes=2", "--master_addr=127.0.0.1", "--config.train.max_steps=2",
                      "--config.dist.timeout_s=60")  # one port for both nodes
    started = time.monotonic()
    nodes = [subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "train_performance_multinodes.sh"), *args,
                               f"--node_rank={rank}", "--local_addr=127.0.0.1"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for rank in (0, 1)]
    finished = [launch.wait(node, started, limit_s=300) for node in nodes]
    for node in finished:
        assert node.returncode == 0, node.output[-3000:]
    assert "Final Performance images/sec" in finished[0].output
    assert "Final Performance images/sec" not in finished[1].output  # only node 0 reports
    restored = checkpoint.restore_latest(str(tmp_path / "run" / "checkpoints"))
    assert restored.step == 2 and restored.meta["world_size"] == 2
