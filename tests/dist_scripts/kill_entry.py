"""The training entry point (`python -m experiments.coco_retinanet`'s main) with an optional SIGKILL inside a
checkpoint write, for tests/test_kill_resume.py.

    KILL_IN_SAVE=<n>:<phase>  on the n-th call of retina_fn.checkpoint.save in this process, kill this
                              process with SIGKILL at <phase>:
      checkpoint-partial   half of the checkpoint's bytes are in its temporary file, nothing renamed yet
      digest-partial       the checkpoint file is in place, half of its digest sidecar's temporary file written
      before-prune         checkpoint and digest in place, the old checkpoints not yet deleted

The partial temporary files are left behind exactly as a killed write would leave them. Unset: no hook.
Before killing, one line `KILL_ENTRY: ...` goes to stderr so the test can tell its own kill from a crash.
Should the n-th save return without the hook having fired (checkpoint.save no longer writes through
checkpoint._atomic_write), the process exits with status 99 rather than pass silently.
"""

import os
import signal
import sys

from absl import app, flags

from experiments import coco_retinanet
from retina_fn import checkpoint

PHASES = ("checkpoint-partial", "digest-partial", "before-prune")
HOOK_DID_NOT_FIRE = 99


def _die(message: str) -> None:
    sys.stderr.write(f"KILL_ENTRY: {message}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _partial_write(path: str, data: bytes, message: str) -> None:
    """Writes the first half of `data` to the temporary file a real write of `path` would use (durably, so
    the bytes are really on disk), then dies."""
    with open(f"{path}.tmp.{os.getpid()}", "wb") as f:
        f.write(data[: max(1, len(data) // 2)])
        f.flush()
        os.fsync(f.fileno())
    _die(message)


def install(spec: str) -> None:
    target, phase = spec.split(":")
    target = int(target)
    if phase not in PHASES or target < 1:
        raise ValueError(f"KILL_IN_SAVE={spec!r}: want <n >= 1>:<one of {PHASES}>")
    real_save, real_atomic_write = checkpoint.save, checkpoint._atomic_write
    calls = {"save": 0}

    def save(directory, step, *args, **kwargs):
        calls["save"] += 1
        if calls["save"] != target:
            return real_save(directory, step, *args, **kwargs)
        where = f"in save call {target} (step {step}) at {phase}"
        writes = {"n": 0}

        def atomic_write(path, data):
            writes["n"] += 1
            if phase == "checkpoint-partial" and writes["n"] == 1:
                _partial_write(path, data, f"killing {where}: {len(data) // 2} of {len(data)} bytes of {path}")
            if phase == "digest-partial" and writes["n"] == 2:
                _partial_write(path, data, f"killing {where}: {len(data) // 2} of {len(data)} bytes of {path}")
            real_atomic_write(path, data)
            if phase == "before-prune" and writes["n"] == 2:
                _die(f"killing {where}: {path} written, old checkpoints not pruned")

        checkpoint._atomic_write = atomic_write
        try:
            real_save(directory, step, *args, **kwargs)
        finally:
            checkpoint._atomic_write = real_atomic_write
        sys.stderr.write(f"KILL_ENTRY: the hook {where} did not fire ({writes['n']} atomic writes seen)\n")
        sys.stderr.flush()
        os._exit(HOOK_DID_NOT_FIRE)

    checkpoint.save = save


if os.environ.get("KILL_IN_SAVE"):
    install(os.environ["KILL_IN_SAVE"])

if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(coco_retinanet.main)
