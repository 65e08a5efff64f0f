"""retina_fn.engine.host_memory: freed memory is reused without new page faults (as the kernel counts them)."""

import subprocess
import sys
import textwrap

import pytest

# A stand-in for train steps: each allocates and touches blocks of 16, 4, 8, 2 and 16 MiB, then frees them.
# Prints the minor page faults of three such steps after a first one.
_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from retina_fn.engine import host_memory
    if sys.argv[1] == "keep":
        assert host_memory.keep_freed_memory("cpu")
    if sys.argv[1] == "cuda":  # a GPU run leaves the host allocator as it is
        assert not host_memory.keep_freed_memory("cuda")
    def step():
        blocks = [np.ones(n << 18, dtype=np.float32) for n in (16, 4, 8, 2, 16)]
        del blocks
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _step_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and minor-fault counts are glibc/Linux")
def test_freed_blocks_are_reused_without_page_faults():
    pages_per_step = (46 << 20) // 4096
    assert _step_faults("system") > 3 * pages_per_step // 10  # glibc gives blocks back and faults them in again
    assert _step_faults("keep") < pages_per_step // 20
    assert _step_faults("cuda") > 3 * pages_per_step // 10
