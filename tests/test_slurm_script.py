"""scripts/slurm_multinode.sbatch under stand-ins for SLURM: `scontrol show hostnames` names the loopback address
and `srun` starts the per-node command once per node of the job (in the background, each with its SLURM_NODEID and
SLURM_PROCID), so two "nodes" of one process each train the smoke config together over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import time

from retina_fn import checkpoint
from tests.dist_scripts import launch
from tests.test_scripts import script_env

ROOT = launch.ROOT
SCRIPT = os.path.join(ROOT, "scripts", "slurm_multinode.sbatch")

# srun: its options are recorded and skipped; the command runs on every "node" at once, and srun fails when
# any of them fails (as --kill-on-bad-exit=1 makes the real one do).
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$SLURM_FAKE_RECORD/srun_args"
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "$SLURM_FAKE_RECORD/node$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""
# scontrol show hostnames LIST: one host per node of the job, all of them this machine.
FAKE_SCONTROL = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$SLURM_FAKE_RECORD/scontrol_args"
if [[ "$1 $2" == "show hostnames" ]]; then printf '127.0.0.1\\n127.0.0.1\\n'; exit 0; fi
echo "fake scontrol: unsupported: $*" >&2
exit 1
"""


def fake_slurm(tmp_path, nodes: int) -> dict:
    """The environment of a batch script in a `nodes`-node job, with srun and scontrol stand-ins first on PATH."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = script_env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_FAKE_RECORD=str(record), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST=f"node[1-{nodes}]", SLURM_NNODES=str(nodes), SLURM_SUBMIT_DIR=ROOT,
               NPROC_PER_NODE="1", MASTER_PORT=str(launch.free_port()))
    return env


def test_two_nodes_of_one_process_train_together(tmp_path):
    env = fake_slurm(tmp_path, nodes=2)
    workdir = tmp_path / "run"
    args = ["--config", "configs/smoke.py", "--workdir", str(workdir), f"--config.data.root={tmp_path / 'data'}",
            "--config.data.images_per_device=4", "--config.train.max_steps=2", "--config.train.validate=False",
            "--config.dist.timeout_s=60"]
    started = time.monotonic()
    job = subprocess.Popen(["bash", SCRIPT, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)  # cwd: SLURM_SUBMIT_DIR decides
    done = launch.wait(job, started, limit_s=300)
    record = tmp_path / "record"
    logs = {n: (record / f"node{n}.log").read_text() for n in (0, 1) if (record / f"node{n}.log").exists()}
    assert done.returncode == 0, done.output[-2000:] + "".join(f"\n--- node {n}\n{t[-3000:]}" for n, t in logs.items())
    assert "2 nodes x 1 processes, rendezvous at 127.0.0.1:" + env["MASTER_PORT"] in done.output
    assert (record / "scontrol_args").read_text().split() == ["show", "hostnames", "node[1-2]"]
    srun_args = (record / "srun_args").read_text().splitlines()
    assert "--ntasks-per-node=1" in srun_args and "--nodes=2" in srun_args
    # both ranks joined one world of 2 and trained to the end: rank 0's checkpoint and results say so
    restored = checkpoint.restore_latest(str(workdir / "checkpoints"))
    assert restored.step == 2 and restored.meta["world_size"] == 2
    results = json.loads((workdir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 2
    assert "world_size=2" in logs[0]  # rank 0's start line names the world (node 1 logs warnings only)


def test_outside_a_job_it_says_how_to_start_it(tmp_path):
    env = script_env()
    env.pop("SLURM_JOB_NODELIST", None)
    done = subprocess.run(["bash", SCRIPT, "--config", "configs/smoke.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0 and "SLURM_JOB_NODELIST: not set: submit this script with sbatch" in done.stderr


# A stand-in for `python` on the nodes: the torchrun launch is recorded per node (NUL-separated arguments, and
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE as it saw it) instead of training.
FAKE_NODE_PYTHON = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$SLURM_FAKE_RECORD/launch$SLURM_NODEID"
printf '%s' "${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-unset}" > "$SLURM_FAKE_RECORD/store$SLURM_NODEID"
"""


def test_min_nodes_makes_the_job_elastic(tmp_path):
    """MIN_NODES=1 in a 2-node job: each node runs torchrun --nnodes=1:2 with the c10d rendezvous hosted by node 0,
    3 restarts, a rendezvous store per round, and the accumulation derived from the nodes present; srun keeps the
    job running when a node fails (--no-kill) and does not stop the others when one exits (no --kill-on-bad-exit)."""
    env = fake_slurm(tmp_path, nodes=2)
    (tmp_path / "bin" / "python").write_text(FAKE_NODE_PYTHON)
    (tmp_path / "bin" / "python").chmod(0o755)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    env["MIN_NODES"] = "1"
    done = subprocess.run(["bash", SCRIPT, "--config", "configs/smoke.py", "--workdir", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "elastic, 1 to 2 nodes, 3 restarts" in done.stdout
    record = tmp_path / "record"
    srun_args = (record / "srun_args").read_text().splitlines()
    assert "--no-kill" in srun_args and not any(a.startswith("--kill-on-bad-exit") for a in srun_args)
    for node in (0, 1):
        launched = (record / f"launch{node}").read_text().split("\0")[:-1]
        assert launched[:2] == ["-m", "torch.distributed.run"]
        assert launched[2:10] == ["--nnodes=1:2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                                  f"--rdzv_endpoint=127.0.0.1:{env['MASTER_PORT']}", "--rdzv_id=retina_fn_4242",
                                  f"--rdzv_conf=is_host={int(node == 0)}", "--max-restarts=3", "-m"]
        assert launched[10:] == ["experiments.coco_retinanet", "--config", "configs/smoke.py", "--workdir",
                                 str(tmp_path / "run"), "--config.optim.accum_steps=auto"]
        assert (record / f"store{node}").read_text() == "1"
