"""The seed-equivalent shell scripts: arguments mapped onto torchrun and overrides, the seed's closing lines.

They run the smoke config here (the COCO configs need COCO and an accelerator to be worth running)."""

import json
import os
import subprocess
import sys
import time

import pytest

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


# ---- --precision_mode ------------------------------------------------------------------------------------
# The default config of the scripts (retinanet_r50_fpn_1x_coco_npu) sets train.opt_level='O1', so fp32, fp16
# and bf16 have to clear it. Expected: (precision trained at, train.opt_level in the resolved config).
PRECISION_MODES = {
    "O0": ("fp32", "O0"), "O1": ("fp16", "O1"), "O2": ("fp16", "O2"),
    "fp32": ("fp32", ""), "fp16": ("fp16", ""), "bf16": ("bf16", ""),
}  # fmt: skip
PRECISION_SCRIPTS = {  # script -> torchrun --nproc_per_node (NPROC_PER_NODE unset)
    "train_full_1p.sh": 1, "train_full_8p.sh": 8, "train_performance_1p.sh": 1, "train_performance_8p.sh": 8,
    "train_performance_multinodes.sh": 8,
}  # fmt: skip
# A stand-in for `python` on the scripts' PATH: the torchrun launch is recorded (NUL-separated arguments) and
# answered with a results.json instead of training; every other call (the closing lines) is the real python.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1 $2" == "-m experiments.launch" ]]; then
  printf '%s\\0' "$@" > "$LAUNCH_RECORD"
  printf '%s' "${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-unset}" > "$LAUNCH_RECORD.store"
  prev=""
  for arg in "$@"; do if [[ "$prev" == --workdir ]]; then workdir="$arg"; fi; prev="$arg"; done
  echo '{"train_images_per_s": 1.0, "wall_s": 12.4}' > "$workdir/results.json"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def resolve_entry_config(entry_args: list[str]):
    """The config experiments.coco_retinanet would train with, given its arguments (flags parsed the same way:
    a locked config file plus --config.* overrides), without starting it."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["coco_retinanet", *entry_args]
    values = flags.FlagValues()  # the override flags are found in argv when the config flag is defined
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(argv)
    return values.config


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml-collections loading the config
@pytest.mark.parametrize("mode", [*PRECISION_MODES, None])
@pytest.mark.parametrize("script", list(PRECISION_SCRIPTS))
def test_every_script_maps_the_precision_mode_onto_the_config(tmp_path, monkeypatch, script, mode):
    """Every script hands --precision_mode to torchrun the same way (they all go through common.sh's run_case),
    checked cheaply: the launch is recorded by a stand-in python instead of training, and its arguments are
    resolved against the scripts' default config (which sets opt_level O1) as the entry point resolves them.
    That the resolved configs train at those precisions is test_precision_mode_trains_at_that_precision's part,
    one real run per mode through train_full_1p.sh."""
    from retina_fn.schema import precision_name

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text(FAKE_PYTHON)
    (fake_bin / "python").chmod(0o755)
    env = script_env()
    env.pop("NPROC_PER_NODE", None)
    env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", REAL_PYTHON=sys.executable,
               LAUNCH_RECORD=str(tmp_path / "launch"))
    args = [f"--workdir={tmp_path / 'run'}"] + ([f"--precision_mode={mode}"] if mode else [])
    done = run_script(script, *args, env=env, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Final Performance images/sec : 1.00" in done.stdout
    assert "E2E Training Duration sec : 12" in done.stdout  # the run's own figure (all its segments)
    launch_args = (tmp_path / "launch").read_text().split("\0")[:-1]
    assert f"--nproc_per_node={PRECISION_SCRIPTS[script]}" in launch_args
    entry = launch_args.index("experiments.coco_retinanet")
    assert launch_args[entry - 1] == "-m"
    monkeypatch.chdir(ROOT)  # the scripts run from the repository root; the config path is relative to it
    cfg = resolve_entry_config(launch_args[entry + 1:])
    assert cfg.name == "retinanet_r50_fpn_1x_coco_npu"
    precision, opt_level = PRECISION_MODES[mode] if mode else ("fp16", "O1")  # no mode: the config's O1
    assert precision_name(cfg.train) == precision
    assert cfg.train.opt_level == opt_level


def recorded_launch(tmp_path, script: str, *args: str, nproc: str | None = None):
    """Runs `script` with the stand-in python; returns (the script's result, torchrun's options, the entry point's
    config, TORCH_DISABLE_SHARE_RDZV_TCP_STORE as the launch saw it)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(parents=True)
    (fake_bin / "python").write_text(FAKE_PYTHON)
    (fake_bin / "python").chmod(0o755)
    env = script_env()
    env.pop("NPROC_PER_NODE", None)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if nproc:
        env["NPROC_PER_NODE"] = nproc
    env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", REAL_PYTHON=sys.executable,
               LAUNCH_RECORD=str(tmp_path / "launch"))
    done = run_script(script, f"--workdir={tmp_path / 'run'}", *args, env=env, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    launch_args = (tmp_path / "launch").read_text().split("\0")[:-1]
    entry = launch_args.index("experiments.coco_retinanet")
    return done, launch_args[2:entry - 1], launch_args[entry + 1:], (tmp_path / "launch.store").read_text()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_an_elastic_range_launches_the_c10d_rendezvous_and_keeps_the_global_batch(tmp_path, monkeypatch):
    """--nnodes=1:2 on 8 devices per node: c10d rendezvous at --master_addr:--master_port hosted by node 0, 3
    restarts by default, the store of each round its own; the global batch is 8 images (the config's images per
    device) x 8 x 2 nodes = 128, the accumulation derived at each start."""
    done, options, entry_args, store = recorded_launch(
        tmp_path, "train_performance_multinodes.sh", "--nnodes=1:2", "--node_rank=0", "--master_addr=10.0.0.1")
    assert options == ["--nnodes=1:2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:23333",
                       "--rdzv_id=RetinaNet_ID0427_for_PyTorch_multinodes_perf", "--rdzv_conf=is_host=1",
                       "--max-restarts=3"]
    assert store == "1"
    monkeypatch.chdir(ROOT)
    cfg = resolve_entry_config(entry_args)
    assert (cfg.optim.accum_steps, cfg.optim.global_batch) == ("auto", 128)
    assert "Final Performance images/sec : 1.00" in done.stdout and not done.stderr.strip()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_an_elastic_range_names_the_node_counts_that_cannot_make_the_global_batch(tmp_path, monkeypatch):
    """--nnodes=2:3 x 1 process x 4 images: a global batch of 12, which 2 nodes (8 images per round) cannot make;
    --max_restarts and --global_batch override the defaults, a second node hosts no store and prints nothing."""
    done, options, entry_args, _ = recorded_launch(
        tmp_path, "train_performance_multinodes.sh", "--nnodes=2:3", "--node_rank=1", "--batch_size=4",
        "--max_restarts=5", nproc="1")
    assert "--rdzv_conf=is_host=0" in options and "--max-restarts=5" in options
    assert ("note: 2 node(s) x 1 x 4 images cannot make the global batch of 12; the run refuses to start with that "
            "membership") in done.stderr
    assert "3 node(s)" not in done.stderr and "Final Performance" not in done.stdout
    monkeypatch.chdir(ROOT)
    assert resolve_entry_config(entry_args).optim.global_batch == 12
    _, _, entry_args, _ = recorded_launch(tmp_path / "given", "train_full_8p.sh", "--nnodes=1:2",
                                          "--global_batch=64")
    assert resolve_entry_config(entry_args).optim.global_batch == 64


def test_a_fixed_node_count_keeps_the_static_rendezvous(tmp_path):
    _, options, _, store = recorded_launch(tmp_path, "train_full_1p.sh", "--max_restarts=2")
    assert options == ["--nnodes=1", "--node_rank=0", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                       "--master_port=29688", "--max-restarts=2"]
    assert store == "unset"


@pytest.fixture(scope="module")
def o1_smoke(tmp_path_factory):
    """(config file, data root) shared by the real runs: the smoke config with train.opt_level='O1' set, as the
    scripts' default config sets it, and one synthetic data set generated by the first run."""
    folder = tmp_path_factory.mktemp("o1_smoke")
    config = folder / "smoke_o1.py"
    config.write_text("from configs import smoke\n\n\ndef get_config():\n    config = smoke.get_config()\n"
                      "    config.train.opt_level = 'O1'\n    return config\n")
    return config, folder / "data"


@pytest.mark.parametrize("mode", list(PRECISION_MODES))
def test_precision_mode_trains_at_that_precision(tmp_path, o1_smoke, mode):
    """One real training step per --precision_mode through train_full_1p.sh (the other scripts build the same
    launch, see test_every_script_maps_the_precision_mode_onto_the_config): it trains, and results.json, the
    resolved config.json name the precision asked for. fp16 runs autocast on the CPU here."""
    config, data = o1_smoke
    workdir = tmp_path / "run"
    done = run_script("train_full_1p.sh", f"--config={config}", f"--workdir={workdir}", f"--data_path={data}",
                      "--batch_size=2", f"--master_port={launch.free_port()}", f"--precision_mode={mode}",
                      "--config.train.max_steps=1", "--config.train.validate=False", timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    precision, opt_level = PRECISION_MODES[mode]
    results = json.load(open(workdir / "results.json"))
    assert results["precision"] == precision and results["steps"] == 1
    resolved = json.load(open(workdir / "config.json"))["train"]
    # an opt level decides alone (train.precision stays at its default); otherwise the precision is the mode
    assert (resolved["opt_level"], resolved["precision"]) == (opt_level, "fp32" if opt_level else mode)
    assert checkpoint.restore_latest(str(workdir / "checkpoints")).step == 1
