"""Starting torchrun (`python -m torch.distributed.run`) from tests, with free ports and bounded waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "RANK_ID", "RANK_SIZE", "DEVICE_ID")


class Finished(NamedTuple):
    returncode: int
    output: str
    seconds: float


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env() -> dict:
    """This process's environment without launch variables, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


def start(script: str, args: list[str], *, port: int, nproc: int, nnodes: int = 1, node_rank: int = 0):
    """Popen of one torchrun launcher for tests/dist_scripts/<script> in a new process group (so the launcher
    and its workers can be stopped together); stdout and stderr merged."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={port}", "--monitor_interval=0.2",
        os.path.join(SCRIPTS, script), *args,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait(process: subprocess.Popen, started: float, limit_s: float) -> Finished:
    """Waits up to `limit_s` seconds after `started` (time.monotonic()) for `process`; on overrun kills its
    whole process group (returncode -9) and returns the output so far."""
    try:
        output, _ = process.communicate(timeout=max(0.1, started + limit_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n[test harness: killed after {limit_s} s]"
    return Finished(process.returncode, output, time.monotonic() - started)


def run(script: str, args: list[str], *, nproc: int, limit_s: float) -> Finished:
    """One single-node torchrun launch of `nproc` workers, waited on for at most `limit_s` seconds."""
    started = time.monotonic()
    return wait(start(script, args, port=free_port(), nproc=nproc), started, limit_s)


def run_nodes(script: str, args: list[str], *, nnodes: int, nproc: int, limit_s: float) -> list[Finished]:
    """`nnodes` torchrun launchers on this machine acting as separate nodes over loopback (static
    rendezvous at 127.0.0.1), each with `nproc` workers; returns each launcher's outcome."""
    port = free_port()
    started = time.monotonic()
    launchers = [start(script, args, port=port, nproc=nproc, nnodes=nnodes, node_rank=n) for n in range(nnodes)]
    return [wait(p, started, limit_s) for p in launchers]


def start_elastic_agent(script: str, args: list[str], *, port: int, log_path, is_host: bool, nnodes: str = "1:2",
                        nproc: int = 1, max_restarts: int = 2, env: dict | None = None) -> subprocess.Popen:
    """One torchrun agent of an elastic job (c10d rendezvous at 127.0.0.1:`port`, `nnodes` = 'MIN:MAX') in a new
    process group, its output to `log_path`. `is_host`: this agent hosts the rendezvous store (the others must
    find it running). One rendezvous store per round (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): with torch 2.13's
    shared store a node joining a running group times out waiting for the round's MASTER_ADDR. Workers run in
    sessions of their own (torchrun starts them so): stopping the agent's group does not stop them."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=elastic_test",
        f"--rdzv_conf=is_host={int(is_host)},last_call_timeout=1", f"--max-restarts={max_restarts}",
        "--monitor_interval=0.2", os.path.join(SCRIPTS, script), *args,
    ]  # fmt: skip
    full_env = dict(worker_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **(env or {}))
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
