"""Start-up shared by the distributed test scripts (run under torchrun with the repository on PYTHONPATH)."""

from __future__ import annotations

import torch

from configs.common import dist_config


def make_dist_cfg(timeout_s: float, bucket_mb: float = 25.0):
    """The project's `dist` config block on the CPU with the given timeout and bucket size."""
    torch.set_num_threads(1)
    cfg = dist_config()
    cfg.device = "cpu"
    cfg.timeout_s = timeout_s
    cfg.bucket_mb = bucket_mb
    return cfg
