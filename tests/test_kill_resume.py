"""Kill safety: a training run never loses work. Checkpoints are written atomically and a resumed run
continues exactly, whenever the process dies (SIGKILL: no handler, no flush, no cleanup).

One tiny configuration (the smoke config on 16 images, 2 per step, 2 epochs of 9 steps: portrait and
landscape images batch apart; a checkpoint after every step; no validation) is trained twice with the
same command in subprocesses (tests/dist_scripts/kill_entry.py: `python -m experiments.coco_retinanet`'s
main plus a kill hook; the synthetic data is generated once beforehand and shared):

  - straight: once, uninterrupted;
  - killed:   SIGKILLed again and again and restarted with the same command until it completes. The
              kill schedule (seeded) has kills inside retina_fn.checkpoint.save on its n-th call of the
              process (half-way through the checkpoint's temporary file, half-way through its digest
              sidecar's, or before old checkpoints are pruned), then kills at random delays after the start
              (scaled by the straight run's wall time, so they land at comparable points on a slower or
              faster machine: in start-up, restore, steps or writes).

Every schedule is valid: a kill before the first checkpoint restarts from scratch, a kill after the run
completed does not happen (and is reported as such). The newest checkpoint of both runs must then hold the
same step, the same data position and bitwise the same train state (parameters, optimiser state, rng, step
counters: torch.equal leaf by leaf). Finally a restart of the finished run must exit 0 without training
again and without touching its checkpoints, metrics or results.json.

`pytest -s` prints the kill summary; the same text is in the assertion messages. KILL_RESUME_SEED=<int>
draws another schedule.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from configs import common
from retina_fn import checkpoint, tree
from retina_fn.data import synthetic
from tests.dist_scripts import launch

SEED = int(os.environ.get("KILL_RESUME_SEED", "0"))
ENTRY = os.path.join(launch.SCRIPTS, "kill_entry.py")
WRITE_PHASES = ("checkpoint-partial", "digest-partial", "before-prune")
TIMED_KILLS = 3  # plus one write kill per phase: 6 planned kills
TIMED_FRACTION = (0.2, 0.45)  # a timed kill lands this fraction of the straight run's wall time after the start
ATTEMPT_LIMIT_S = 120.0
# name -> value; the command line gets --config.<name>=<value>
OVERRIDES = {
    "data.synthetic.num_train": 16,
    "data.synthetic.num_val": 4,
    "data.images_per_device": 2,
    "optim.epochs": 2,
    "train.checkpoint_every_steps": 1,
    "train.validate": False,
    "dist.device": "cpu",
}


def command(data_root, workdir) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return [sys.executable, ENTRY, "--config", os.path.join(launch.ROOT, "configs", "smoke.py"),
            f"--config.data.root={data_root}", *flags, f"--workdir={workdir}"]


def start(data_root, workdir, log_path, kill_in_save: str | None = None) -> subprocess.Popen:
    """The training command in its own process group, its output to `log_path` (a file: no pipe to fill)."""
    env = launch.worker_env()
    env.pop("KILL_IN_SAVE", None)
    if kill_in_save:
        env["KILL_IN_SAVE"] = kill_in_save
    with open(log_path, "w") as log:
        return subprocess.Popen(command(data_root, workdir), cwd=launch.ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, limit_s: float = ATTEMPT_LIMIT_S) -> int:
    """Waits for `process` (killing its group and failing the test on overrun); returns its exit status."""
    try:
        return process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"a training run took more than {limit_s} s")


def tail(path, n=30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def newest_step(workdir) -> int | None:
    paths = checkpoint.list_checkpoints(os.path.join(workdir, "checkpoints"))
    return int(os.path.basename(paths[0])[5:14]) if paths else None


def leftover_temp_files(workdir, pid: int) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", f"*.tmp.{pid}")))


def plan(rng: random.Random) -> list[tuple[str, object]]:
    """The seeded kill schedule: ('save', 'n:phase') or ('timer', fraction of the straight run's wall time).

    The write kills come first: with n <= 3 each keeps at most 3 steps, so all three fire (the run has 18
    steps) and leave at least 9 steps to go; a timer below half the straight run's time then cannot reach
    the end from there, so at least 4 kills land whatever the draw (given a machine of steady speed)."""
    writes = [("save", f"{rng.randint(1, 3)}:{phase}") for phase in rng.sample(WRITE_PHASES, len(WRITE_PHASES))]
    timers = [("timer", rng.uniform(*TIMED_FRACTION)) for _ in range(TIMED_KILLS)]
    return writes + timers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill_resume")
    data, straight, killed, logs = base / "data", base / "straight", base / "killed", base / "logs"
    logs.mkdir()
    from configs import smoke

    cfg = common.override(smoke.get_config(), **OVERRIDES)
    s = cfg.data.synthetic
    synthetic.ensure_synthetic(data, s.num_train, s.num_val, s.seed, s.image_size, s.num_classes)
    clock = time.monotonic()

    t0 = time.monotonic()
    rc = finish(start(data, straight, logs / "straight.log"))
    straight_s = time.monotonic() - t0
    assert rc == 0, f"the uninterrupted run failed ({rc}):\n{tail(logs / 'straight.log')}"

    events: list[str] = []
    kills = 0
    schedule = plan(random.Random(SEED))
    for attempt in range(len(schedule) + 3):
        kind, arg = schedule[attempt] if attempt < len(schedule) else ("none", None)
        log_path = logs / f"killed_{attempt}.log"
        before = newest_step(killed)
        process = start(data, killed, log_path, kill_in_save=arg if kind == "save" else None)
        if kind == "timer":
            delay = arg * straight_s
            try:
                rc = process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                rc = process.wait()
        else:
            rc = finish(process)
        after = newest_step(killed)
        temps = leftover_temp_files(killed, process.pid)
        what = f"attempt {attempt}: newest checkpoint {before} -> {after}"
        if rc == -signal.SIGKILL:
            kills += 1
            if kind == "timer":
                where = "during a checkpoint write" if temps else "no partial checkpoint file left"
                events.append(f"kill {kills}: SIGKILL {delay:.2f} s after the start ({where}; left {temps}); {what}")
            else:
                said = [line.strip() for line in open(log_path) if line.startswith("KILL_ENTRY: killing")]
                assert said, f"{what}: killed by SIGKILL, but not by the hook {arg}:\n{tail(log_path)}"
                events.append(f"kill {kills}: SIGKILL during a checkpoint write, {said[0][len('KILL_ENTRY: '):]} "
                              f"(left {temps}); {what}")
            continue
        assert rc == 0, f"{what}: the run failed with status {rc} ({kind} {arg}):\n{tail(log_path)}"
        if kind != "none":
            events.append(f"planned kill ({kind} {arg}) did not happen: the run completed first; {what}")
        else:
            events.append(f"final restart completed the run; {what}")
        break
    else:
        pytest.fail(f"the killed run never completed:\n" + "\n".join(events))
    summary = (f"kill schedule seed {SEED}; straight run {straight_s:.1f} s; {kills} SIGKILLs, "
               f"{len(events) - kills} other attempts:\n  " + "\n  ".join(events)
               + f"\n  all runs together: {time.monotonic() - clock:.1f} s")
    print("\n" + summary)
    return dict(data=data, straight=straight, killed=killed, logs=logs, kills=kills, summary=summary)


def test_killed_run_ends_bitwise_equal_to_the_uninterrupted_run(runs, capsys):
    summary = runs["summary"]
    assert runs["kills"] >= 4, f"fewer than 4 kills landed:\n{summary}"
    a = checkpoint.restore_latest(os.path.join(runs["straight"], "checkpoints"))
    b = checkpoint.restore_latest(os.path.join(runs["killed"], "checkpoints"))
    assert a is not None and b is not None, summary
    assert a.step == b.step > 0, f"steps: straight {a.step}, killed {b.step}\n{summary}"
    assert a.meta["data_position"] == b.meta["data_position"], (
        f"data positions: straight {a.meta['data_position']}, killed {b.meta['data_position']}\n{summary}")
    flat_a, flat_b = tree.flatten_by_path(a.state), tree.flatten_by_path(b.state)
    assert sorted(flat_a) == sorted(flat_b), f"different state paths\n{summary}"
    differing = []
    for path, x in flat_a.items():
        y = flat_b[path]
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                gap = ((x.double() - y.double()).abs().max().item() if x.shape == y.shape and x.numel() else None)
                differing.append(f"{path}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}, max |diff| {gap}")
        elif x != y:
            differing.append(f"{path}: {x!r} vs {y!r}")
    assert not differing, (f"{len(differing)} of {len(flat_a)} state leaves differ after the kills:\n  "
                           + "\n  ".join(differing[:40]) + f"\n{summary}")
    left = glob.glob(os.path.join(runs["killed"], "checkpoints", "*.tmp.*"))
    assert not left, f"temporary files of killed writers left behind: {left}"
    n_params = sum(1 for p in flat_a if p.startswith("params"))
    with capsys.disabled():  # shown in `make test`'s output, not only with -s
        print(f"\n{runs['summary']}\nfinal state bitwise equal: step {b.step}, {len(flat_a)} leaves "
              f"({n_params} under params) torch.equal to the uninterrupted run's, after {runs['kills']} kills")


def test_restarting_a_finished_run_exits_without_training_again(runs):
    killed, logs = runs["killed"], runs["logs"]

    def snapshot():
        ckpt_dir = os.path.join(killed, "checkpoints")
        files = {n: os.stat(os.path.join(ckpt_dir, n)).st_mtime_ns for n in sorted(os.listdir(ckpt_dir))}
        with open(os.path.join(killed, "metrics.jsonl"), "rb") as f:
            metrics = f.read()
        with open(os.path.join(killed, "results.json"), "rb") as f:
            results = f.read()
        return newest_step(killed), files, metrics, results

    step, files, metrics, results = snapshot()
    log_path = logs / "restart_finished.log"
    t0 = time.monotonic()
    rc = finish(start(runs["data"], killed, log_path))
    seconds = time.monotonic() - t0
    step2, files2, metrics2, results2 = snapshot()
    print(f"restart of the finished run: exit {rc} in {seconds:.1f} s; last lines:\n{tail(log_path, 4)}")
    assert rc == 0, f"restarting the finished run failed ({rc}):\n{tail(log_path)}"
    # Everything below is the trainer's part (retina_fn/engine/trainer.py): a finished run must notice that it is
    # finished and leave its workdir alone. Collected together so one run of the test reports all of it.
    problems = []
    if step2 != step:
        problems.append(f"the newest checkpoint went from step {step} to step {step2}")
    if files2 != files:
        changed = sorted(n for n in set(files) | set(files2) if files.get(n) != files2.get(n))
        problems.append(f"checkpoint files written, created or deleted: {changed}")
    if metrics2 != metrics:
        problems.append(f"metrics.jsonl changed; appended:\n{metrics2[len(metrics):].decode(errors='replace')}")
    if results2 != results:
        problems.append(f"results.json rewritten:\nbefore: {results.decode()}\nafter: {results2.decode()}")
    assert not problems, ("TRAINER: restarting a finished run did work again:\n- " + "\n- ".join(problems)
                          + f"\nits log (last lines):\n{tail(log_path, 12)}")
