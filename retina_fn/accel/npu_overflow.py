"""torch_npu's own overflow check, as an overflow check the train step takes (`precision.OverflowCheck`)."""

from __future__ import annotations

import torch

from retina_fn import precision, tree
from retina_fn.accel.probe import AcceleratorUnavailable, torch_npu_module


def npu_flag_check() -> precision.OverflowCheck:
    """`torch_npu.npu.utils.npu_check_overflow` wrapped as check(grads, scale) -> bool [].

    In INF_NAN mode torch_npu inspects the tensor it is given (here the per-leaf max |g|); in saturation
    mode (Ascend 910A) it reads the device's overflow flag, which is cleared afterwards for the next step.
    It answers with a Python bool, so this check syncs with the host and cannot be compiled.

    Returns:
      check(grads: tree of float tensors, scale: float32 [] or None) -> bool [] (True: the step is usable).

    Raises:
      AcceleratorUnavailable: torch_npu is absent or has no npu_check_overflow.
    """
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
