"""The training entry point (`python -m experiments.coco_retinanet`'s main) with a pause, for tests/test_elastic.py.

    ELASTIC_DIR=<dir>         every worker writes <dir>/worker_<pid> at start (so the test can stop leftovers) and
                              one line 'ELASTIC_ENTRY: worker <pid> started as rank <r> of <n>, restart count <c>'
    PAUSE_AFTER=<step>:<n>    a worker of a group of n processes stops right after the checkpoint of global step
                              <step> is written (every rank has passed its barrier), writes <dir>/paused_<rank>
                              holding "<pid> <parent pid>", and waits until <dir>/go exists (then trains on) or it
                              is stopped: by its agent restarting the group, or by the test killing its node. It
                              waits PAUSE_LIMIT_S seconds at most, then exits with status 98.

Groups of another size never pause, so the group that resumes after a membership change runs to the end.
"""

import os
import sys
import time

from absl import app, flags

from experiments import coco_retinanet
from retina_fn.engine import hooks as train_hooks

PAUSE_LIMIT_S = 240.0
PAUSE_TIMED_OUT = 98


def install(directory: str, spec: str) -> None:
    step, world = (int(x) for x in spec.split(":"))
    real_save = train_hooks.Checkpointer.save

    def save_then_pause(self, state, saved_step, *args, **kwargs):
        real_save(self, state, saved_step, *args, **kwargs)
        if saved_step != step or self.runtime.world_size != world:
            return
        with open(os.path.join(directory, f"paused_{self.runtime.rank}.tmp"), "w") as f:
            f.write(f"{os.getpid()} {os.getppid()}")
        os.replace(os.path.join(directory, f"paused_{self.runtime.rank}.tmp"),
                   os.path.join(directory, f"paused_{self.runtime.rank}"))
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not os.path.exists(os.path.join(directory, "go")):
            if time.monotonic() > deadline:
                sys.stderr.write(f"ELASTIC_ENTRY: paused for {PAUSE_LIMIT_S} s without a go; exiting\n")
                os._exit(PAUSE_TIMED_OUT)
            time.sleep(0.05)

    train_hooks.Checkpointer.save = save_then_pause


if os.environ.get("ELASTIC_DIR"):
    open(os.path.join(os.environ["ELASTIC_DIR"], f"worker_{os.getpid()}"), "w").close()
    sys.stderr.write(f"ELASTIC_ENTRY: worker {os.getpid()} started as rank {os.environ.get('RANK')} of "
                     f"{os.environ.get('WORLD_SIZE')}, restart count {os.environ.get('TORCHELASTIC_RESTART_COUNT')}\n")
    if os.environ.get("PAUSE_AFTER"):
        install(os.environ["ELASTIC_DIR"], os.environ["PAUSE_AFTER"])

if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(coco_retinanet.main)
