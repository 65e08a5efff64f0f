"""Which device this process drives, and the matching collective backend.

    kind  device        backend  autocast  torch.compile advised
    npu   npu:<index>   hccl     npu       no (inductor does not target NPU)
    cuda  cuda:<index>  nccl     cuda      yes
    cpu   cpu           gloo     cpu       yes

'auto' prefers an Ascend NPU, then CUDA, then the CPU, by device kind (Intel Gaudi's backend is 'hccl' too).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from retina_fn.parallel.env import LaunchEnv

REQUESTS = ("auto", "npu", "cuda", "cpu")
_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


class DeviceUnavailable(RuntimeError):
    """The requested device kind cannot be used in this process."""


class DeviceChoice(NamedTuple):
    """The device this process drives (kind, index: None for the CPU) and what goes with it (the table above)."""

    kind: str
    index: int | None
    backend: str
    autocast_device_type: str
    compile_advised: bool

    @property
    def device(self) -> torch.device:
        """The torch.device; 'npu' parses only once torch_npu is imported."""
        return torch.device(self.kind) if self.index is None else torch.device(self.kind, self.index)

    @property
    def device_str(self) -> str:
        """The device as a string, usable before torch_npu registers 'npu'."""
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def _npu_handle():
    """torch.npu (or torch_npu.npu) when torch_npu loads and reports devices, else None."""
    from retina_fn import accel  # lazily: probing may import torch_npu

    if not accel.npu_available():
        return None
    return getattr(torch, "npu", None) or getattr(accel.torch_npu_module(), "npu", None)


def _cuda_handle():
    return torch.cuda if torch.cuda.is_available() and torch.cuda.device_count() > 0 else None


def resolve_device(requested: str = "auto", env: LaunchEnv | None = None) -> DeviceChoice:
    """The DeviceChoice for a request ('auto' | 'npu' | 'cuda' | 'cpu') and this process's LaunchEnv (None: a
    single process); sets nothing. Raises ValueError for an unknown request, DeviceUnavailable for an absent kind
    or a device index beyond the visible count."""
    if requested not in REQUESTS:
        raise ValueError(f"dist.device must be one of {REQUESTS}, got {requested!r}")
    env = env or LaunchEnv()
    handles = {"npu": _npu_handle, "cuda": _cuda_handle}
    kind = next((k for k in ("npu", "cuda") if handles[k]() is not None), "cpu") if requested == "auto" else requested
    if kind == "cpu":
        return DeviceChoice("cpu", None, "gloo", "cpu", True)
    handle = handles[kind]()
    if handle is None:
        why = ("torch_npu is not installed, failed to load (is CANN's set_env.sh sourced?) or sees no NPU"
               if kind == "npu" else "torch.cuda.is_available() is False")
        raise DeviceUnavailable(f"dist.device={requested!r} was requested but {why}; use dist.device='auto' or 'cpu'")
    count = int(handle.device_count())
    if env.device_index >= count:
        raise DeviceUnavailable(f"this process (rank {env.rank}, local rank {env.local_rank}) needs {kind}:"
                                f"{env.device_index} but only {count} {kind} device(s) are visible; launch at most "
                                f"{count} processes per node")
    return DeviceChoice(kind, env.device_index, _BACKENDS[kind], kind, kind != "npu")


def activate_device(choice: DeviceChoice) -> None:
    """Makes `choice` the current device of this process (before creating the process group)."""
    if choice.kind == "cuda":
        torch.cuda.set_device(choice.index)
    elif choice.kind == "npu":
        _npu_handle().set_device(choice.index)


def select_device(requested: str = "auto", env: LaunchEnv | None = None) -> DeviceChoice:
    """`resolve_device(requested, env)`, then `activate_device` on the result (raises as resolve_device)."""
    choice = resolve_device(requested, env)
    activate_device(choice)
    return choice
