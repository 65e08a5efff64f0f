"""All-reduces a tree in a loop; rank 1 dies (--mode die) or hangs (--mode hang) after --fail-after steps.

The surviving rank must stop with a CollectiveError within the configured timeout. Prints one line per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from retina_fn import parallel
from tests.dist_scripts.common import make_dist_cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("die", "hang", "none"), required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--fail-after", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    runtime = parallel.init(make_dist_cfg(args.timeout))
    grads = {"w": torch.ones(64, 64), "b": {"x": torch.ones(64), "y": torch.ones(3, dtype=torch.float64)}}
    for step in range(args.steps):
        if runtime.rank == 1 and step == args.fail_after:
            print(f"rank 1: simulating a {args.mode} at step {step}", flush=True)
            if args.mode == "die":
                os._exit(3)
            if args.mode == "hang":
                while True:
                    time.sleep(60)
        started = time.monotonic()
        try:
            mean = runtime.reduce_mean(grads)
        except parallel.CollectiveError as error:
            waited = time.monotonic() - started
            print(f"rank {runtime.rank}: step {step} CollectiveError after {waited:.1f} s", flush=True)
            print(error, file=sys.stderr, flush=True)
            raise
        assert torch.equal(mean["w"], grads["w"])
        print(f"rank {runtime.rank}: step {step} ok", flush=True)
        time.sleep(0.05)
    runtime.shutdown()


if __name__ == "__main__":
    main()
