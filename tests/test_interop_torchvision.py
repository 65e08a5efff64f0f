"""Parity with torchvision's own RetinaNet v1 (optional: skipped without torchvision).

torchvision's retinanet_resnet50_fpn is built without downloads (weights=None), its BatchNorm layers
swapped for FrozenBatchNorm2d with eps 0 as torchvision does when it loads the published COCO weights,
and every weight and statistic randomised (non-degenerate, with a classification bias that lets many
scores pass 0.05). Its state_dict goes through `from_torchvision`; features, head outputs and final
detections of our pipeline (transforms.torchvision_transform -> apply -> detect with the torchvision config
-> original pixels) are compared with torchvision's on a batch of a landscape and a portrait image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (optional parity tests)")

from configs import torchvision_retinanet_v1  # noqa: E402
from retina_fn import tree  # noqa: E402
from retina_fn.data import resize, transforms  # noqa: E402
from retina_fn.interop import COCO91_NAMES, from_torchvision, to_torchvision  # noqa: E402
from retina_fn.model import head, resnet, retinanet  # noqa: E402
from retina_fn.train import make_eval_step  # noqa: E402
from tests.golden.make_torchvision_golden import frozen_bn_everywhere  # noqa: E402
from tests.model_fixtures import spec_of, eval_step_of

MIN_SIZE, MAX_SIZE = 160, 256  # torchvision's min_size / max_size, small to keep the tests quick
IMAGE_SIZES = ((240, 320), (320, 213))  # (h, w): one landscape, one portrait


def _calibrate_branch(convs: list[torch.nn.Conv2d], last: torch.nn.Conv2d, levels: list[torch.Tensor],
                      target_std: float, bias: tuple[float, float]) -> None:
    """Scales each tower conv so its output has unit spread over all levels (the random backbone's
    features are far from unit scale), then each output channel of the last conv to `target_std`,
    with biases from U(*bias)."""
    h = levels
    for conv in convs:
        out = [conv(x) for x in h]
        std = torch.cat([o.flatten() for o in out]).std()
        conv.weight.div_(std)
        conv.bias.div_(std)
        h = [torch.relu(conv(x)) for x in h]
    per_channel = torch.cat([last(x).transpose(0, 1).flatten(1) for x in h], dim=1).std(dim=1)
    last.weight.mul_((target_std / per_channel)[:, None, None, None])  # every class equally likely
    last.bias.uniform_(*bias)


def bare_torchvision_model() -> torch.nn.Module:
    """torchvision's RetinaNet v1 as it runs the published weights: FrozenBatchNorm2d with eps 0, eval mode."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE)
    frozen_bn_everywhere(model.backbone.body)
    return model.eval()


def build_torchvision_model(seed: int = 0) -> torch.nn.Module:
    """`bare_torchvision_model` with random, calibrated weights: every pyramid level and head tower at
    unit spread, classification logits of unit spread per class around -2.5 (many scores pass 0.05, few
    saturate), box deltas of about 0.3, so detections are distinct boxes of many classes."""
    with torch.random.fork_rng(devices=[]):  # torchvision initialises from the global generator
        torch.manual_seed(seed)
        model = bare_torchvision_model()
        with torch.no_grad():
            for name, buf in model.backbone.body.named_buffers():
                if name.endswith("running_mean"):
                    buf.uniform_(-0.3, 0.3)
                elif name.endswith("running_var"):
                    buf.uniform_(0.5, 2.0)
                elif name.endswith("weight"):
                    buf.uniform_(0.5, 1.2)
                elif name.endswith("bias"):
                    buf.uniform_(-0.2, 0.2)
            body = model.backbone.body(torch.randn(1, 3, 256, 224))
            fpn = model.backbone.fpn
            level_convs = [b[0] for b in fpn.layer_blocks] + [fpn.extra_blocks.p6, fpn.extra_blocks.p7]
            for k, conv in enumerate(level_convs):  # unit spread per level (P6 follows P5, P7 follows P6)
                std = list(fpn(body).values())[k].std()
                conv.weight.div_(std)
                conv.bias.div_(std)
            levels = list(fpn(body).values())
            cls_head, reg_head = model.head.classification_head, model.head.regression_head
            _calibrate_branch([c[0] for c in cls_head.conv], cls_head.cls_logits, levels, 1.0, (-2.6, -2.4))
            _calibrate_branch([c[0] for c in reg_head.conv], reg_head.bbox_reg, levels, 0.3, (-0.1, 0.1))
    return model


@pytest.fixture(scope="module")
def setup():
    model = build_torchvision_model()
    cfg = torchvision_retinanet_v1.get_config()
    cfg.data.scale = (MAX_SIZE, MIN_SIZE)
    state_dict = model.state_dict()
    params = from_torchvision(state_dict, cfg.model)
    gen = np.random.default_rng(1)
    images = [gen.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]
    tensors = [torch.from_numpy(im).permute(2, 0, 1).to(torch.float32) / 255 for im in images]
    with torch.no_grad():
        padded = model.transform(tensors)[0].tensors
    return dict(model=model, cfg=cfg, params=params, state_dict=state_dict, images=images, tensors=tensors,
                padded=padded)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def test_state_dict_is_the_published_layout(setup):
    assert len(setup["state_dict"]) == 301  # FrozenBN: no num_batches_tracked, as in the v1 COCO file
    # our whole pipeline: the same padded batch as torchvision's transform produces
    assert tuple(setup["padded"].shape[-2:]) == resize.batch_canvas(
        [resize.torchvision_size(h, w, (MAX_SIZE, MIN_SIZE)) for h, w in IMAGE_SIZES])


def test_backbone_features_agree(setup):
    model, x = setup["model"], setup["padded"]
    body = model.backbone.body
    theirs, h = {}, x
    with torch.no_grad():
        for name, module in body.items():
            h = module(h)
            if name.startswith("layer"):
                theirs[f"C{int(name[-1]) + 1}"] = h
        ours = resnet.apply(setup["params"]["backbone"], x, setup["cfg"].model.backbone)
    for level in ("C2", "C3", "C4", "C5"):
        err = relative_error(ours[level], theirs[level])
        print(f"backbone {level} {tuple(theirs[level].shape)}: max relative error {err:.2e}")
        assert err < 1e-4, level


def test_fpn_and_head_outputs_agree(setup):
    model, x, cfg, params = setup["model"], setup["padded"], setup["cfg"], setup["params"]
    with torch.no_grad():
        theirs = list(model.backbone(x).values())
        ours = retinanet.features(params, x, spec_of(cfg))
        head_theirs = model.head(theirs)
        logits, deltas = head.apply(params["head"], ours, cfg.model.num_classes, cfg.model.head)
    for name, a, b in zip(("P3", "P4", "P5", "P6", "P7"), ours, theirs):
        err = relative_error(a, b)
        print(f"fpn {name} {tuple(b.shape)}: max relative error {err:.2e}")
        assert err < 1e-4, name
    for name, a, b in (("cls_logits", logits, head_theirs["cls_logits"]),
                       ("bbox_regression", deltas, head_theirs["bbox_regression"])):
        assert a.shape == b.shape, name
        err = relative_error(a, b)
        print(f"head {name} {tuple(b.shape)}: max relative error {err:.2e}")
        assert err < 1e-4, name


def test_detections_agree_end_to_end(setup):
    """torchvision run on a batch pads both images to the batch's size and computes on that padding: its
    batched answer is reproduced with model.canvas_exact off (each image alone: the golden-file tests)."""
    model, params, images = setup["model"], setup["params"], setup["images"]
    cfg = setup["cfg"].copy_and_resolve_references()
    cfg.model.canvas_exact = False
    with torch.no_grad():
        theirs = model(setup["tensors"])
    sizes = [resize.torchvision_size(h, w, tuple(cfg.data.scale)) for h, w in IMAGE_SIZES]
    canvas = resize.batch_canvas(sizes, int(cfg.model.size_divisor))
    empty = np.zeros((0, 4), np.float32)
    samples = [transforms.torchvision_transform(im, empty, empty, cfg.data, flip=False, canvas_hw=canvas)
               for im in images]
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in ("image", "image_hw", "scale_factor")}
    assert torch.equal(batch["image"], setup["padded"])  # our preprocessing, bit for bit
    ours = eval_step_of(cfg)(params, batch)

    worst_box = worst_score = 0.0
    for i, ref in enumerate(theirs):
        n = int(ours.valid[i].sum())
        boxes, scores, labels = ours.boxes[i, :n], ours.scores[i, :n], ours.labels[i, :n]
        count = ref["scores"].shape[0]
        print(f"image {i} {IMAGE_SIZES[i]}: torchvision {count} detections, ours {n}")
        assert count > 50  # a meaningful comparison, not a handful of boxes
        assert abs(n - count) <= 1
        used = torch.zeros(n, dtype=torch.bool)
        proper = 0  # matched boxes wider and taller than a pixel (not squeezed flat by clipping)
        lowest = float(ref["scores"].min())
        for box, score, label in zip(ref["boxes"], ref["scores"], ref["labels"]):
            box_err = (boxes - box).abs().max(dim=1).values
            score_err = (scores - score).abs()
            match = (labels == label) & (box_err < 0.01) & (score_err < 1e-4) & ~used
            if not match.any():
                # only a box at the max_per_img cut may be swapped for an equally scored one
                assert float(score) - lowest < 1e-4, (i, box.tolist(), float(score), int(label))
                continue
            j = int(torch.nonzero(match)[0])
            used[j] = True
            proper += int(bool((box[2:] - box[:2] > 1.0).all()))
            worst_box = max(worst_box, float(box_err[j]))
            worst_score = max(worst_score, float(score_err[j]))
        print(f"image {i}: {proper} matched boxes larger than 1 x 1 px")
        assert proper >= 100
    print(f"detections: max box error {worst_box:.2e} px, max score error {worst_score:.2e}")


def test_export_loads_strictly_into_torchvision(setup):
    model, cfg, params, x = setup["model"], setup["cfg"], setup["params"], setup["padded"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        fresh = bare_torchvision_model()
    fresh.load_state_dict(to_torchvision(params, cfg.model), strict=True)
    with torch.no_grad():
        a = model.head(list(model.backbone(x).values()))
        b = fresh.head(list(fresh.backbone(x).values()))
    assert torch.equal(a["cls_logits"], b["cls_logits"]) and torch.equal(a["bbox_regression"], b["bbox_regression"])
    assert tree.all_equal(from_torchvision(fresh.state_dict(), cfg.model), params)


def test_coco_names_match_torchvision():
    from torchvision.models import _meta

    assert tuple(_meta._COCO_CATEGORIES) == COCO91_NAMES


def test_predict_with_torchvision_weights_matches_torchvision(setup, tmp_path):
    """experiments/predict.py on a torchvision state_dict file, each image on its own padded size
    (--canvas=tight), against torchvision on one image at a time; category id = torchvision's label."""
    from PIL import Image

    from experiments import predict

    model, cfg = setup["model"], setup["cfg"]
    weights = tmp_path / "retinanet_tv.pth"
    torch.save(setup["state_dict"], weights)
    paths = []
    for i, image in enumerate(setup["images"]):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(image).save(paths[-1])
    dets, category_ids, names, _ = predict.predict(cfg, str(weights), paths, canvas_mode="tight", device="cpu")
    assert category_ids == tuple(range(91)) and names == COCO91_NAMES
    results = predict.to_results(dets, paths, category_ids)
    for i, tensor in enumerate(setup["tensors"]):
        with torch.no_grad():
            ref = model([tensor])[0]
        mine = [r for r in results if r["image_id"] == i]
        assert len(mine) == ref["scores"].shape[0] > 50
        for r, box, score, label in zip(mine, ref["boxes"], ref["scores"], ref["labels"]):
            x, y, w, h = r["bbox"]
            assert r["category_id"] == int(label) and abs(r["score"] - float(score)) < 1e-5
            assert np.allclose([x, y, x + w, y + h], box.tolist(), atol=1e-2)
