import os
import sys

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


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(SLOW_FILES)))
