"""Variants of our step: one optimisation undone (or a proposed one applied), timed beside the default.

A variant either overrides config fields (dotted paths, set with configs.common.override on a copy of the
config) or swaps a private function of the library for its older form while the variant is built and
called. Patching private functions is acceptable here and nowhere else: it is benchmark-only (it measures
what an optimisation inside the library buys, which no public switch turns off), and `patched` restores
the original on exit, also when the call raises, so no other subject or later code sees the change.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, NamedTuple

import torch

from configs import common
from retina_fn import extent, nn, postprocess
from retina_fn.model import resnet
from retina_fn.nn import layers


@contextlib.contextmanager
def patched(module, name: str, value):
    """Replaces `module.name` with `value` inside the context, restoring the original on exit.

    Args:
      module: the module holding the function.
      name: the attribute to replace.
      value: its stand-in.

    Returns:
      A context manager (yields nothing).
    """
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _separate_conv_bn(conv, norm, x, cfg, stride=1, padding=0, masks=None, out_stride=1, relu=False,
                      zero_outside_after=False):
    """resnet._conv_norm before BN folding: a conv, then the frozen BN as its own affine pass."""
    y = nn.conv2d(conv, x, stride=stride, padding=padding)
    if "running_mean" in norm:
        y = nn.frozen_batch_norm(norm, y, float(cfg.bn_eps))
        y = nn.relu(y) if relu else y
        return extent.zero_outside(y, masks, out_stride) if zero_outside_after else y
    gn_mask = None if masks is None else masks.mask(out_stride, y.shape[-2:], y.dtype)
    return nn.group_norm(norm, y, int(cfg.gn_groups), mask=gn_mask, relu=relu, zero_outside=zero_outside_after)


def _masked_group_norm_ops(x, weight, bias, mask, num_groups, eps=1e-5, relu=False, zero_outside=False):
    """nn.masked_group_norm before its hand-written backward: two-pass statistics, the affine, the ReLU and
    the zeroing in plain tensor ops, differentiated by autograd (about seven elementwise passes each way)."""
    b, c, h, w = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    grouped = x.to(dtype).reshape(b, num_groups, c // num_groups, h * w)
    m = mask.to(dtype).reshape(b, 1, 1, h * w)
    count = m.sum(dim=(2, 3), keepdim=True) * (c // num_groups)
    mean = (grouped * m).sum(dim=(2, 3), keepdim=True) / count
    centred = grouped - mean
    var = (centred * centred * m).sum(dim=(2, 3), keepdim=True) / count
    y = (centred * torch.rsqrt(var + eps)).reshape(b, c, h, w)
    y = (y * weight.to(dtype)[None, :, None, None] + bias.to(dtype)[None, :, None, None]).to(x.dtype)
    y = nn.relu(y) if relu else y
    return y * mask.to(y.dtype) if zero_outside else y


def _masked_gn_maps_ops(xs, weight, bias, masks, num_groups, eps=1e-5, relu=False, zero_outside=False):
    """nn.masked_group_norm_maps in the same older form, one map at a time."""
    return [_masked_group_norm_ops(x, weight, bias, m, num_groups, eps, relu, zero_outside) for x, m in zip(xs, masks)]


@contextlib.contextmanager
def _masked_gn_as_ops():
    """Both entry points of the masked GroupNorm (one map, several maps) in the older form."""
    with patched(layers, "masked_group_norm", _masked_group_norm_ops), \
            patched(layers, "masked_group_norm_maps", _masked_gn_maps_ops):
        yield


def _stable_sort_top_k(key: torch.Tensor, k: int) -> torch.Tensor:
    """postprocess._top_sorted before retina_fn.topk: a full stable sort, then the first k."""
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]


class Variant(NamedTuple):
    """One variant of our step.

    Attributes:
      doc: what changes (printed in the table and stored in the JSON).
      overrides: dotted config path -> value, applied to a copy of the config.
      patch: a context active while the variant is built and called (another code path).
    """

    doc: str
    overrides: Mapping[str, Any] = {}
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


VARIANTS: dict[str, Variant] = {
    "unfolded_bn": Variant("frozen BN applied after each conv as a separate affine (before folding)",
                           patch=lambda: patched(resnet, "_conv_norm", _separate_conv_bn)),
    "nchw": Variant("contiguous NCHW activations", {"model.backbone.channels_last": False}),
    "channels_last": Variant("channels_last activations", {"model.backbone.channels_last": True}),
    "all_trainable": Variant("stem and layer1 trainable too (frozen_stages=-1)", {"model.backbone.frozen_stages": -1}),
    "eager": Variant("no torch.compile at all", {"train.compile": False}),
    "compile_step": Variant("the whole step compiled (train.compile)", {"train.compile": True}),
    "cuda_graph": Variant("the train step and the eval forward as CUDA graphs (train.cuda_graph)",
                          {"train.cuda_graph": True}),
    "not_canvas_exact": Variant("no extent masks: features see the canvas's padding (model.canvas_exact=False)",
                                {"model.canvas_exact": False}),
    "masked_gn_ops": Variant("canvas-exact GroupNorm in plain tensor ops with autograd's backward (before "
                             "retina_fn.nn.masked_group_norm)",
                             patch=_masked_gn_as_ops),
    "sort_topk": Variant("post-processing's top-k by a full stable sort (before retina_fn.topk)",
                         patch=lambda: patched(postprocess, "_top_sorted", _stable_sort_top_k)),
}


def variant_setups(cfg, names: tuple[str, ...]) -> list[tuple[str, Any, Callable]]:
    """Our default step and the named variants, ready to build.

    Args:
      cfg: the run's config (left unchanged).
      names: keys of VARIANTS.

    Returns:
      [(subject name, config, patch)]: ('ours', cfg, nullcontext) first, then ('ours-<name>', an edited copy
      of cfg, the variant's patch) per name.
    """
    setups = [("ours", cfg, contextlib.nullcontext)]
    for name in names:
        variant = VARIANTS[name]
        variant_cfg = common.override(cfg.copy_and_resolve_references(), **variant.overrides)
        setups.append((f"ours-{name}", variant_cfg, variant.patch))
    return setups


def with_patch(patch: Callable[[], contextlib.AbstractContextManager], fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn, run inside a fresh `patch()` context on every call.

    Args:
      patch: a context factory (contextlib.nullcontext for none).
      fn: the call.

    Returns:
      The wrapped call.
    """
    def call():
        with patch():
            return fn()
    return call
