"""Anchor boxes for a fixed canvas, and per-image valid flags.

Order (mmdetection's, shared with the head outputs): levels P3..P7 concatenated; within a level, row i,
then column j, then anchor a = ratio_index * scales_per_octave + scale_index, i.e. flat index
(i * W + j) * n + a. Cell (0, 0) is centred at pixel (0, 0). Boxes are float32 (x1, y1, x2, y2).

style 'mmdet': exact float sizes octave_base_scale * stride * 2**(i / scales_per_octave); 'torchvision' (v1's
AnchorGenerator): sizes truncated with int(), corners rounded half-to-even, grid step canvas // feature size.
Nothing is cached here.
"""

from __future__ import annotations

import torch

from retina_fn import extent
from retina_fn.spec import AnchorSpec


def _check_canvas(canvas_hw) -> tuple[int, int]:
    if len(canvas_hw) != 2 or any(int(v) != v or v <= 0 for v in canvas_hw):
        raise ValueError(f"canvas_hw must be two positive integers (H, W), got {tuple(canvas_hw)}")
    return int(canvas_hw[0]), int(canvas_hw[1])


def level_sizes(canvas_hw, strides) -> tuple[tuple[int, int], ...]:
    """Feature-map (h, w) per level for a canvas (H, W): each stride-2 layer maps n to ceil(n / 2), and
    ceil-halving k times is ceil(n / 2**k); 800 x 1344 gives (100, 168), (50, 84), (25, 42), (13, 21), (7, 11)."""
    h, w = _check_canvas(canvas_hw)
    halvings = [1 << (int(s).bit_length() - 1) for s in strides]  # 2**k for a stride of 2**k
    return tuple((-(-h // d), -(-w // d)) for d in halvings)


def anchors_per_cell(spec: AnchorSpec) -> int:
    """Anchors per feature-map cell: len(ratios) * scales_per_octave."""
    return len(spec.ratios) * int(spec.scales_per_octave)


def _mmdet_base(stride: int, spec: AnchorSpec) -> torch.Tensor:
    # float32 throughout, in mmdetection's operation order, so values match it bit for bit.
    scales = torch.tensor([spec.octave_base_scale * 2.0 ** (i / spec.scales_per_octave)
                           for i in range(spec.scales_per_octave)], dtype=torch.float32)
    h_ratios = torch.sqrt(torch.tensor(spec.ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def torchvision_sizes(stride: int, spec: AnchorSpec) -> tuple[int, ...]:
    """torchvision v1's truncated anchor sizes for a level: int(octave_base_scale * stride * 2**(i / n)),
    e.g. (32, 40, 50) at stride 8 and (64, 80, 101) at stride 16."""
    base = spec.octave_base_scale * stride
    return tuple(int(base * 2 ** (i / spec.scales_per_octave)) for i in range(spec.scales_per_octave))


def _torchvision_base(stride: int, spec: AnchorSpec) -> torch.Tensor:
    sizes = torch.tensor(torchvision_sizes(stride, spec), dtype=torch.float32)
    h_ratios = torch.sqrt(torch.tensor(spec.ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=-1) / 2).round()  # torch.round: half to even


def base_anchors(stride: int, spec: AnchorSpec) -> torch.Tensor:
    """The n = len(ratios) * scales_per_octave anchors of one cell, centred at 0: [n, 4] float32, ratio
    outer and scale inner. 'mmdet': w = stride * k / sqrt(r), h = stride * k * sqrt(r) for scale
    k = octave_base_scale * 2**(i / scales_per_octave). 'torchvision': the same shapes from the truncated
    sizes of `torchvision_sizes`, corners rounded to integers."""
    return _mmdet_base(stride, spec) if spec.style == "mmdet" else _torchvision_base(stride, spec)


def grid_anchors(level_hw, stride, base: torch.Tensor) -> torch.Tensor:
    """Anchors of one level: base [n, 4] shifted to every cell of an (h, w) map -> [h * w * n, 4], row i and
    column j offset by (j * sx, i * sy); stride an int or an (sx, sy) pair (x first, as mmdetection writes it)."""
    sx, sy = (stride, stride) if isinstance(stride, (int, float)) else stride
    h, w = level_hw
    xs = torch.arange(w, dtype=torch.float32, device=base.device) * sx
    ys = torch.arange(h, dtype=torch.float32, device=base.device) * sy
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.to(torch.float32)[None, :, :]).reshape(-1, 4)


def _grid_strides(canvas_hw, sizes, spec: AnchorSpec) -> list[tuple[int, int]]:
    """(sx, sy) grid step per level; torchvision's is canvas // feature size (800 // 13 = 61 at P6)."""
    if spec.style == "torchvision":
        return [(canvas_hw[1] // fw, canvas_hw[0] // fh) for fh, fw in sizes]
    return [(s, s) for s in spec.strides]


def level_counts(canvas_hw, spec: AnchorSpec) -> tuple[int, ...]:
    """Anchors per level (h * w * n), for splitting [B, A, ...] tensors back into levels."""
    n = anchors_per_cell(spec)
    return tuple(h * w * n for h, w in level_sizes(canvas_hw, spec.strides))


def anchors(canvas_hw, spec: AnchorSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """All anchors of a canvas (H, W): [A, 4] float32 in the module docstring's order."""
    canvas_hw = _check_canvas(canvas_hw)
    sizes = level_sizes(canvas_hw, spec.strides)
    steps = _grid_strides(canvas_hw, sizes, spec)
    levels = [grid_anchors(hw, step, base_anchors(s, spec))
              for hw, step, s in zip(sizes, steps, spec.strides)]
    return torch.cat(levels, dim=0).to(device)


def level_bases(spec: AnchorSpec, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """`base_anchors` of every level, in strides order: [n, 4] float32 each, on `device`."""
    return [base_anchors(s, spec).to(device) for s in spec.strides]


def image_anchors(canvas_hw, image_hw: torch.Tensor, spec: AnchorSpec, size_divisor: int,
                  bases: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Each image's anchors as the reference places them on that image padded alone: [B, A, 4] float32 from
    image_hw int64 [B, 2], in `anchors`'s order on the canvas (cells outside the extent continue the grid).

    'mmdet' grids step by the nominal stride, so every row equals `anchors(canvas_hw)`; torchvision steps by
    (padded size) // (feature size), which at P6 / P7 depends on the image's padded size.
    bases: `level_bases` on image_hw's device, made once by the caller (None: made here, from host data)."""
    canvas_hw = _check_canvas(canvas_hw)
    if spec.style != "torchvision":
        return anchors(canvas_hw, spec, image_hw.device).unsqueeze(0).expand(image_hw.shape[0], -1, -1)
    pad_hw = extent.padded_hw(image_hw, int(size_divisor), canvas_hw)  # [B, 2]
    bases = level_bases(spec, image_hw.device) if bases is None else bases
    levels = []
    for (fh, fw), s, base in zip(level_sizes(canvas_hw, spec.strides), spec.strides, bases):
        step = (pad_hw // extent.level_extent(pad_hw, int(s))).to(torch.float32)  # [B, 2] (sy, sx)
        ys = torch.arange(fh, dtype=torch.float32, device=image_hw.device)[None, :] * step[:, 0:1]  # [B, fh]
        xs = torch.arange(fw, dtype=torch.float32, device=image_hw.device)[None, :] * step[:, 1:2]  # [B, fw]
        yy, xx = ys[:, :, None].expand(-1, fh, fw), xs[:, None, :].expand(-1, fh, fw)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(image_hw.shape[0], -1, 1, 4)
        levels.append((shifts + base[None, None]).reshape(image_hw.shape[0], -1, 4))
    return torch.cat(levels, dim=1)


def valid_flags(canvas_hw, image_hw: torch.Tensor, spec: AnchorSpec, size_divisor: int) -> torch.Tensor:
    """mmdetection's per-image anchor validity: bool [B, A] from image_hw int64 [B, 2] (resized (h, w)).

    With pad the image's size rounded up to a multiple of `size_divisor` (at most the canvas), cell (i, j) of
    a level of stride s is valid when i < ceil(pad_h / s) and j < ceil(pad_w / s); its n anchors share the
    flag. Nominal strides for both anchor styles (torchvision itself has no valid flags)."""
    canvas_hw = _check_canvas(canvas_hw)
    if image_hw.dim() != 2 or image_hw.shape[-1] != 2:
        raise ValueError(f"image_hw must have shape [B, 2], got {tuple(image_hw.shape)}")
    if image_hw.dtype.is_floating_point or image_hw.dtype == torch.bool:
        raise ValueError(f"image_hw must be an integer tensor, got {image_hw.dtype}")
    n = anchors_per_cell(spec)
    pad_hw = extent.padded_hw(image_hw, int(size_divisor), canvas_hw)  # [B, 2]
    flags = []
    for (fh, fw), s in zip(level_sizes(canvas_hw, spec.strides), spec.strides):
        cell = extent.extent_mask(pad_hw, int(s), (fh, fw))  # [B, fh, fw]
        flags.append(cell[..., None].expand(-1, fh, fw, n).reshape(image_hw.shape[0], -1))
    return torch.cat(flags, dim=1)
