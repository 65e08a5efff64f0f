"""Elastic training on the same math: a node lost or added mid-run, and the run ends with the state of the
uninterrupted run.

Two torchrun agents on 127.0.0.1 are two nodes of one process each (c10d rendezvous, --nnodes=1:2, restarts
allowed). The smoke config at 2 images per device keeps a global batch of 4 (optim.global_batch=4,
optim.accum_steps=auto): two processes accumulate one loader batch each, one process accumulates two.
tests/dist_scripts/elastic_entry.py pauses the workers right after the checkpoint of step 2, so the membership
changes at a known point:

  scale down: both nodes train to step 2; the node that does not host the rendezvous store is SIGKILLed (its agent
    and its worker); the survivor's worker fails in its next all-reduce, its agent re-forms the group alone (one
    restart) and the run resumes at step 2 with accumulation 2 and ends at step 4. The node hosting the store is
    never the one killed: the c10d store lives in its agent, and without it no node can re-form (README, "Elastic
    training": such a job ends and resumes from the newest checkpoint when started again).
  scale up: one node trains alone (accumulation 2) to step 2; a second one joins, the first node's agent restarts
    its worker for the membership change, and both resume at step 2 with accumulation 1.

The reference is an uninterrupted two-process run. The resized runs must end at its step and data position with
every leaf of the train state bitwise equal. The data order and the schedule are functions of the global batch, and
the update is the same floats: one process divides both loader batches' losses by N0 + N1 and adds the two
gradients; two processes divide by the mean normaliser (N0 + N1) / 2, which doubles each gradient exactly (a power
of 2), and the all-reduce halves them and adds the same two numbers. (With more than two processes gloo's order
of additions could differ from the accumulation's; two is what these tests claim.) The printed lines give the
kills, restarts, world sizes per segment and the largest parameter difference.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from retina_fn.engine import trainer
from retina_fn import checkpoint, tree
from tests.dist_scripts import launch

STEPS, PAUSE_STEP = 4, 2
LIMIT_S = 300.0


SETTINGS = {"data.images_per_device": 2, "optim.global_batch": 4, "optim.accum_steps": "auto",
            "train.max_steps": STEPS, "train.validate": False, "train.checkpoint_every_steps": 2, "dist.timeout_s": 30,
            "data.workers": 0}


def train_args(workdir, data, **changes) -> list[str]:
    """The entry point's arguments: the smoke config with SETTINGS (updated by `changes`, dotted keys)."""
    settings = {**SETTINGS, **{k.replace("__", "."): v for k, v in changes.items()}}
    return ["--config", "configs/smoke.py", f"--workdir={workdir}", f"--config.data.root={data}",
            *(f"--config.{k}={v}" for k, v in settings.items())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of two processes (one agent), which also writes the shared synthetic data."""
    base = tmp_path_factory.mktemp("elastic")
    done = launch.run("train_entry.py", train_args(base / "reference", base / "data"), nproc=2, limit_s=LIMIT_S)
    assert done.returncode == 0, done.output[-3000:]
    return base, checkpoint.restore_latest(str(base / "reference" / "checkpoints"))


class Nodes:
    """The agents of one elastic test, their logs, and the stop of everything they started."""

    def __init__(self, base, name: str, pause_after: str):
        self.dir = base / name
        self.control = self.dir / "control"
        self.control.mkdir(parents=True)
        self.port, self.agents, self.started = launch.free_port(), {}, time.monotonic()
        self.env = {"ELASTIC_DIR": str(self.control), "PAUSE_AFTER": pause_after}

    def start(self, name: str, data, *, is_host: bool) -> subprocess.Popen:
        self.agents[name] = launch.start_elastic_agent("elastic_entry.py", train_args(self.dir / "run", data),
                                                       port=self.port, log_path=self.dir / f"{name}.log",
                                                       is_host=is_host, env=self.env)
        return self.agents[name]

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "".join(f"\n--- agent {n} (last lines)\n{self.log(n)[-3000:]}" for n in self.agents)

    def wait_paused(self, ranks: int) -> dict[int, tuple[int, int]]:
        """{rank: (worker pid, its agent's pid)} once `ranks` workers have paused."""
        while True:
            paused = sorted(glob.glob(str(self.control / "paused_*")))
            paused = [p for p in paused if not p.endswith(".tmp")]
            if len(paused) >= ranks:
                return {int(p.rsplit("_", 1)[1]): tuple(int(x) for x in open(p).read().split()) for p in paused}
            ended = {n: a.returncode for n, a in self.agents.items() if a.poll() is not None}
            if ended or time.monotonic() - self.started > LIMIT_S:
                pytest.fail(f"no pause of {ranks} worker(s) (agents ended: {ended}){self.logs()}")
            time.sleep(0.1)

    def wait(self, name: str) -> int:
        try:
            return self.agents[name].wait(timeout=max(1.0, self.started + LIMIT_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent {name} did not finish within {LIMIT_S} s{self.logs()}")

    def kill_node(self, name: str, worker_pid: int) -> None:
        """SIGKILL to an agent's process group and to its worker (which runs in a session of its own)."""
        os.killpg(self.agents[name].pid, signal.SIGKILL)
        os.kill(worker_pid, signal.SIGKILL)
        self.agents[name].wait()

    def stop_everything(self) -> None:
        for agent in self.agents.values():
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
        for marker in glob.glob(str(self.control / "worker_*")):
            pid = int(marker.rsplit("_", 1)[1])
            try:  # only a worker of this test still running (its command line names this test's workdir)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(self.dir).encode() in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


@pytest.fixture
def nodes(reference):
    made = []

    def make(name: str, pause_after: str) -> Nodes:
        made.append(Nodes(reference[0], name, pause_after))
        return made[-1]

    yield make
    for n in made:
        n.stop_everything()


def compare_with_reference(reference, workdir) -> tuple[float, list[dict]]:
    """Asserts the resized run ended as the reference did; returns (largest |parameter difference|, segments)."""
    final = checkpoint.restore_latest(str(workdir / "checkpoints"))
    assert final.step == reference.step == STEPS
    assert final.meta["data_position"] == reference.meta["data_position"]
    ours, theirs = tree.flatten_by_path(final.state), tree.flatten_by_path(reference.state)
    assert sorted(ours) == sorted(theirs)
    worst = max(float((ours[p].double() - theirs[p].double()).abs().max()) for p in theirs if p.startswith("params"))
    differing = [p for p in theirs if not torch.equal(ours[p], theirs[p])]
    assert not differing, f"{len(differing)} leaves differ, e.g. {differing[:5]}; largest param difference {worst:.3e}"
    return worst, final.meta["segments"]


def worker_starts(log: str) -> list[tuple[int, int, int]]:
    """(rank, world size, restart count) of every worker an agent started (elastic_entry.py's start lines)."""
    found = re.findall(r"ELASTIC_ENTRY: worker \d+ started as rank (\d+) of (\d+), restart count (\d+)", log)
    return [tuple(int(x) for x in f) for f in found]


def describe(segments: list[dict]) -> str:
    return ", ".join(f"steps {s['start_step']}..{s['end_step']} on {s['world_size']} process(es) x accum "
                     f"{s['accum_steps']}" for s in segments)


def test_a_lost_node_leaves_the_survivor_to_finish_the_same_run(reference, nodes, capsys):
    _, ref = reference
    run = nodes("scale_down", pause_after=f"{PAUSE_STEP}:2")
    data = run.dir.parent / "data"
    run.start("host", data, is_host=True)
    run.start("other", data, is_host=False)
    paused = run.wait_paused(ranks=2)
    victim = next(pid for pid, agent in paused.values() if agent == run.agents["other"].pid)
    run.kill_node("other", victim)
    (run.control / "go").touch()  # the survivor trains on and meets the dead peer in its next all-reduce
    assert run.wait("host") == 0, run.logs()
    host_log = run.log("host")
    assert "CollectiveError" in host_log and "resumed from" in host_log and "ckpt_000000002.pt" in host_log
    starts = worker_starts(host_log)  # the first group of 2, then the survivor alone after one restart
    assert [(world, restart) for _, world, restart in starts] == [(2, 0), (1, 1)], run.logs()
    worst, segments = compare_with_reference(ref, run.dir / "run")
    assert [(s["start_step"], s["end_step"], s["world_size"], s["accum_steps"]) for s in segments] == [
        (0, 2, 2, 1), (2, 4, 1, 2)]
    with capsys.disabled():
        print(f"\nscale down: 1 node SIGKILLed (agent and worker) after step {PAUSE_STEP}; the survivor's workers "
              f"(world size, restart count): {[(w, r) for _, w, r in starts]}; segments: {describe(segments)}; "
              f"final state bitwise equal to the 2-process run (largest parameter difference {worst:.1e})")


def test_a_joining_node_makes_the_group_resume_with_two_processes(reference, nodes, capsys):
    _, ref = reference
    run = nodes("scale_up", pause_after=f"{PAUSE_STEP}:1")
    data = run.dir.parent / "data"
    run.start("host", data, is_host=True)
    run.wait_paused(ranks=1)  # alone: 2 steps of 2 accumulated loader batches, checkpoint at step 2
    run.start("joiner", data, is_host=False)
    assert run.wait("host") == 0 and run.wait("joiner") == 0, run.logs()
    host_starts, joiner_starts = worker_starts(run.log("host")), worker_starts(run.log("joiner"))
    # alone, then restarted with the joiner for the membership change (which counts as no failure: restart count 0)
    assert [(world, restart) for _, world, restart in host_starts] == [(1, 0), (2, 0)], run.logs()
    assert [(world, restart) for _, world, restart in joiner_starts] == [(2, 0)], run.logs()
    worst, segments = compare_with_reference(ref, run.dir / "run")
    assert [(s["start_step"], s["end_step"], s["world_size"], s["accum_steps"]) for s in segments] == [
        (0, 2, 1, 2), (2, 4, 2, 1)]
    with capsys.disabled():
        print(f"\nscale up: a node joined after step {PAUSE_STEP}; workers (world size, restart count): first node "
              f"{[(w, r) for _, w, r in host_starts]}, joining node {[(w, r) for _, w, r in joiner_starts]}; "
              f"segments: {describe(segments)}; final state bitwise equal to the 2-process run (largest parameter "
              f"difference {worst:.1e})")


def test_a_global_batch_the_processes_cannot_make_is_refused_and_nothing_is_lost(reference, tmp_path):
    """A run with a global batch of 6 (one process accumulating 3 loader batches of 2, trained here in-process)
    restarted on two processes with accum_steps=auto: 6 is not a multiple of 2 x 2. It must refuse at start with
    one line that says what would work, and leave the checkpoints as they were."""
    from tests.test_experiment import smoke_config

    base, _ = reference
    workdir = tmp_path / "run"
    cfg = smoke_config(base / "data", **{**SETTINGS, "optim.global_batch": 6, "train.max_steps": 1})
    trainer.train_and_evaluate(cfg, str(workdir))
    newest = checkpoint.list_checkpoints(str(workdir / "checkpoints"))[0]
    files = sorted(glob.glob(str(workdir / "checkpoints" / "*")))
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in files}
    refused = launch.run("train_entry.py", train_args(workdir, base / "data", optim__global_batch=6), nproc=2,
                         limit_s=LIMIT_S)
    assert refused.returncode != 0
    assert (f"GlobalBatchError: {newest} was trained with a global batch of 6 images per step (1 process(es)), "
            "which 2 process(es) x 2 image(s) per device cannot make (6 is not a multiple of 4); with 2 image(s) per "
            "device run 1 or 3 process(es) (accum_steps 3, 1); with 2 process(es) set "
            "--config.data.images_per_device to 1 or 3 (accum_steps 3, 1). Nothing was trained or written"
            ) in refused.output, refused.output[-3000:]
    after = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in sorted(glob.glob(str(workdir / "checkpoints" /
                                                                                       "*")))}
    assert after == before and checkpoint.restore_latest(str(workdir / "checkpoints")).step == 1
