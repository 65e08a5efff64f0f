"""The train step under the distribution layer: data parallelism must equal one big batch."""

import torch

from tests.dist_scripts import launch


def test_two_processes_of_batch_2_equal_one_process_of_batch_4(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for nproc, out in ((1, one), (2, two)):
        done = launch.run("step_worker.py", [str(out), "3"], nproc=nproc, limit_s=240)
        assert done.returncode == 0, done.output[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-5)
    worst = 0.0
    for path, value in a["params"].items():
        diff = float((value - b["params"][path]).abs().max())
        worst = max(worst, diff)
        assert torch.allclose(value, b["params"][path], rtol=1e-5, atol=1e-5), (path, diff)
    print(f"largest parameter difference after 3 steps: {worst:.2e}")
