"""Canvas-exact computation (model.canvas_exact, retina_fn.extent): an image's detections, loss and
gradient do not depend on the canvas it sits on or on its batch companions.

The reference for each image is the image padded alone to a multiple of 32 (its tight canvas: what
mmdetection and torchvision run at batch size 1). Weights are random but non-degenerate: frozen-BN
statistics and affines drawn away from identity, the classification output scaled so logits spread
about 1 around -2.5 (many scores pass the 0.05 threshold, few saturate).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs import demo, retinanet_r50_fpn_1x_coco
from retina_fn import rng, tree
from retina_fn.data import transforms
from retina_fn.detector import Detector
from retina_fn.model import retinanet
from retina_fn.train import make_eval_step
from tests.detection_match import count_twins
from tests.model_fixtures import spec_of, eval_step_of

CANVASES = ((416, 672), (672, 416))


def small_1x_config():
    """mmdetection's 1x semantics (configs/retinanet_r50_fpn_1x_coco.py) at half the resolution."""
    cfg = retinanet_r50_fpn_1x_coco.get_config()
    cfg.data.scale = (667, 400)
    cfg.data.landscape_canvas, cfg.data.portrait_canvas = CANVASES
    return cfg


def nondegenerate_params(cfg, seed: int = 0) -> dict:
    params = retinanet.init(rng.key(seed), spec_of(cfg))
    g = torch.Generator().manual_seed(seed)
    for path, leaf in tree.leaves_with_paths(params["backbone"]):
        if path.endswith("running_mean"):
            leaf.uniform_(-0.3, 0.3, generator=g)
        elif path.endswith("running_var"):
            leaf.uniform_(0.5, 2.0, generator=g)
        elif leaf.dim() == 1:  # norm affines
            leaf.uniform_(0.5, 1.2, generator=g) if path.endswith("weight") else leaf.uniform_(-0.2, 0.2, generator=g)
    image = torch.randn(1, 3, *CANVASES[0], generator=g)
    with torch.no_grad():  # FPN and head biases are 0: the logits scale linearly with the last conv
        logits, deltas = retinanet.apply(params, image, spec_of(cfg))
    head = params["head"]
    head["cls_logits"]["weight"] /= float(logits.std())
    head["cls_logits"]["bias"].fill_(-2.5)
    head["bbox_reg"]["weight"] *= 0.3 / float(deltas.std())
    return params


def _detect(cfg, params, images, canvas: str):
    tcfg = transforms.TransformConfig.from_config(cfg.data)
    step = eval_step_of(cfg)
    out = []
    for img in images:
        s = transforms.preprocess_for_inference(img, tcfg, canvas, int(cfg.model.size_divisor))
        batch = {k: torch.from_numpy(np.asarray(s[k]))[None] for k in ("image", "image_hw", "scale_factor")}
        det = step(params, batch)
        n = int(det.valid[0].sum())
        out.append((det.boxes[0, :n].numpy(), det.scores[0, :n].numpy(), det.labels[0, :n].numpy()))
    return out


@pytest.mark.slow  # R50-FPN in float64
def test_1x_detections_on_the_fixed_canvas_equal_those_on_the_tight_canvas():
    cfg = small_1x_config()
    params = nondegenerate_params(cfg)
    gen = np.random.default_rng(0)
    sizes = ((300, 400), (500, 300), (200, 600), (50, 60))  # landscape, portrait, 3:1, small
    images = [gen.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    tight, fixed = _detect(cfg, params, images, "tight"), _detect(cfg, params, images, "fixed")
    cfg.model.canvas_exact = False
    unmasked = _detect(cfg, params, images, "fixed")
    for i, (ref, ours, old) in enumerate(zip(tight, fixed, unmasked)):
        top = min(100, len(ref[1]))
        assert top == 100  # a meaningful comparison
        twins, old_twins = count_twins(*ref, *ours), count_twins(*ref, *old)
        print(f"image {sizes[i]}: twins of the tight canvas's top-100: canvas-exact {twins}, unmasked {old_twins}")
        assert twins == top


def _loss_and_grad(cfg, params, image: torch.Tensor, canvas, boxes, labels):
    h, w = image.shape[-2:]
    canvas_image = torch.zeros(1, 3, *canvas, dtype=image.dtype)
    canvas_image[..., :h, :w] = image
    batch = dict(image=canvas_image, image_hw=torch.tensor([[h, w]]), boxes=boxes[None], labels=labels[None],
                 box_valid=torch.ones(1, len(boxes), dtype=torch.bool))
    detector = Detector(spec_of(cfg), [canvas])
    targets, normalizer = detector.prepare(batch)
    return torch.func.grad_and_value(lambda p: detector.loss(p, batch, targets, normalizer)[0])(params)


@pytest.mark.parametrize("name", [pytest.param("1x", marks=pytest.mark.slow), "demo"])
def test_loss_and_gradient_of_one_image_do_not_depend_on_its_canvas(name):
    """In float64: the random network's gradients are sums with heavy cancellation, so float32 rounding
    alone moves some leaves by 1e-3 (relative) between canvases; float64 shows the computation is the same."""
    cfg = small_1x_config() if name == "1x" else demo.get_config()
    if name == "1x":
        cfg.data.landscape_canvas, cfg.data.portrait_canvas = (256, 384), (384, 256)
        cfg.data.scale = (384, 256)
    params = tree.map(lambda x: x.double(), nondegenerate_params(cfg))
    h, w = (200, 210) if name == "1x" else (250, 200)
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 180.0], [100.0, 150.0, 180.0, 195.0], [0.0, 0.0, 40.0, 30.0]],
                         dtype=torch.float64)
    labels = torch.tensor([0, 1, 2]) % int(cfg.model.num_classes)
    tight = tuple(-(-v // 32) * 32 for v in (h, w))
    others = [tuple(cfg.data.landscape_canvas), tuple(cfg.data.portrait_canvas), (tight[0] + 64, tight[1] + 96)]
    canvases = [tight] + list(dict.fromkeys(c for c in others if c != tight))
    ref_grad, ref_loss = _loss_and_grad(cfg, params, image, canvases[0], boxes, labels)
    assert float(ref_loss) > 0
    for canvas in canvases[1:]:
        grad, loss = _loss_and_grad(cfg, params, image, canvas, boxes, labels)
        assert torch.allclose(loss, ref_loss, rtol=1e-12), (canvas, float(loss), float(ref_loss))
        worst = max(float((a - b).abs().max() / b.abs().max())
                    for a, b in zip(tree.leaves(grad), tree.leaves(ref_grad)) if b.abs().max() > 0)
        print(f"{name} canvas {canvas} vs tight {tight}: loss {float(loss):.9f}, worst relative grad error {worst:.1e}")
        assert worst < 1e-9
