"""retina_fn.anchors against mmdetection's published test cases, hand-computed anchors, torchvision's sizes
(perf notes §1) and brute-force loops."""

from __future__ import annotations

import math

import dataclasses

import pytest
import torch

from configs.common import base_config
from retina_fn import anchors as anc
from retina_fn.spec import AnchorSpec, DetectorSpec
from tests.model_fixtures import spec_of


def anchor_cfg(**overrides) -> AnchorSpec:
    """The 1x recipe's anchors (mmdetection's), with some fields changed."""
    return dataclasses.replace(spec_of(base_config()).anchors, **overrides)


def model_cfg(**anchor_overrides) -> DetectorSpec:
    """The 1x recipe's detector spec with some anchor fields changed."""
    spec = spec_of(base_config())
    return spec.replace(anchors=dataclasses.replace(spec.anchors, **anchor_overrides))


# ----------------------------------------------------------------------------- mmdetection's T1 cases

def test_t1_single_anchor_grid():
    cfg = anchor_cfg(octave_base_scale=1.0, scales_per_octave=1, ratios=(1.0,), strides=(10,))
    base = anc.base_anchors(10, cfg)
    torch.testing.assert_close(base, torch.tensor([[-5.0, -5.0, 5.0, 5.0]]))
    expected = torch.tensor([[-5.0, -5.0, 5.0, 5.0], [5.0, -5.0, 15.0, 5.0],
                             [-5.0, 5.0, 5.0, 15.0], [5.0, 5.0, 15.0, 15.0]])
    torch.testing.assert_close(anc.grid_anchors((2, 2), 10, base), expected)


def test_t1_anisotropic_stride_is_x_then_y():
    cfg = anchor_cfg(octave_base_scale=1.0, scales_per_octave=1, ratios=(1.0,))
    base = anc.base_anchors(10, cfg)  # mmdetection's base size is the smaller stride
    expected = torch.tensor([[-5.0, -5.0, 5.0, 5.0], [5.0, -5.0, 15.0, 5.0],
                             [-5.0, 15.0, 5.0, 25.0], [5.0, 15.0, 15.0, 25.0]])
    torch.testing.assert_close(anc.grid_anchors((2, 2), (10, 20), base), expected)


# ----------------------------------------------------------------------------- level sizes and counts

def conv_out(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1


def network_level_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Feature sizes by walking the layers: stem 7x7/2 pad 3, max-pool 3x3/2 pad 1, 3x3/2 pad 1 convs for
    C3..C5 (the first block's stride) and for P6, P7."""
    def down(n, k, s, p):
        return conv_out(n, k, s, p)
    h, w = down(h, 7, 2, 3), down(w, 7, 2, 3)
    h, w = down(h, 3, 2, 1), down(w, 3, 2, 1)  # C2, stride 4
    sizes = []
    for _ in range(5):  # C3, C4, C5, P6, P7
        h, w = down(h, 3, 2, 1), down(w, 3, 2, 1)
        sizes.append((h, w))
    return sizes


def test_level_sizes_for_the_coco_canvas():
    assert anc.level_sizes((800, 1344), (8, 16, 32, 64, 128)) == (
        (100, 168), (50, 84), (25, 42), (13, 21), (7, 11))
    assert anc.level_sizes((1344, 800), (8, 16, 32, 64, 128)) == (
        (168, 100), (84, 50), (42, 25), (21, 13), (11, 7))


@pytest.mark.parametrize("canvas", [(800, 1344), (224, 320), (100, 131), (33, 7), (1, 1)])
def test_level_sizes_follow_the_network(canvas):
    assert list(anc.level_sizes(canvas, (8, 16, 32, 64, 128))) == network_level_sizes(*canvas)


def test_level_sizes_rejects_a_bad_canvas():
    with pytest.raises(ValueError, match="canvas_hw"):
        anc.level_sizes((0, 64), (8,))


def test_coco_canvas_has_201600_anchors():
    cfg = model_cfg()
    a = anc.anchors((800, 1344), cfg.anchors)
    assert a.shape == (201_600, 4) and a.dtype == torch.float32
    counts = anc.level_counts((800, 1344), cfg.anchors)
    assert counts == (100 * 168 * 9, 50 * 84 * 9, 25 * 42 * 9, 13 * 21 * 9, 7 * 11 * 9)
    assert sum(counts) == 201_600
    assert anc.anchors((800, 1344), model_cfg(style="torchvision").anchors).shape == (201_600, 4)


# ----------------------------------------------------------------------------- base anchors

def test_mmdet_base_anchors_at_stride_8_by_hand():
    base = anc.base_anchors(8, anchor_cfg())
    assert base.shape == (9, 4) and base.dtype == torch.float32
    scales = [4.0, 4.0 * 2 ** (1 / 3), 4.0 * 2 ** (2 / 3)]  # 4, 5.0397, 6.3496
    for ri, r in enumerate((0.5, 1.0, 2.0)):
        for si, k in enumerate(scales):
            w, h = 8 * k / math.sqrt(r), 8 * k * math.sqrt(r)
            assert base[ri * 3 + si].tolist() == pytest.approx([-w / 2, -h / 2, w / 2, h / 2], rel=1e-6)
    # the ratio 0.5, scale 4 anchor: w = 32 / sqrt(0.5) = 45.2548, h = 32 * sqrt(0.5) = 22.6274
    assert base[0].tolist() == pytest.approx([-22.6274, -11.3137, 22.6274, 11.3137], abs=1e-4)
    assert base[4].tolist() == pytest.approx([-20.1587, -20.1587, 20.1587, 20.1587], abs=1e-4)
    # ratio = h / w
    wh = base[:, 2:] - base[:, :2]
    torch.testing.assert_close(wh[:, 1] / wh[:, 0], torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3))


def test_torchvision_sizes_match_published_truncated_octaves():
    cfg = anchor_cfg(style="torchvision")
    sizes = [anc.torchvision_sizes(s, cfg) for s in cfg.strides]
    assert sizes == [(32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812)]


def test_torchvision_base_anchors_by_hand():
    cfg = anchor_cfg(style="torchvision")
    # P3, sizes (32, 40, 50): ratio 0.5 gives w = s * sqrt(2), h = s / sqrt(2), halves rounded:
    # 32 -> (22.63, 11.31) -> 46 x 22; 40 -> (28.28, 14.14); 50 -> (35.36, 17.68)
    expected_p3 = torch.tensor([
        [-23, -11, 23, 11], [-28, -14, 28, 14], [-35, -18, 35, 18],
        [-16, -16, 16, 16], [-20, -20, 20, 20], [-25, -25, 25, 25],
        [-11, -23, 11, 23], [-14, -28, 14, 28], [-18, -35, 18, 35]], dtype=torch.float32)
    torch.testing.assert_close(anc.base_anchors(8, cfg), expected_p3)
    # square anchors are size / 2 rounded half to even: 101 / 2 = 50.5 -> 50, 161 / 2 -> 80, 203 / 2 -> 102
    assert anc.base_anchors(16, cfg)[3:6, 2].tolist() == [32.0, 40.0, 50.0]
    assert anc.base_anchors(32, cfg)[3:6, 2].tolist() == [64.0, 80.0, 102.0]
    assert anc.base_anchors(128, cfg)[3:6, 2].tolist() == [256.0, 322.0, 406.0]
    # the mmdet P3 ratio-0.5 anchor is 45.25 x 22.63; torchvision's is 46 x 22
    tv, mm = anc.base_anchors(8, cfg)[0], anc.base_anchors(8, anchor_cfg())[0]
    assert (tv[2:] - tv[:2]).tolist() == [46.0, 22.0]
    assert (mm[2:] - mm[:2]).tolist() == pytest.approx([45.2548, 22.6274], abs=1e-4)


def test_torchvision_grid_step_is_canvas_over_feature_size():
    cfg = model_cfg(style="torchvision")
    a = anc.anchors((800, 1344), cfg.anchors)
    counts = anc.level_counts((800, 1344), cfg.anchors)
    p6_start, p7_start = sum(counts[:3]), sum(counts[:4])
    base6, base7 = anc.base_anchors(64, cfg.anchors), anc.base_anchors(128, cfg.anchors)
    # P6 is 13 x 21: step (1344 // 21, 800 // 13) = (64, 61); P7 is 7 x 11: (1344 // 11, 800 // 7) = (122, 114)
    cell = (1 * 21 + 1) * 9
    torch.testing.assert_close(a[p6_start + cell], base6[0] + torch.tensor([64.0, 61.0, 64.0, 61.0]))
    cell = (2 * 11 + 3) * 9 + 4
    torch.testing.assert_close(a[p7_start + cell], base7[4] + torch.tensor([3 * 122.0, 2 * 114.0] * 2))
    # on a canvas divisible by 128 the steps are the nominal strides
    b = anc.anchors((256, 384), cfg.anchors)
    last = b[-1]  # P7 cell (1, 2), anchor 8
    torch.testing.assert_close(last, base7[8] + torch.tensor([256.0, 128.0, 256.0, 128.0]))


# ----------------------------------------------------------------------------- order

@pytest.mark.parametrize("style", ["mmdet", "torchvision"])
def test_anchor_order_against_loop(style):
    cfg = model_cfg(style=style)
    canvas = (128, 256)  # divisible by 128, so both styles step by the nominal stride
    a = anc.anchors(canvas, cfg.anchors)
    offset = 0
    for (fh, fw), s in zip(anc.level_sizes(canvas, cfg.anchors.strides), cfg.anchors.strides):
        base = anc.base_anchors(s, cfg.anchors).tolist()
        for i in range(fh):
            for j in range(fw):
                for k in range(9):
                    expected = [base[k][0] + j * s, base[k][1] + i * s, base[k][2] + j * s, base[k][3] + i * s]
                    assert a[offset + (i * fw + j) * 9 + k].tolist() == pytest.approx(expected)
        offset += fh * fw * 9
    assert offset == a.shape[0]
    centres = (a[:, :2] + a[:, 2:]) / 2
    assert centres[0].tolist() == [0.0, 0.0]  # cell (0, 0) is centred at pixel 0, not s / 2


def test_anchors_device_argument():
    a = anc.anchors((64, 64), model_cfg().anchors, device="cpu")
    assert a.device.type == "cpu"


# ----------------------------------------------------------------------------- valid flags

def brute_force_flags(canvas, image_hw, cfg):
    sizes = anc.level_sizes(canvas, cfg.anchors.strides)
    n = anc.anchors_per_cell(cfg.anchors)
    out = []
    for h, w in image_hw:
        pad_h = min(math.ceil(h / cfg.size_divisor) * cfg.size_divisor, canvas[0])
        pad_w = min(math.ceil(w / cfg.size_divisor) * cfg.size_divisor, canvas[1])
        row = []
        for (fh, fw), s in zip(sizes, cfg.anchors.strides):
            vh, vw = min(math.ceil(pad_h / s), fh), min(math.ceil(pad_w / s), fw)
            for i in range(fh):
                for j in range(fw):
                    row.extend([i < vh and j < vw] * n)
        out.append(row)
    return torch.tensor(out, dtype=torch.bool)


@pytest.mark.parametrize("canvas", [(224, 320), (200, 264)])
def test_valid_flags_against_loop(canvas):
    cfg = model_cfg()
    image_hw = [(canvas[0], canvas[1]), (150, 301), (1, 1), (canvas[0], 97), (129, canvas[1] - 5)]
    flags = anc.valid_flags(canvas, torch.tensor(image_hw, dtype=torch.int64), cfg.anchors, cfg.size_divisor)
    assert flags.shape == (len(image_hw), anc.anchors(canvas, cfg.anchors).shape[0]) and flags.dtype == torch.bool
    assert torch.equal(flags, brute_force_flags(canvas, image_hw, cfg))
    assert flags[0].all()


def test_valid_flags_coco_counts_by_hand():
    cfg = model_cfg()
    flags = anc.valid_flags((800, 1344), torch.tensor([[800, 1333], [600, 800]]), cfg.anchors, cfg.size_divisor)
    assert flags[0].all()
    # 600 x 800 pads to 608 x 800; valid cells per level: 76x100, 38x50, 19x25, 10x13, 5x7
    assert flags[1].sum().item() == (7600 + 1900 + 475 + 130 + 35) * 9
    assert flags[1, :9].all() and not flags[1, 100 * 168 * 9 - 1]


def test_valid_flags_rejects_bad_image_hw():
    cfg = model_cfg()
    with pytest.raises(ValueError, match="image_hw"):
        anc.valid_flags((64, 64), torch.tensor([64, 64]), cfg.anchors, cfg.size_divisor)
    with pytest.raises(ValueError, match="image_hw"):
        anc.valid_flags((64, 64), torch.tensor([[64.0, 64.0]]), cfg.anchors, cfg.size_divisor)
