"""Optional accelerator packages, probed in one place: torch_npu (Ascend) and apex (NVIDIA or Ascend).

The engine never imports this: what an accelerator provides is built here and passed in (retina_fn.train.build).
Importing this package probes nothing.
"""

from retina_fn.accel.apex_sgd import apex_sgd
from retina_fn.accel.npu_overflow import npu_flag_check
from retina_fn.accel.probe import (AcceleratorUnavailable, apex_flavor, clear_probe_cache, fused_sgd_class,
                                   npu_available, require_apex, torch_npu_module)

__all__ = ["AcceleratorUnavailable", "apex_flavor", "apex_sgd", "clear_probe_cache", "fused_sgd_class",
           "npu_available", "npu_flag_check", "require_apex", "torch_npu_module"]
