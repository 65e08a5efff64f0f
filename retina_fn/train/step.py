"""The generic pure train step: gradients of an objective, accumulation, precision, clipping, update.

    state, metrics = step(state, batch)                   # one loader batch
    state, metrics = step(state, (b1, b2, b3, b4))        # gradient accumulation over 4 loader batches

An `Objective` has prepare(batch) -> (extras, normalizer float32 []): work outside the gradient (RetinaNet:
anchor assignment) and this replica's loss divisor; and loss(params, batch, extras, normalizer) -> (loss float32
[], metrics {name: 0-d tensor} that add up over micro-batches).

A step over k loader batches: (1) `prepare` each batch b -> (extras_b, N_b); (2) with `reduce_normalizer`
('global') every batch divides by N = reduce(sum_b N_b), else ('local', mmdetection 2.9's per-GPU normaliser)
by k * N_b; (3) each batch split into `micro_batches` parts (memory only), torch.func.grad over the trainable
leaves, summed; (4) gradients reduced, unscaled, checked, clipped, applied. A non-finite step is skipped (by
torch.where; an in-place optimiser needs a host read of the finite flag, so no CUDA graph), the fp16 loss scale
halves and 'nonfinite' grows.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from retina_fn import precision as precision_lib
from retina_fn import tree
from retina_fn.optim import Optimizer, clip_by_global_norm

Reduce = Callable[[tree.Tree], tree.Tree]
TrainStep = Callable[[dict, Any], tuple[dict, dict]]
COMPILE_SCOPES = ("step", "gradients")


class Objective(Protocol):
    """What the step differentiates (module docstring)."""

    def prepare(self, batch: dict) -> tuple[Any, torch.Tensor]: ...

    def loss(self, params: dict, batch: dict, extras: Any, normalizer: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def loader_batches(batches) -> list[dict]:
    """A step's input as a list of loader batches: a dict is one batch, a tuple or list holds several."""
    groups = [batches] if isinstance(batches, dict) else list(batches)
    if not groups or not all(isinstance(b, dict) for b in groups):
        raise ValueError("a train step takes a batch dict or a non-empty tuple of batch dicts")
    return groups


def split_micro_batches(batch: tree.Tree, parts: int) -> list[tree.Tree]:
    """Splits every leaf of a tree ([B, ...], one B) along dim 0 into `parts` equal slices [B / parts, ...];
    ValueError when B is not a multiple of parts."""
    leaves = tree.leaves(batch)
    size = leaves[0].shape[0] if leaves else 0
    if parts < 1 or size % parts:
        raise ValueError(f"batch of {size} images cannot be split into optim.micro_batches={parts} equal "
                         f"micro-batches")
    if parts == 1:
        return [batch]
    chunked = [torch.chunk(x, parts) for x in leaves]
    return [tree.unflatten_leaves(batch, [c[i] for c in chunked]) for i in range(parts)]


def loss_divisors(normalizers: list[torch.Tensor], reduce: Reduce | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(what each of k loader batches divides its loss by, the normaliser in the metrics): 'global' (`reduce`
    given) the replicas' mean of the sum for every batch; 'local' k * N_b for batch b."""
    total = sum(normalizers[1:], normalizers[0])
    if reduce is not None:
        shared = reduce(total)
        return [shared] * len(normalizers), shared
    return [n * len(normalizers) for n in normalizers], total


def make_train_step(objective: Objective, optimizer: Optimizer, schedule: Callable[[torch.Tensor], torch.Tensor], *,
                    precision: precision_lib.Precision = precision_lib.precision_from_name("fp32"),
                    loss_scale: precision_lib.LossScaleSettings | None = None,
                    overflow_check: precision_lib.OverflowCheck = precision_lib.all_finite, micro_batches: int = 1,
                    clip_norm: float | None = None, reduce: Reduce | None = None, reduce_normalizer: bool = True,
                    device_type: str = "cpu", compile_fn: Callable[[Callable], Callable] | None = None,
                    compile_scope: str = "step") -> TrainStep:
    """Builds `train_step(state, batches) -> (new_state, metrics)` over retina_fn.train.state's state.

    schedule: step int64 [] -> lr float32 []; loss_scale: needed when precision scales the loss; overflow_check:
    check(grads, scale) -> bool []; reduce: a mean over replicas of a tree (None: one replica), for the normaliser
    too with reduce_normalizer; compile_fn (e.g. torch.compile) compiles compile_scope 'step' (all) or 'gradients'
    (steps 1 to 3). Metrics: the objective's plus 'normalizer', 'lr', 'grad_norm' (before clipping), 'loss_scale'
    (1 without scaling), 'finite' (1.0 when applied), 0-d, averaged over replicas.
    """
    if precision.loss_scaling and loss_scale is None:
        raise ValueError(f"precision {precision.name!r} scales the loss: pass loss_scale (train.loss_scale)")
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
    if reduce is None:  # one replica: the mean over replicas is the tree itself
        def reduce(x):
            return x
    reduce_normalizer_with = reduce if reduce_normalizer else None

    def scaled_loss(trainable, frozen, batch, extras, normalizer, scale):
        with precision_lib.autocast(precision, device_type):
            loss, metrics = objective.loss(tree.merge(trainable, frozen), batch, extras, normalizer)
        return (precision_lib.scale_loss(loss, scale) if precision.loss_scaling else loss), metrics

    grad_fn = torch.func.grad(scaled_loss, has_aux=True)  # with respect to the trainable leaves only

    def update(grads, state):
        """Unscale, check, clip and apply; a non-finite step keeps the old parameters and optimiser state."""
        scale = state["loss_scale"]
        if precision.loss_scaling:
            grads = precision_lib.unscale_grads(grads, scale)
        finite = overflow_check(grads, scale.scale if precision.loss_scaling else None)
        grads, grad_norm = clip_by_global_norm(grads, clip_norm)
        lr = schedule(state["step"])
        if optimizer.inplace:  # its update cannot be undone afterwards: decide on the host, before it
            params, opt_state = state["params"], state["opt"]
            if bool(finite):
                params, opt_state = optimizer.update(grads, opt_state, params, lr)
        else:
            new_params, new_opt = optimizer.update(grads, state["opt"], state["params"], lr)
            params, opt_state = precision_lib.select_tree(finite, (new_params, new_opt),
                                                          (state["params"], state["opt"]))
        if precision.loss_scaling:
            scale = precision_lib.update_loss_scale(scale, finite, loss_scale)
        return params, opt_state, scale, finite, grad_norm, lr

    def gradients(state: dict, batches) -> tuple[tree.Tree, dict, torch.Tensor]:
        """Steps 1 to 3: (summed gradients of this replica, summed metrics, the reported normaliser)."""
        groups = loader_batches(batches)
        prepared = [objective.prepare(b) for b in groups]
        divisors, normalizer = loss_divisors([n for _, n in prepared], reduce_normalizer_with)
        grads, metrics = None, None
        for batch, (extras, _), divisor in zip(groups, prepared, divisors):
            for mb, mb_extras in zip(split_micro_batches(batch, micro_batches),
                                     split_micro_batches(extras, micro_batches)):
                g, m = grad_fn(state["params"], state["frozen"], mb, mb_extras, divisor, state["loss_scale"])
                grads = g if grads is None else tree.map(torch.add, grads, g)
                metrics = m if metrics is None else tree.map(torch.add, metrics, m)
        return grads, metrics, normalizer

    if compile_fn is not None and compile_scope == "gradients":
        gradients = compile_fn(gradients)

    def train_step(state: dict, batches) -> tuple[dict, dict]:
        grads, metrics, normalizer = gradients(state, batches)
        params, opt_state, new_scale, finite, grad_norm, lr = update(reduce(grads), state)
        metrics = dict(metrics, normalizer=normalizer, lr=lr, grad_norm=grad_norm,
                       loss_scale=new_scale.scale if precision.loss_scaling else torch.ones_like(new_scale.scale),
                       finite=finite.to(torch.float32))
        new_state = dict(state, params=params, opt=opt_state, step=state["step"] + 1, loss_scale=new_scale,
                         nonfinite=torch.where(finite, torch.zeros_like(state["nonfinite"]), state["nonfinite"] + 1))
        return new_state, reduce(metrics)

    return compile_fn(train_step) if compile_fn is not None and compile_scope == "step" else train_step
