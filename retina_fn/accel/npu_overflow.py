"""torch_npu's own overflow check, as an overflow check the train step takes (`precision.OverflowCheck`)."""

from __future__ import annotations

import torch

from retina_fn import precision, tree
from retina_fn.accel.probe import AcceleratorUnavailable, torch_npu_module


def npu_flag_check() -> precision.OverflowCheck:
    """`torch_npu.npu.utils.npu_check_overflow` as check(grads, scale) -> bool [] (True: the step is usable); it
    inspects the per-leaf max |g| (INF_NAN mode) or reads and clears the device's flag (saturation mode, Ascend
    910A), syncing with the host. AcceleratorUnavailable without torch_npu's npu_check_overflow."""
    module = torch_npu_module()
    check = getattr(getattr(getattr(module, "npu", None), "utils", None), "npu_check_overflow", None)
    if check is None:
        raise AcceleratorUnavailable(
            "train.overflow_check='npu' needs torch_npu with torch_npu.npu.utils.npu_check_overflow"
        )
    clear_flag = getattr(module.npu, "clear_npu_overflow_flag", None)

    def npu_check(grads: tree.Tree, scale: torch.Tensor | None = None) -> torch.Tensor:
        peak = precision.leaf_abs_max(grads)
        overflow = bool(check(peak))
        if clear_flag is not None:
            clear_flag()
        return torch.tensor(not overflow, device=peak.device)

    return npu_check
