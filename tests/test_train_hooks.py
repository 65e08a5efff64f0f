"""The loop's timed decisions (train.checkpoint_every_s, train.time_budget_s) on a scripted clock: which steps
save or stop, and how often the ranks have to talk to agree on it."""

import pytest

from retina_fn import errors
from retina_fn.engine.hooks import TimedDecisions


class FakeRuntime:
    """Rank 0 of `world_size` processes; broadcast_object counts the decisions shared."""

    def __init__(self, world_size: int):
        self.world_size, self.is_main, self.broadcasts = world_size, True, 0

    def broadcast_object(self, obj):
        self.broadcasts += 1
        return obj


def run(timer, steps: int, step_s: float) -> list[int]:
    """Steps 1..steps of step_s seconds each; returns the steps that saved (calling saved() as the loop does)."""
    saves = []
    for step in range(1, steps + 1):
        if timer.due(step, step * step_s).save:
            saves.append(step)
            timer.saved(step * step_s)
    return saves


def test_one_process_decides_at_every_step():
    runtime = FakeRuntime(1)
    timer = TimedDecisions(10.0, None, runtime, step=0, train_s=0.0)
    assert run(timer, 35, 1.0) == [10, 20, 30]  # 10 s of training after the start, then after each save
    assert runtime.broadcasts == 35


def test_several_processes_decide_about_twenty_times_per_interval():
    """Steps of 1 s, a checkpoint every 100 s: decision steps 1, 6, 11, ..., 96 (every 100 / 20 = 5 s), then 100,
    where the interval is due, so the save lands on step 100 exactly; then 105, ..., 195 and 200 (20 decisions),
    and 205, ..., 300 (20): 61 broadcasts in 300 steps."""
    runtime = FakeRuntime(4)
    timer = TimedDecisions(100.0, None, runtime, step=0, train_s=0.0)
    assert run(timer, 300, 1.0) == [100, 200, 300]
    assert runtime.broadcasts == 21 + 20 + 20


def test_slower_steps_space_the_decisions_by_rank_0s_step_time():
    """Steps of 4 s, a checkpoint every 100 s: decisions at most 100 / 20 = 5 s apart are one step apart (a gap
    is at least one step); the saves land on steps 25 and 50 (100 s and 200 s)."""
    runtime = FakeRuntime(2)
    timer = TimedDecisions(100.0, None, runtime, step=0, train_s=0.0)
    assert run(timer, 50, 4.0) == [25, 50]
    assert runtime.broadcasts == 50


def test_a_resumed_run_counts_from_its_own_start():
    """Resumed at step 40 with its training clock at 0: steps of 1 s save at 50 and 60."""
    timer = TimedDecisions(10.0, None, FakeRuntime(1), step=40, train_s=0.0)
    saves = []
    for step in range(41, 70):
        if timer.due(step, step - 40.0).save:
            saves.append(step)
            timer.saved(step - 40.0)
    assert saves == [50, 60]


def test_any_checkpoint_restarts_the_interval():
    timer = TimedDecisions(10.0, None, FakeRuntime(1), step=0, train_s=0.0)
    assert not timer.due(5, 5.0).save
    timer.saved(5.0)  # e.g. the step cadence or an epoch's end saved at 5 s
    assert [s for s in range(6, 20) if timer.due(s, float(s)).save] == [15, 16, 17, 18, 19]  # due until saved()


def test_off_without_a_setting_and_refuses_non_positive_seconds():
    runtime = FakeRuntime(2)
    timer = TimedDecisions(None, None, runtime, step=0, train_s=0.0)
    assert run(timer, 50, 100.0) == [] and runtime.broadcasts == 0
    with pytest.raises(errors.ConfigError, match=r"--config.train.checkpoint_every_s=0.0: must be > 0 seconds"):
        TimedDecisions(0.0, None, runtime, step=0, train_s=0.0)
    with pytest.raises(errors.ConfigError, match=r"--config.train.time_budget_s=-1.0: must be > 0 seconds"):
        TimedDecisions(None, -1.0, runtime, step=0, train_s=0.0)


def stop_step(timer, steps: int, step_s: float) -> int | None:
    """The first of steps 1..steps of step_s seconds each after which the timer says stop."""
    return next((step for step in range(1, steps + 1) if timer.due(step, step * step_s).stop), None)


def test_one_process_stops_at_the_first_step_past_the_budget():
    runtime = FakeRuntime(1)
    assert stop_step(TimedDecisions(None, 10.0, runtime, step=0, train_s=0.0), 50, 1.5) == 7  # 10.5 s >= 10 s


def test_several_processes_check_the_budget_about_twenty_times_not_at_every_step():
    """Steps of 1 s, a budget of 100 s and no timed checkpoints: decisions every 100 / 20 = 5 s (steps 1, 6, ...,
    96) and at step 100, where the budget is expected to end: 21 broadcasts, not one collective per step."""
    runtime = FakeRuntime(4)
    assert stop_step(TimedDecisions(None, 100.0, runtime, step=0, train_s=0.0), 300, 1.0) == 100
    assert runtime.broadcasts == 21


def test_checkpoints_and_the_budget_share_one_decision_per_step():
    """Steps of 1 s, a checkpoint every 100 s and a budget of 250 s on 2 processes: decisions every 5 s (the smaller
    of 100 / 20 and 250 / 20), at the steps where an interval is due (100, 200) and where the budget ends (250):
    21 + 20 + 10 broadcasts for both decisions together."""
    runtime = FakeRuntime(2)
    timer = TimedDecisions(100.0, 250.0, runtime, step=0, train_s=0.0)
    saves, stop = [], None
    for step in range(1, 400):
        decided = timer.due(step, float(step))
        if decided.save:
            saves.append(step)
            timer.saved(float(step))
        if decided.stop:
            stop = step
            break
    assert saves == [100, 200] and stop == 250
    assert runtime.broadcasts == 21 + 20 + 10
