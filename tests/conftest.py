import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The cores are shared by the test processes (pytest-xdist's workers, `make test` runs one per core): each
# takes its share of threads, and the programs it starts inherit the share through OMP_NUM_THREADS. More
# threads than cores only adds contention.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, os.cpu_count() or 1) // _WORKERS)
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# The files that take longest (`--durations`, summed per file; about two thirds of the suite's time), longest
# first. `make test` hands whole files to the workers in collection order (--dist loadfile
# --no-loadscope-reorder), so starting with these keeps one worker from finishing long after the other.
# Only the order across files changes; a file's own tests keep theirs.
SLOW_FILES = (
    "test_benchmark_suite.py", "test_compile.py", "test_golden_torchvision.py", "test_export.py", "test_scripts.py",
    "test_experiment.py", "test_elastic.py", "test_recipe_1x.py", "test_dist_train.py", "test_resume_world_size.py",
    "test_canvas_exact.py", "test_kill_resume.py", "test_interop.py", "test_dist_faults.py",
)


# End-to-end files: programs run as subprocesses, training runs, multi-process launches, compiled steps. Every
# test in them is marked slow, so `make test-fast` (-m "not slow") is the core and unit tests.
END_TO_END_FILES = frozenset({
    "test_benchmark.py", "test_benchmark_suite.py", "test_cli.py", "test_compile.py", "test_dist_faults.py",
    "test_dist_train.py", "test_elastic.py", "test_evaluation.py", "test_experiment.py", "test_export.py",
    "test_golden_torchvision.py", "test_host_memory.py", "test_kill_resume.py", "test_own_dataset.py",
    "test_parallel_collectives.py", "test_predict.py", "test_recipe_1x.py", "test_resume_world_size.py",
    "test_scripts.py", "test_slurm_script.py", "test_tensorboard_log.py", "test_trained.py", "test_trainer.py",
    "test_user_mistakes.py",
})


def pytest_collection_modifyitems(items):
    for item in items:
        if os.path.basename(str(item.path)) in END_TO_END_FILES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(SLOW_FILES)))
