"""Frozen batch norm folded into its convolution: same values and gradients as conv then BN."""

import pytest
import torch
import torch.nn.functional as F

from retina_fn import nn, rng, tree
from retina_fn.model import resnet
from retina_fn.spec import BackboneSpec


def random_conv_bn(c_out=6, c_in=4, k=3, conv_bias=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    conv = {"weight": torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)}
    if conv_bias:
        conv["bias"] = torch.randn(c_out, generator=g, dtype=torch.float64)
    bn = {"weight": torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5,
          "bias": torch.randn(c_out, generator=g, dtype=torch.float64),
          "running_mean": torch.randn(c_out, generator=g, dtype=torch.float64),
          "running_var": torch.rand(c_out, generator=g, dtype=torch.float64) + 0.1}
    return tree.cast(conv, dtype), tree.cast(bn, dtype)


def test_hand_case_one_channel_eps_zero():
    # conv weight 2, then BN: (z - 1) / sqrt(4) * 3 + 0.5 = z * 1.5 - 1  ->  folded weight 3, bias -1
    conv = {"weight": torch.tensor([[[[2.0]]]])}
    bn = {"weight": torch.tensor([3.0]), "bias": torch.tensor([0.5]), "running_mean": torch.tensor([1.0]),
          "running_var": torch.tensor([4.0])}
    folded = nn.fold_frozen_bn(conv, bn, eps=0.0)
    assert torch.equal(folded["weight"], torch.tensor([[[[3.0]]]]))
    assert torch.equal(folded["bias"], torch.tensor([-1.0]))
    x = torch.tensor([[[[1.0, 2.0, -4.0]]]])
    assert torch.equal(nn.conv_frozen_bn(conv, bn, x, eps=0.0), torch.tensor([[[[2.0, 5.0, -13.0]]]]))


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("eps,stride,padding", [(1e-5, 1, 1), (0.0, 2, 1), (1e-3, 2, 0)])
def test_folded_equals_conv_then_batch_norm_within_float32_rounding(conv_bias, eps, stride, padding):
    conv, bn = random_conv_bn(conv_bias=conv_bias, seed=1)
    x = torch.randn(2, 4, 11, 9, generator=torch.Generator().manual_seed(2))
    # the reference: torch's own conv and eval-mode batch_norm in float64
    c64, b64 = tree.cast(conv, torch.float64), tree.cast(bn, torch.float64)
    ref = F.batch_norm(F.conv2d(x.double(), c64["weight"], c64.get("bias"), stride=stride, padding=padding),
                       b64["running_mean"], b64["running_var"], b64["weight"], b64["bias"], training=False, eps=eps)
    folded = nn.conv_frozen_bn(conv, bn, x, eps, stride=stride, padding=padding)
    unfolded = nn.frozen_batch_norm(bn, nn.conv2d(conv, x, stride=stride, padding=padding), eps)
    scale = ref.abs().max()
    assert folded.dtype == torch.float32 and folded.shape == ref.shape
    assert float((folded.double() - ref).abs().max() / scale) < 2e-6
    assert float((unfolded.double() - ref).abs().max() / scale) < 2e-6


def test_gradients_reach_conv_weight_and_trainable_bn_affine_as_before():
    conv, bn = random_conv_bn(seed=3, dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = torch.randn(2, 6, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss(params, folded):
        c, b = params
        y = nn.conv_frozen_bn(c, b, x, 1e-5, padding=1) if folded else \
            nn.frozen_batch_norm(b, nn.conv2d(c, x, padding=1), 1e-5)
        return ((y.relu() - target) ** 2).sum()

    g_folded = torch.func.grad(loss)((conv, bn), True)
    g_plain = torch.func.grad(loss)((conv, bn), False)
    for path, a in tree.flatten_by_path({"conv": g_folded[0], "bn": g_folded[1]}).items():
        b = tree.flatten_by_path({"conv": g_plain[0], "bn": g_plain[1]})[path]
        assert a.abs().max() > 0, path
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), path


def test_channels_last_input_gives_channels_last_output_and_same_values():
    conv, bn = random_conv_bn(seed=6)
    x = torch.randn(2, 4, 10, 10, generator=torch.Generator().manual_seed(7))
    plain = nn.conv_frozen_bn(conv, bn, x, padding=1)
    nhwc = nn.conv_frozen_bn(conv, bn, x.contiguous(memory_format=torch.channels_last), padding=1)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert plain.is_contiguous()
    assert torch.allclose(plain, nhwc, rtol=1e-5, atol=1e-5)


def test_resnet_with_folding_equals_resnet_with_separate_batch_norm(monkeypatch):
    cfg = BackboneSpec(depth=18, style="pytorch", norm="frozen_bn", bn_eps=1e-5, gn_groups=32, base_width=64,
                       frozen_stages=1, norm_affine_trainable=False, channels_last=False)
    params = resnet.init(rng.key(0), cfg)
    g = torch.Generator().manual_seed(8)
    for path, leaf in tree.leaves_with_paths(params):  # non-trivial statistics and affines
        if path.endswith(("running_mean", "bias")):
            leaf.uniform_(-0.3, 0.3, generator=g)
        elif path.endswith("running_var") or ("bn" in path or "downsample/1" in path) and path.endswith("weight"):
            leaf.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(2, 3, 64, 64, generator=g)
    folded = resnet.apply(params, x, cfg)

    def separate(conv, norm, x, cfg, stride=1, padding=0, masks=None, out_stride=1, relu=False,
                 zero_outside_after=False):
        assert masks is None
        y = nn.frozen_batch_norm(norm, nn.conv2d(conv, x, stride=stride, padding=padding), float(cfg.bn_eps))
        return nn.relu(y) if relu else y

    monkeypatch.setattr(resnet, "_conv_norm", separate)
    plain = resnet.apply(params, x, cfg)
    for k in plain:
        rel = (folded[k] - plain[k]).abs().max() / plain[k].abs().max()
        assert float(rel) < 1e-5, k
