"""Probes of optional accelerator packages: torch_npu (Ascend) and apex (NVIDIA or Ascend).

Each probe runs on first call and is cached (`clear_probe_cache()` forgets, for tests). A package that is
missing or cannot load (torch_npu without CANN fails on libhccl.so) reads as absent. Three packages answer
`import apex`: NVIDIA's (fused kernels only with the `--cpp_ext --cuda_ext` build, which installs `amp_C`),
Ascend's (adds `apex.optimizers.NpuFusedSGD`), and an unrelated PyPI web toolkit with neither optimiser.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from types import ModuleType

import torch

# What a broken optional install may raise on import; SyntaxError covers the Python 2-era PyPI 'apex'.
_IMPORT_FAILURES = (ImportError, RuntimeError, OSError, SyntaxError, ValueError)


class AcceleratorUnavailable(RuntimeError):
    """An explicitly requested accelerator package (apex, torch_npu) is absent or unusable."""


def _import_optional(name: str) -> ModuleType | None:
    if name in sys.modules:  # already imported, or blocked with a None entry
        return sys.modules[name]
    try:
        if importlib.util.find_spec(name) is None:
            return None
        return importlib.import_module(name)
    except _IMPORT_FAILURES:
        return None


@functools.cache
def torch_npu_module() -> ModuleType | None:
    """The imported `torch_npu` module, or None when it is not installed or cannot load."""
    return _import_optional("torch_npu")


@functools.cache
def npu_available() -> bool:
    """True when torch_npu loads and reports at least one Ascend device."""
    module = torch_npu_module()
    if module is None:
        return False
    npu = getattr(torch, "npu", None) or getattr(module, "npu", None)
    try:
        return bool(npu.is_available()) and int(npu.device_count()) > 0
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def apex_flavor() -> str | None:
    """Which `apex` is installed: 'nvidia', 'ascend', or None (absent, or the unrelated PyPI web toolkit)."""
    if _import_optional("apex") is None:
        return None
    optimizers = _import_optional("apex.optimizers")
    if optimizers is None:
        return None
    # Ascend's apex is a fork of NVIDIA's, so it may carry FusedSGD too: look for its own class first.
    if hasattr(optimizers, "NpuFusedSGD"):
        return "ascend"
    has_kernels = _import_optional("amp_C") is not None or _import_optional("apex.multi_tensor_apply") is not None
    if hasattr(optimizers, "FusedSGD") and has_kernels:
        return "nvidia"
    return None


_APEX_HELP = (
    "NVIDIA apex is not on PyPI: it is built from source (github.com/NVIDIA/apex, with --cpp_ext --cuda_ext). "
    "Ascend apex is built from Ascend's apex repository. The PyPI package named 'apex' is an unrelated web "
    "toolkit and provides neither. Use optim.backend='native' to train without apex."
)


def require_apex(feature: str) -> tuple[str, ModuleType]:
    """(flavor, apex.optimizers) for `feature`, or AcceleratorUnavailable explaining how to get apex."""
    flavor = apex_flavor()
    if flavor is None:
        found = "an unrelated package named 'apex'" if _import_optional("apex") is not None else "no apex"
        raise AcceleratorUnavailable(f"{feature} needs NVIDIA or Ascend apex, but {found} is installed. {_APEX_HELP}")
    return flavor, _import_optional("apex.optimizers")


def fused_sgd_class(feature: str = "optim.backend='apex'") -> type:
    """The installed apex's fused SGD optimiser class (NpuFusedSGD on Ascend, FusedSGD on NVIDIA)."""
    flavor, optimizers = require_apex(feature)
    return optimizers.NpuFusedSGD if flavor == "ascend" else optimizers.FusedSGD


def clear_probe_cache() -> None:
    """Forgets every cached probe answer (tests inject stand-in modules)."""
    for probe in (torch_npu_module, npu_available, apex_flavor):
        probe.cache_clear()
