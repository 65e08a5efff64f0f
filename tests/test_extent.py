"""retina_fn.extent: the reference extent of each image and the masks derived from it (hand-computed)."""

from __future__ import annotations

import pytest
import torch

from retina_fn import extent


def test_padded_hw_rounds_each_image_up_alone_and_stops_at_the_canvas():
    image_hw = torch.tensor([[427, 640], [800, 1199], [1, 33]])
    pad = extent.padded_hw(image_hw, 32, (800, 1216))
    assert pad.tolist() == [[448, 640], [800, 1216], [32, 64]]
    with pytest.raises(ValueError, match="size_divisor"):
        extent.padded_hw(image_hw, 0, (800, 1216))


def test_level_extent_is_the_ceil_halved_size():
    pad = torch.tensor([[448, 640], [576, 1344]])
    # 448 -> 224 -> 112 -> 56 -> 28 -> 14 -> 7 -> 4 (P7 at stride 128: ceil(448 / 128) = 4)
    assert extent.level_extent(pad, 128).tolist() == [[4, 5], [5, 11]]
    assert extent.level_extent(pad, 64).tolist() == [[7, 10], [9, 21]]
    assert extent.level_extent(pad, 8).tolist() == [[56, 80], [72, 168]]


def test_extent_mask_marks_the_top_left_block_of_each_image():
    pad = torch.tensor([[64, 96], [32, 32]])
    m = extent.extent_mask(pad, 32, (3, 4))
    expected = torch.zeros(2, 3, 4, dtype=torch.bool)
    expected[0, :2, :3] = True
    expected[1, :1, :1] = True
    assert torch.equal(m, expected)


def test_masks_zero_outside_and_are_reused():
    masks = extent.ExtentMasks(torch.tensor([[32, 64]]))
    x = torch.ones(1, 2, 4, 4)
    y = masks.zero_outside(x, 16)
    assert y[0, :, :2, :4].eq(1).all() and y[0, :, 2:].eq(0).all()
    assert masks.mask(16, (4, 4)) is masks.mask(16, (4, 4))
    assert masks.mask(16, (4, 4)).dtype == torch.bool
    assert extent.zero_outside(x, None, 16) is x


@pytest.mark.parametrize("outside", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_value_outside_the_extent_never_reaches_the_image(outside):
    # An fp16 overflow outside an image's extent: zeroing must make it 0, not NaN (inf * 0), or the next 3x3
    # convolution reads it into the cells along the border.
    masks = extent.ExtentMasks(torch.tensor([[32, 32]]))
    x = torch.ones(1, 1, 4, 4)
    x[0, 0, 2:, :] = outside
    x[0, 0, :, 2:] = outside
    y = masks.zero_outside(x, 16)  # the extent at stride 16 is the top-left 2 x 2
    assert y[0, 0, :2, :2].eq(1).all() and y[0, 0, 2:].eq(0).all() and y[0, 0, :, 2:].eq(0).all()
    conv = torch.nn.functional.conv2d(y, torch.ones(1, 1, 3, 3), padding=1)
    assert conv[0, 0, :2, :2].tolist() == [[4.0, 4.0], [4.0, 4.0]]  # each inside cell sees the 2 x 2 block of ones
