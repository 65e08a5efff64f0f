"""torchrun, ending as the programs end: `python -m experiments.launch [torchrun options] -m MODULE [args]`.

A worker that stops on a user's mistake (exit status 2) or Ctrl-C (130) has printed its one line; torchrun's
report of it (a traceback and a summary block) is left out and the launcher exits with the worker's status. Any
other failure is summed up in one line (the rank, its exit status or signal) and exit status 1.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from experiments import cli


def main(argv=None) -> int:
    """Runs torchrun with argv (None: sys.argv[1:]); returns the exit status."""
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode in (cli.EXIT_USER_ERROR, cli.EXIT_INTERRUPTED):
            return failure.exitcode
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        print(f"{err.name} failed: rank {rank} ended with {how} (its output is above)", file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, SignalException):
        print("interrupted: the workers were stopped (each printed what it keeps)", file=sys.stderr, flush=True)
        return cli.EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
