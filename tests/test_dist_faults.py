"""A rank that dies or hangs must stop the whole job with an error within dist.timeout_s, never hang it.

Each test launches tests/dist_scripts/fault_worker.py under torchrun on the CPU (gloo): both ranks
all-reduce a small gradient tree in a loop and rank 1 fails at step 3. Wall times include starting the
interpreters, hence the slack.
"""

import re

from tests.dist_scripts import launch

TIMEOUT_S = 10
SLACK_S = 45  # interpreter start-up and torchrun's teardown on two busy cores
STEPS = 40


def fault_args(mode):
    return ["--mode", mode, "--timeout", str(TIMEOUT_S), "--fail-after", "3", "--steps", str(STEPS)]


def assert_no_rank_finished(output):
    assert "rank 1: step 2 ok" in output  # the loop did run before the fault
    assert f"step {STEPS - 1} ok" not in output


def test_a_rank_that_dies_fails_the_launch_quickly():
    finished = launch.run("fault_worker.py", fault_args("die"), nproc=2, limit_s=TIMEOUT_S + SLACK_S + 30)
    assert finished.returncode not in (0, -9), finished.output[-3000:]  # -9: our own kill after the limit
    assert finished.seconds < TIMEOUT_S + SLACK_S, finished.output[-3000:]
    assert "rank 1: simulating a die at step 3" in finished.output
    assert_no_rank_finished(finished.output)


def test_a_rank_that_hangs_makes_the_others_raise_within_the_timeout():
    finished = launch.run("fault_worker.py", fault_args("hang"), nproc=2, limit_s=TIMEOUT_S + SLACK_S + 30)
    assert finished.returncode not in (0, -9), finished.output[-3000:]
    assert finished.seconds < TIMEOUT_S + SLACK_S, finished.output[-3000:]
    assert_no_rank_finished(finished.output)
    # Rank 0 itself reports the timeout, after waiting about dist.timeout_s in the stuck all-reduce.
    waited = re.search(r"rank 0: step 3 CollectiveError after ([0-9.]+) s", finished.output)
    assert waited, finished.output[-3000:]
    assert TIMEOUT_S - 1 <= float(waited.group(1)) <= TIMEOUT_S + 5
    assert f"dist.timeout_s={TIMEOUT_S} s" in finished.output
    assert "reduce_mean (all_reduce) failed on rank 0 of 2" in finished.output


def test_a_rank_dying_on_another_node_is_detected_by_the_survivor_itself():
    """Separate launchers (two 'nodes' over loopback): no agent kills the survivor for us, so rank 0's own
    collective must fail and end its launcher."""
    node0, node1 = launch.run_nodes(
        "fault_worker.py", fault_args("die"), nnodes=2, nproc=1, limit_s=TIMEOUT_S + SLACK_S + 30
    )
    assert node1.returncode not in (0, -9) and "rank 1: simulating a die" in node1.output, node1.output[-3000:]
    assert node0.returncode not in (0, -9), node0.output[-3000:]
    assert node0.seconds < TIMEOUT_S + SLACK_S
    assert re.search(r"rank 0: step 3 CollectiveError after [0-9.]+ s", node0.output), node0.output[-3000:]
    assert "CollectiveError: reduce_mean (all_reduce) failed on rank 0 of 2" in node0.output
