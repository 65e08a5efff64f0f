"""Mixed-precision settings, autocast contexts, loss scaling as pure state, and overflow checks.

Precisions: 'fp32'; 'fp16' (autocast to float16 with dynamic or static loss scaling, the Ascend port's apex O1);
'bf16' (autocast to bfloat16, no loss scaling). apex O0 -> fp32, O1 and O2 -> fp16 (parameters stay float32);
O3 is refused. Loss scaling uses tensors only: no host sync, no Python branch on values.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, NamedTuple, Union

import torch

from retina_fn import tree

PRECISIONS = ("fp32", "fp16", "bf16")
OPT_LEVELS = {"O0": "fp32", "O1": "fp16", "O2": "fp16"}
# Halfway between the two largest float16 values (65472, 65504): a gradient that was saturated in fp16
# still lands above it after being unscaled and rescaled, whatever the rounding.
SATURATION_THRESHOLD = 65488.0


class Precision(NamedTuple):
    """name: 'fp32' | 'fp16' | 'bf16'; compute_dtype: the autocast dtype (None: no autocast);
    loss_scaling: whether the loss is scaled before differentiation."""

    name: str
    compute_dtype: torch.dtype | None
    loss_scaling: bool


def precision_from_name(name: str) -> Precision:
    """The Precision called `name` ('fp32' | 'fp16' | 'bf16')."""
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "fp16":
        return Precision("fp16", torch.float16, True)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")


def autocast(precision: Precision, device_type: str) -> contextlib.AbstractContextManager:
    """torch.autocast at `precision` on `device_type` ('cpu', 'cuda', 'npu'), a null context for fp32.
    Wrap the forward inside the loss only."""
    if precision.compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=precision.compute_dtype)


def float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on `device_type`: torch.autocast(enabled=False) where autocast is on, a
    null context where it is already off (torch.export records every autocast region as a higher-order op
    and recompiles the graph for each one)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def select_tree(pred: torch.Tensor, on_true: tree.Tree, on_false: tree.Tree) -> tree.Tree:
    """Leafwise torch.where(pred, a, b) for a 0-d bool `pred` over two trees of the same structure."""
    return tree.map(lambda a, b: torch.where(pred, a, b), on_true, on_false)


# ---- loss scaling -------------------------------------------------------------------------------------


class LossScaleState(NamedTuple):
    """scale: float32 [] current loss scale; good_steps: int64 [] finite steps since the last change."""

    scale: torch.Tensor
    good_steps: torch.Tensor


@dataclasses.dataclass(frozen=True)
class LossScaleSettings:
    """train.loss_scale: the starting scale, and whether (and how) it changes (`update_loss_scale`)."""

    init: float
    growth_interval: int
    factor: float
    dynamic: bool


def init_loss_scale(settings: LossScaleSettings, device: torch.device | str | None = None) -> LossScaleState:
    """The starting state of the settings' scale."""
    return LossScaleState(torch.tensor(float(settings.init), dtype=torch.float32, device=device),
                          torch.zeros((), dtype=torch.int64, device=device))


def update_loss_scale(state: LossScaleState, grads_finite: torch.Tensor, settings: LossScaleSettings) -> LossScaleState:
    """The state after a step whose gradients were finite (`grads_finite`, bool []) or not.

    Dynamic: an overflow divides the scale by `factor` (never below 1) and resets the count; the
    `growth_interval`-th finite step in a row multiplies it by `factor` and resets the count. Static: unchanged.
    """
    if not settings.dynamic:
        return state
    counted = torch.where(grads_finite, state.good_steps + 1, torch.zeros_like(state.good_steps))
    grow = counted >= settings.growth_interval
    grown = torch.where(grow, state.scale * settings.factor, state.scale)
    shrunk = torch.clamp(state.scale / settings.factor, min=1.0)
    return LossScaleState(torch.where(grads_finite, grown, shrunk),
                          torch.where(grow, torch.zeros_like(counted), counted))


def scale_loss(loss: torch.Tensor, state: LossScaleState) -> torch.Tensor:
    """loss * scale, in float32 (2**16 times an fp16 loss would overflow fp16)."""
    return loss.to(torch.float32) * state.scale


@torch.no_grad()
def unscale_grads(grads: tree.Tree, state: LossScaleState) -> tree.Tree:
    """grads * (1 / scale), each leaf in its own dtype; the product is taken in float32 (1 / scale
    underflows float16 once the scale passes 2**24)."""
    inverse = torch.reciprocal(state.scale)

    def one(g: torch.Tensor) -> torch.Tensor:
        if g.dtype == torch.float32:
            return g * inverse
        return (g.to(torch.float32) * inverse).to(g.dtype)

    return tree.map(one, grads)


# ---- overflow checks: fn(grads, scale) -> bool [] (True: every gradient usable) -------------------------

OverflowCheck = Callable[[tree.Tree, torch.Tensor], torch.Tensor]
OVERFLOW_CHECKS = ("isfinite", "saturation", "npu")  # 'npu' is built by retina_fn.accel.npu_flag_check


def leaf_abs_max(grads: tree.Tree) -> torch.Tensor:
    """float32 [n_leaves]: max |g| per leaf of a tree of float tensors (NaN where a leaf holds NaN)."""
    leaves = tree.leaves(grads)
    if not leaves:
        raise ValueError("overflow check given an empty gradient tree")
    return torch.stack([m.to(torch.float32) for m in torch._foreach_norm(leaves, float("inf"))])


def all_finite(grads: tree.Tree, scale: torch.Tensor | None = None) -> torch.Tensor:
    """bool []: every gradient element is finite. `scale` is ignored (same signature as the others)."""
    return torch.isfinite(leaf_abs_max(grads)).all()


def not_saturated(grads: tree.Tree, scale: torch.Tensor | None = None) -> torch.Tensor:
    """bool []: every gradient element is finite and none looks saturated in float16.

    Ascend 910A runs float16 in saturation mode: an overflow becomes +-65504 instead of inf, which isfinite
    misses. Any |g * scale| (the gradient before unscaling) at 65504 is taken as an overflow; pass scale=None
    for gradients that are still scaled. A heuristic: a saturated intermediate that does not reach a gradient
    at full size goes unseen (the 'npu' check reads the hardware flag instead).
    """
    peak = leaf_abs_max(grads)
    if scale is not None:
        peak = peak * scale.to(torch.float32)
    return (torch.isfinite(peak) & (peak < SATURATION_THRESHOLD)).all()


def make_overflow_check(kind: Union[str, OverflowCheck]) -> OverflowCheck:
    """The overflow check check(grads, scale) -> bool [] named `kind`: 'isfinite' | 'saturation', or a
    callable check itself (e.g. `retina_fn.accel.npu_flag_check()`; the engine never probes accelerators, so
    'npu' is resolved by the caller, retina_fn.train.build)."""
    if callable(kind):
        return kind
    if kind == "isfinite":
        return all_finite
    if kind == "saturation":
        return not_saturated
    if kind == "npu":
        raise ValueError("train.overflow_check='npu' reads torch_npu's overflow flag: build the check with "
                         "retina_fn.accel.npu_flag_check() and pass it in (retina_fn.train.build does)")
    raise ValueError(f"overflow check must be one of {OVERFLOW_CHECKS} or a callable, got {kind!r}")
