import math

import pytest
import torch
import torch.nn.functional as F

from retina_fn import nn, rng


def test_conv2d_matches_functional():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 7, generator=g)
    p = {"weight": torch.randn(5, 3, 3, 3, generator=g), "bias": torch.randn(5, generator=g)}
    y = nn.conv2d(p, x, stride=2, padding=1)
    assert torch.allclose(y, F.conv2d(x, p["weight"], p["bias"], stride=2, padding=1))
    assert nn.conv2d({"weight": p["weight"]}, x).shape == (2, 5, 7, 5)


def test_frozen_batch_norm_matches_eval_batch_norm():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 5, generator=g)
    p = {"weight": torch.rand(4, generator=g) + 0.5, "bias": torch.randn(4, generator=g),
         "running_mean": torch.randn(4, generator=g), "running_var": torch.rand(4, generator=g) + 0.1}
    ref = F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training=False, eps=1e-5)
    assert torch.allclose(nn.frozen_batch_norm(p, x, 1e-5), ref, atol=1e-6)


def test_frozen_batch_norm_hand_case_with_eps_zero():
    x = torch.tensor([[[[3.0]]], [[[5.0]]]])  # B=2, C=1
    p = {"weight": torch.tensor([2.0]), "bias": torch.tensor([1.0]),
         "running_mean": torch.tensor([1.0]), "running_var": torch.tensor([4.0])}
    # (x - 1) / 2 * 2 + 1
    assert torch.equal(nn.frozen_batch_norm(p, x, eps=0.0).flatten(), torch.tensor([3.0, 5.0]))


def test_group_norm_relu_pool_upsample():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 6, generator=g)
    p = {"weight": torch.rand(8, generator=g), "bias": torch.randn(8, generator=g)}
    assert torch.allclose(nn.group_norm(p, x, 4), F.group_norm(x, 4, p["weight"], p["bias"]))
    assert torch.equal(nn.relu(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([0.0, 0.0, 2.0]))
    pooled = nn.max_pool2d(torch.arange(16.0).reshape(1, 1, 4, 4))
    # 3x3 windows, stride 2, padding 1: the maxima at (1,1), (1,3), (3,1), (3,3)
    assert pooled.flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
    up = nn.upsample_nearest(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), (3, 4))
    assert up[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4]]


def test_initialisers_statistics_and_determinism():
    k = rng.key(0)
    w = nn.init.kaiming_normal_fan_out(k, (256, 128, 3, 3))
    assert torch.equal(w, nn.init.kaiming_normal_fan_out(k, (256, 128, 3, 3)))
    assert abs(float(w.mean())) < 0.002
    assert abs(float(w.std()) - math.sqrt(2.0 / (256 * 9))) / math.sqrt(2.0 / (256 * 9)) < 0.01
    bound = math.sqrt(6.0 / (128 * 9 + 256 * 9))
    x = nn.init.xavier_uniform(k, (256, 128, 3, 3))
    assert float(x.abs().max()) <= bound and float(x.abs().max()) > 0.99 * bound
    assert abs(float(x.var()) - bound**2 / 3) / (bound**2 / 3) < 0.01
    n = nn.init.normal(k, (100_000,), std=0.01)
    assert abs(float(n.std()) - 0.01) < 2e-4
    assert torch.equal(nn.init.constant((2,), 3.0), torch.tensor([3.0, 3.0]))


def test_prior_probability_bias():
    b = nn.init.prior_prob_bias((3,), 0.01)
    assert torch.allclose(b, torch.full((3,), -4.59512), atol=1e-5)
    assert torch.allclose(torch.sigmoid(b), torch.full((3,), 0.01))
    with pytest.raises(ValueError):
        nn.init.prior_prob_bias((1,), 1.0)


def test_masked_group_norm_equals_group_norm_of_the_cropped_map():
    g = torch.Generator().manual_seed(3)
    p = {"weight": torch.rand(8, generator=g) + 0.5, "bias": torch.randn(8, generator=g)}
    x = torch.randn(2, 8, 6, 7, generator=g) * 3 + 1
    mask = torch.zeros(2, 1, 6, 7)
    mask[0, :, :4, :5] = 1
    mask[1, :, :6, :3] = 1
    y = nn.group_norm(p, x, 4, mask=mask)
    for b, (h, w) in enumerate(((4, 5), (6, 3))):
        crop = F.group_norm(x[b:b + 1, :, :h, :w], 4, p["weight"], p["bias"])
        assert torch.allclose(y[b:b + 1, :, :h, :w], crop, rtol=1e-5, atol=1e-5)
    # what lies outside the mask cannot change what lies inside
    x2 = x.clone()
    x2[0, :, 4:, :] = 1e3
    assert torch.allclose(nn.group_norm(p, x2, 4, mask=mask)[0, :, :4, :5], y[0, :, :4, :5], atol=1e-6)


@pytest.mark.parametrize("weight_init", ["kaiming_fan_out", "xavier_uniform", "normal"])
def test_conv_init_on_meta_keys_has_the_real_shapes(weight_init):
    """A shapes-only template (a key on 'meta') gets empty tensors of exactly the real parameters' shapes and
    dtypes; an unknown init is refused there too."""
    real = nn.init.conv(rng.key(0), 8, 4, 3, weight_init, bias=True)
    with torch.device("meta"):
        meta = nn.init.conv(rng.key(0), 8, 4, 3, weight_init, bias=True)
        with pytest.raises(ValueError, match="unknown weight_init"):
            nn.init.conv(rng.key(0), 8, 4, 3, "orthogonal")
    assert {k: (v.shape, v.dtype, v.device.type) for k, v in meta.items()} == {
        k: (v.shape, v.dtype, "meta") for k, v in real.items()}
