"""Anchor boxes for a fixed canvas, and per-image valid flags.

Order (mmdetection's, shared with the head outputs): levels P3..P7 concatenated; within a level, row i,
then column j, then anchor a = ratio_index * scales_per_octave + scale_index, i.e. flat index
(i * W + j) * n + a. Cell (0, 0) is centred at pixel (0, 0). Boxes are float32 (x1, y1, x2, y2).

Config fields (cfg = model_cfg.anchors):
  style: 'mmdet' (exact float sizes octave_base_scale * stride * 2**(i / scales_per_octave)) |
         'torchvision' (torchvision v1's AnchorGenerator: sizes truncated with int(), base-anchor corners
         rounded half-to-even, grid step canvas // feature size per axis)
  octave_base_scale, scales_per_octave, ratios (h / w), strides (one per level, powers of two)
model_cfg.size_divisor: images are padded to a multiple of it before valid flags are computed.

Everything here is cheap (a few milliseconds for an 800 x 1344 canvas); callers that call it every step
keep the result per canvas themselves. Nothing is cached in this module.
"""

from __future__ import annotations

import torch

from retina_fn import errors, extent

STYLES = ("mmdet", "torchvision")


def _ceil_div(a, b):
    """ceil(a / b) for non-negative integers (Python ints or integer tensors)."""
    return (a + b - 1) // b


def _check_canvas(canvas_hw) -> tuple[int, int]:
    if len(canvas_hw) != 2 or any(int(v) != v or v <= 0 for v in canvas_hw):
        raise ValueError(f"canvas_hw must be two positive integers (H, W), got {tuple(canvas_hw)}")
    return int(canvas_hw[0]), int(canvas_hw[1])


def _check_anchor_cfg(cfg) -> None:
    if cfg.style not in STYLES:
        raise errors.ConfigError(f"model.anchors.style must be one of {STYLES}, got {cfg.style!r}")
    if cfg.scales_per_octave < 1:
        raise errors.ConfigError(f"model.anchors.scales_per_octave must be >= 1, got {cfg.scales_per_octave}")
    if cfg.octave_base_scale <= 0:
        raise errors.ConfigError(f"model.anchors.octave_base_scale must be > 0, got {cfg.octave_base_scale}")
    if len(cfg.ratios) == 0 or any(r <= 0 for r in cfg.ratios):
        raise errors.ConfigError(f"model.anchors.ratios must be a non-empty tuple of positive h/w ratios, got "
                                 f"{cfg.ratios}")
    if len(cfg.strides) == 0:
        raise errors.ConfigError("model.anchors.strides must name at least one level")


def _halvings(stride: int) -> int:
    """log2(stride) for a power-of-two stride."""
    if int(stride) != stride or stride < 1 or (int(stride) & (int(stride) - 1)) != 0:
        raise errors.ConfigError(f"model.anchors.strides must be powers of two (stride-2 layers), got {stride}")
    return int(stride).bit_length() - 1


def level_sizes(canvas_hw, strides) -> tuple[tuple[int, int], ...]:
    """Feature-map (h, w) per level for a canvas (H, W): each stride-2 layer (padded conv or pool) maps a
    size n to ceil(n / 2), so a level of stride 2**k has size ceil-halved k times. For H, W divisible by
    the stride this is H / s; 800 x 1344 gives (100, 168), (50, 84), (25, 42), (13, 21), (7, 11)."""
    h, w = _check_canvas(canvas_hw)
    sizes = []
    for s in strides:
        fh, fw = h, w
        for _ in range(_halvings(s)):
            fh, fw = _ceil_div(fh, 2), _ceil_div(fw, 2)
        sizes.append((fh, fw))
    return tuple(sizes)


def anchors_per_cell(cfg) -> int:
    """Anchors per feature-map cell: len(ratios) * scales_per_octave."""
    return len(cfg.ratios) * int(cfg.scales_per_octave)


def _mmdet_base(stride: int, cfg) -> torch.Tensor:
    # float32 throughout, in mmdetection's operation order, so values match it bit for bit.
    scales = torch.tensor([cfg.octave_base_scale * 2.0 ** (i / cfg.scales_per_octave)
                           for i in range(cfg.scales_per_octave)], dtype=torch.float32)
    h_ratios = torch.sqrt(torch.tensor(cfg.ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def torchvision_sizes(stride: int, cfg) -> tuple[int, ...]:
    """torchvision v1's truncated anchor sizes for a level: int(octave_base_scale * stride * 2**(i / n)),
    e.g. (32, 40, 50) at stride 8 and (64, 80, 101) at stride 16."""
    base = cfg.octave_base_scale * stride
    return tuple(int(base * 2 ** (i / cfg.scales_per_octave)) for i in range(cfg.scales_per_octave))


def _torchvision_base(stride: int, cfg) -> torch.Tensor:
    sizes = torch.tensor(torchvision_sizes(stride, cfg), dtype=torch.float32)
    h_ratios = torch.sqrt(torch.tensor(cfg.ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=-1) / 2).round()  # torch.round: half to even


def base_anchors(stride: int, cfg) -> torch.Tensor:
    """The n = len(ratios) * scales_per_octave anchors of one cell, centred at 0: [n, 4] float32, ratio
    outer and scale inner. 'mmdet': w = stride * k / sqrt(r), h = stride * k * sqrt(r) for scale
    k = octave_base_scale * 2**(i / scales_per_octave). 'torchvision': the same shapes from the truncated
    sizes of `torchvision_sizes`, corners rounded to integers. cfg = model_cfg.anchors."""
    _check_anchor_cfg(cfg)
    return _mmdet_base(stride, cfg) if cfg.style == "mmdet" else _torchvision_base(stride, cfg)


def grid_anchors(level_hw, stride, base: torch.Tensor) -> torch.Tensor:
    """Anchors of one level: base [n, 4] shifted to every cell of an (h, w) map -> [h * w * n, 4], row i
    and column j offset by (j * sx, i * sy), flat index (i * w + j) * n + a.

    stride: an int, or an (sx, sy) pair (x step first, as mmdetection writes strides)."""
    sx, sy = (stride, stride) if isinstance(stride, (int, float)) else stride
    h, w = level_hw
    xs = torch.arange(w, dtype=torch.float32, device=base.device) * sx
    ys = torch.arange(h, dtype=torch.float32, device=base.device) * sy
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.to(torch.float32)[None, :, :]).reshape(-1, 4)


def _grid_strides(canvas_hw, sizes, cfg) -> list[tuple[int, int]]:
    """(sx, sy) grid step per level. torchvision derives it as canvas // feature size per axis, which
    differs from the nominal stride when the canvas is not a multiple of it (800 // 13 = 61 at P6)."""
    if cfg.style == "torchvision":
        return [(canvas_hw[1] // fw, canvas_hw[0] // fh) for fh, fw in sizes]
    return [(s, s) for s in cfg.strides]


def level_counts(canvas_hw, model_cfg) -> tuple[int, ...]:
    """Anchors per level (h * w * n), for splitting [B, A, ...] tensors back into levels."""
    n = anchors_per_cell(model_cfg.anchors)
    return tuple(h * w * n for h, w in level_sizes(canvas_hw, model_cfg.anchors.strides))


def anchors(canvas_hw, model_cfg, device: torch.device | str | None = None) -> torch.Tensor:
    """All anchors of a canvas (H, W): [A, 4] float32, levels P3..P7 concatenated in the order described
    in the module docstring. An 800 x 1344 canvas gives 201,600 anchors."""
    cfg = model_cfg.anchors
    _check_anchor_cfg(cfg)
    canvas_hw = _check_canvas(canvas_hw)
    sizes = level_sizes(canvas_hw, cfg.strides)
    steps = _grid_strides(canvas_hw, sizes, cfg)
    levels = [grid_anchors(hw, step, base_anchors(s, cfg))
              for hw, step, s in zip(sizes, steps, cfg.strides)]
    return torch.cat(levels, dim=0).to(device)


def level_bases(model_cfg, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """`base_anchors` of every level, in strides order: [n, 4] float32 each, on `device`."""
    return [base_anchors(s, model_cfg.anchors).to(device) for s in model_cfg.anchors.strides]


def image_anchors(canvas_hw, image_hw: torch.Tensor, model_cfg, bases: list[torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """Each image's anchors as the reference places them on that image padded alone: [B, A, 4] float32
    from image_hw [B, 2] int64, in `anchors`'s order on the canvas (cells outside the image's extent
    keep the grid running past it; `valid_flags` marks them).

    'mmdet' grids step by the nominal stride, so every row equals `anchors(canvas_hw)`. torchvision
    steps by (padded size) // (feature size) of the image it runs on, which at P6 / P7 depends on the
    padded size (800 // 13 = 61 at P6 for an 800-high image, 1344 // 21 = 64 on a 1344 canvas).

    bases: `level_bases` on image_hw's device, made once by the caller (None: made here, from host data)."""
    cfg = model_cfg.anchors
    _check_anchor_cfg(cfg)
    canvas_hw = _check_canvas(canvas_hw)
    if cfg.style != "torchvision":
        return anchors(canvas_hw, model_cfg, image_hw.device).unsqueeze(0).expand(image_hw.shape[0], -1, -1)
    pad_hw = extent.padded_hw(image_hw, int(model_cfg.size_divisor), canvas_hw)  # [B, 2]
    bases = level_bases(model_cfg, image_hw.device) if bases is None else bases
    levels = []
    for (fh, fw), s, base in zip(level_sizes(canvas_hw, cfg.strides), cfg.strides, bases):
        step = (pad_hw // extent.level_extent(pad_hw, int(s))).to(torch.float32)  # [B, 2] (sy, sx)
        ys = torch.arange(fh, dtype=torch.float32, device=image_hw.device)[None, :] * step[:, 0:1]  # [B, fh]
        xs = torch.arange(fw, dtype=torch.float32, device=image_hw.device)[None, :] * step[:, 1:2]  # [B, fw]
        yy, xx = ys[:, :, None].expand(-1, fh, fw), xs[:, None, :].expand(-1, fh, fw)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(image_hw.shape[0], -1, 1, 4)
        levels.append((shifts + base[None, None]).reshape(image_hw.shape[0], -1, 4))
    return torch.cat(levels, dim=1)


def valid_flags(canvas_hw, image_hw: torch.Tensor, model_cfg) -> torch.Tensor:
    """mmdetection's per-image anchor validity: [B, A] bool from image_hw [B, 2] int64 (resized (h, w)).

    Each image's pad shape is its size rounded up to a multiple of model_cfg.size_divisor (at most the
    canvas). At a level of stride s with an (fh, fw) map, cell (i, j) is valid when
    i < min(ceil(pad_h / s), fh) and j < min(ceil(pad_w / s), fw); the cell's n anchors share the flag.
    The flags use the nominal strides for both anchor styles (torchvision itself has no valid flags)."""
    cfg = model_cfg.anchors
    _check_anchor_cfg(cfg)
    canvas_hw = _check_canvas(canvas_hw)
    if image_hw.dim() != 2 or image_hw.shape[-1] != 2:
        raise ValueError(f"image_hw must have shape [B, 2], got {tuple(image_hw.shape)}")
    if image_hw.dtype.is_floating_point or image_hw.dtype == torch.bool:
        raise ValueError(f"image_hw must be an integer tensor, got {image_hw.dtype}")
    divisor = int(model_cfg.size_divisor)
    if divisor < 1:
        raise errors.ConfigError(f"model.size_divisor must be >= 1, got {model_cfg.size_divisor}")
    n = anchors_per_cell(cfg)
    pad_hw = extent.padded_hw(image_hw, divisor, canvas_hw)  # [B, 2]
    flags = []
    for (fh, fw), s in zip(level_sizes(canvas_hw, cfg.strides), cfg.strides):
        cell = extent.extent_mask(pad_hw, int(s), (fh, fw))  # [B, fh, fw]
        flags.append(cell[..., None].expand(-1, fh, fw, n).reshape(image_hw.shape[0], -1))
    return torch.cat(flags, dim=1)
