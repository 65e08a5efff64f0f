"""SGD through apex's fused optimiser (NpuFusedSGD on Ascend, FusedSGD on NVIDIA): the one in-place path.

It breaks the library's purity on purpose, for NPU speed:
- `update` writes into the parameter tensors given to `init` and returns them: pass them back unchanged
  every step (checked by identity). Gradients are copied into each parameter's `.grad`.
- The momentum buffers live in the apex object (a new one per `init`), not in opt_state (only a step count),
  so not in checkpoints.
- `lr` is read on the host (one sync per step); a step cannot be undone: skip it on a non-finite step.
"""

from __future__ import annotations

import torch

from retina_fn import tree
from retina_fn.accel.probe import fused_sgd_class
from retina_fn.optim.base import Optimizer, check_same_paths, first_device
from retina_fn.optim.masks import Mask, resolve_mask


def apex_sgd(momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
             weight_decay_mask: Mask = None) -> Optimizer:  # the arguments of retina_fn.optim.sgd
    """SGD on the installed apex's fused optimiser; Optimizer(init, update, inplace=True) (see module doc).

    Raises accel.AcceleratorUnavailable when neither NVIDIA nor Ascend apex is installed.
    """
    optimizer_class = fused_sgd_class("optim.backend='apex'")
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov needs momentum > 0")
    held: dict = {}  # the apex optimiser and the parameter tensors it owns

    def init(params: tree.Tree) -> dict:
        leaves = tree.leaves(params)
        decay = resolve_mask(weight_decay_mask, params, "weight-decay mask")
        groups = [
            {"params": [p for p, f in zip(leaves, decay) if f], "weight_decay": weight_decay},
            {"params": [p for p, f in zip(leaves, decay) if not f], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]  # the decayed group first: fused kernels favour group 0
        # lr is a placeholder: update() sets every group's lr from the schedule before each step.
        held["optimizer"] = optimizer_class(groups, lr=0.0, momentum=momentum, nesterov=nesterov)
        held["params"] = leaves
        return {"count": torch.zeros((), dtype=torch.int64, device=first_device(params))}

    @torch.no_grad()
    def update(grads: tree.Tree, opt_state: dict, params: tree.Tree, lr: torch.Tensor):
        if "optimizer" not in held:
            raise RuntimeError("apex_sgd: call init(params) before update")
        check_same_paths("grads", grads, params)
        leaves = tree.leaves(params)
        if len(leaves) != len(held["params"]) or any(a is not b for a, b in zip(leaves, held["params"])):
            raise ValueError(
                "apex_sgd updates parameters in place: pass the exact tensors given to init "
                "(the params returned by update), not copies"
            )
        for p, g in zip(leaves, tree.leaves(grads)):
            if p.grad is None:
                p.grad = g.detach().to(dtype=p.dtype, copy=True)
            else:
                p.grad.copy_(g)
        lr_value = float(lr)
        for group in held["optimizer"].param_groups:
            group["lr"] = lr_value
        held["optimizer"].step()
        return params, {"count": opt_state["count"] + 1}

    return Optimizer(init=init, update=update, inplace=True)
