"""What a CUDA graph cannot capture as it is: `host_syncs` finds it (on any device), `HostConstants` lifts
tensors built from Python data (host-to-device copies) out of a capture (retina_fn.train.graph uses both)."""

from __future__ import annotations

import collections
import traceback
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that wait for the device and read a value on the host, or whose output shape depends on values.
_SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero", "masked_select", "_unique",
                       "_unique2", "unique_dim", "unique_consecutive"})
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # with a bool index: nonzero
_HOST_DATA_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})  # torch.tensor / torch.as_tensor of Python data
# Tensor methods that hand data to the host. On a CPU tensor they dispatch no operation at all (the memory is
# already the host's), so they are caught where they are called, as torch functions.
_HOST_READ_METHODS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy",
                      torch.Tensor.cpu: "Tensor.cpu"}


class _Record:
    def __init__(self):
        self.syncs: collections.Counter = collections.Counter()
        self.host_data: collections.Counter = collections.Counter()
        self.where: dict[str, list[str]] = {}

    def add(self, found: collections.Counter, name: str) -> None:
        found[name] += 1
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
        place = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        places = self.where.setdefault(name, [])
        if place not in places:
            places.append(place)


class _DispatchRecorder(TorchDispatchMode):
    """Host-sync and host-data operations, as they reach the dispatcher."""

    def __init__(self, record: _Record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in _SYNC_OPS:
            self.record.add(self.record.syncs, name)
        elif name in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                        for i in (args[1] if len(args) > 1 and args[1] is not None else ())):
            self.record.add(self.record.syncs, f"{name} (bool index)")
        elif name in _HOST_DATA_OPS:
            self.record.add(self.record.host_data, name)
        return func(*args, **(kwargs or {}))


class _MethodRecorder(TorchFunctionMode):
    """Tensor methods that read a tensor on the host (`_HOST_READ_METHODS`), on any device."""

    def __init__(self, record: _Record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _HOST_READ_METHODS.get(func)
        if name is not None:
            self.record.add(self.record.syncs, name)
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable, *args, **kwargs) -> dict:
    """Runs fn(*args, **kwargs) once (eager; any device) and lists what a CUDA graph could not capture as it is.

    Returns:
      {'syncs': {op: count} of host reads and data-dependent shapes (`.item()`, `bool(t)`, `torch.equal`,
      `nonzero`, boolean indexing, `.tolist()`, `.cpu()`, ...); 'host_data': {op: count} of tensors built from
      Python data; 'where': {op: ['file:line', ...]}, the distinct callers outside torch}.
    """
    record = _Record()
    with _MethodRecorder(record), _DispatchRecorder(record):
        fn(*args, **kwargs)
    return {"syncs": dict(record.syncs), "host_data": dict(record.host_data), "where": record.where}


def _freeze(value) -> Any:
    """A hashable key for Python data (nested lists / tuples of scalars, None, dtypes, devices); else None."""
    if isinstance(value, (list, tuple)):
        parts = tuple(_freeze(v) for v in value)
        return None if any(p is None for p in parts) else (type(value).__name__, parts)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return type(value).__name__, value  # the type too: 1, 1.0 and True hash alike but make other tensors
    return None


class HostConstants(TorchFunctionMode):
    """Lifts tensors built from Python data onto an accelerator out of a captured call: while `recording`
    (warm-up) each `torch.tensor` / `torch.as_tensor` of Python data for a non-CPU device is made and kept in
    `constants`; during capture the same call returns the kept tensor (never written in place; kept with the graph)."""

    FACTORIES = (torch.tensor, torch.as_tensor)

    def __init__(self):
        super().__init__()
        self.recording = True
        self.constants: dict = {}

    @staticmethod
    def _key(func, args, kwargs):
        """The call's key, or None when it is not a Python-data factory call for a non-CPU device."""
        device = kwargs.get("device", args[2] if func is torch.as_tensor and len(args) > 2 else None)
        if device is None or torch.device(device).type == "cpu":
            return None
        frozen = (_freeze(args), _freeze(tuple(sorted(kwargs.items()))))
        return None if None in frozen else (func.__name__, *frozen)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and args and not isinstance(args[0], torch.Tensor):
            key = self._key(func, args, kwargs)
            if key is not None:
                if key not in self.constants:
                    if not self.recording:
                        raise RuntimeError(f"{func.__name__}{args} for {kwargs.get('device')} was first called "
                                           f"during graph capture, not during warm-up: the captured function "
                                           f"builds tensors from Python data that change between calls")
                    self.constants[key] = func(*args, **kwargs)
                return self.constants[key]
        return func(*args, **kwargs)
