import importlib.util

import pytest
import torch
from retina_fn.spec import BackboneSpec

from retina_fn import rng, tree
from retina_fn.model import resnet


def cfg(depth=50, style="pytorch", eps=1e-5, **fields):
    """A torchvision-layout ResNet's settings (frozen BN, 64 base channels) with some fields changed."""
    settings = dict(depth=depth, style=style, norm="frozen_bn", bn_eps=eps, gn_groups=32, base_width=64,
                    frozen_stages=1, norm_affine_trainable=True, channels_last=False)
    return BackboneSpec(**{**settings, **fields})


def param_count(params):
    return sum(x.numel() for p, x in tree.leaves_with_paths(params) if "running_" not in p)


@pytest.fixture(scope="module")
def r50():
    return resnet.init(rng.key(0), cfg())


def test_resnet50_parameter_count_and_shapes(r50):
    # torchvision's resnet50 has 25,557,032 parameters; its fc layer 2048*1000 + 1000 of them.
    assert param_count(r50) == 25_557_032 - 2_049_000 == 23_508_032
    feats = resnet.apply(r50, torch.randn(2, 3, 64, 96), cfg())
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "C2": (2, 256, 16, 24), "C3": (2, 512, 8, 12), "C4": (2, 1024, 4, 6), "C5": (2, 2048, 2, 3)}


@pytest.mark.parametrize("depth,expected", [(18, 11_689_512 - 513_000), (34, 21_797_672 - 513_000),
                                            (101, 44_549_160 - 2_049_000)])
def test_other_depths_parameter_counts(depth, expected):
    # torchvision's published totals minus the 1000-way classifier
    assert param_count(resnet.init(rng.key(0), cfg(depth))) == expected


def test_apply_is_pure_and_deterministic(r50):
    x = torch.randn(1, 3, 64, 64)
    x_copy, params_copy = x.clone(), tree.map(torch.clone, r50)
    a = resnet.apply(r50, x, cfg())
    b = resnet.apply(r50, x, cfg())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(x, x_copy) and tree.all_equal(r50, params_copy)


def test_caffe_style_moves_the_stride_to_the_first_conv():
    params = resnet.init(rng.key(1), cfg(50))
    x = torch.randn(1, 3, 64, 64)
    pt = resnet.apply(params, x, cfg(50, "pytorch"))
    caffe = resnet.apply(params, x, cfg(50, "caffe"))
    assert pt["C5"].shape == caffe["C5"].shape
    assert torch.equal(pt["C2"], caffe["C2"])  # stage 1 has no stride, so it is unaffected
    assert not torch.allclose(pt["C3"], caffe["C3"])


def test_torch_func_grad_matches_autograd_float64():
    c = cfg(18)
    params = tree.cast(resnet.init(rng.key(2), c), torch.float64)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)

    def f(p):
        return sum((v ** 2).mean() for v in resnet.apply(p, x, c).values())

    g_func = torch.func.grad(f)(params)
    leaves = {p: v.clone().requires_grad_(True) for p, v in tree.flatten_by_path(params).items()}
    loss = f(tree.unflatten_by_path(leaves))
    g_auto = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    g_flat = tree.flatten_by_path(g_func)
    for (path, _), ga in zip(leaves.items(), g_auto):
        expected = torch.zeros_like(g_flat[path]) if ga is None else ga
        assert torch.allclose(g_flat[path], expected, rtol=1e-10, atol=1e-12), path


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_features_equal_torchvision_resnet50():
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter

    from retina_fn.interop import resnet_from_torchvision

    net = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial statistics so the frozen BN is really exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    params = resnet_from_torchvision(net.state_dict(), cfg())
    body = IntermediateLayerGetter(net, {"layer1": "C2", "layer2": "C3", "layer3": "C4", "layer4": "C5"})
    for shape in ((1, 3, 224, 224), (2, 3, 160, 256)):
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = body(x)
            ours = resnet.apply(params, x, cfg())
        for k in ref:
            rel = (ours[k] - ref[k]).abs().max() / ref[k].abs().max()
            print(f"{k} {tuple(shape)} max relative error {float(rel):.2e}")
            assert rel < 1e-4, k


def test_group_norm_variant_and_base_width():
    c = cfg(depth=18, frozen_stages=-1, norm="gn", gn_groups=8, base_width=32)
    params = resnet.init(rng.key(3), c)
    assert "running_mean" not in params["bn1"]
    assert resnet.out_channels(c) == (32, 64, 128, 256)
    # GroupNorm has as many affine parameters as BN had; every conv is half as wide in each dimension
    frozen = resnet.init(rng.key(3), cfg(depth=18, frozen_stages=-1, base_width=32))
    assert param_count(params) == param_count(frozen)
    x = torch.randn(2, 3, 64, 64)
    feats = resnet.apply(params, x, c)
    assert feats["C5"].shape == (2, 256, 2, 2)
    # convs without bias followed by GroupNorm: the features do not depend on the input's scale
    scaled = resnet.apply(params, 7.0 * x, c)
    assert torch.allclose(scaled["C5"], feats["C5"], rtol=1e-3, atol=1e-4)

