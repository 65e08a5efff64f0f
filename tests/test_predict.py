"""experiments/predict.py: COCO-format detections and drawings for image files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import predict
from retina_fn import anchors as anchor_lib
from retina_fn import checkpoint, rng, schema
from retina_fn.data import transforms
from retina_fn.interop import to_torchvision
from retina_fn.model import retinanet
from retina_fn.postprocess import detect
from retina_fn.predictor import Predictor
from tests.model_fixtures import spec_of, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL_MAP = {"category_ids": [1, 3, 7], "names": ["cat", "dog", "fox"]}

# The command line reads configs from files; this one gives the tests' config.
CONFIG_FILE = """
from tests.test_predict import config as get_config
"""


def config():
    cfg = tiny_config(num_classes=3, canvas=(64, 96))
    cfg.model.backbone.base_width = 8
    cfg.data.scale = (96, 64)
    cfg.data.eval_images_per_device = 2
    cfg.model.test.max_per_img = 20
    cfg.dist.device = "cpu"
    return cfg


def lively_params(cfg) -> dict:
    """Random params whose scores sit around 0.5, so every image has detections."""
    params = retinanet.init(rng.key(0), spec_of(cfg))
    params["head"]["cls_logits"]["bias"] = torch.linspace(-1.0, 1.0, params["head"]["cls_logits"]["bias"].numel())
    params["head"]["bbox_reg"]["weight"] = params["head"]["bbox_reg"]["weight"] * 20
    return params


def labelled_checkpoint(root, cfg) -> tuple[dict, str]:
    """`lively_params` of cfg saved as a checkpoint under root/run with its spec and LABEL_MAP, as training saves
    one; (params, its path)."""
    params = lively_params(cfg)
    trainable, frozen = retinanet.split_trainable(params, spec_of(cfg))
    spec = schema.detector_spec(cfg, LABEL_MAP["category_ids"], LABEL_MAP["names"])
    return params, checkpoint.save(str(root / "run"), 7, {"params": trainable, "frozen": frozen},
                                   meta={"spec": spec.to_json()})


def run_predict(cfg, weights, paths, **options):
    """The program's path: a Predictor of the weights (with cfg, or alone for cfg None) on image files;
    (detections, category ids, class names, decoded images)."""
    predictor = Predictor(weights, cfg, device="cpu", **options)
    found, images = predict.predict_files(predictor, paths)
    return found, predictor.category_ids, predictor.names, images


def preprocess(image, cfg, canvas_mode="fixed"):
    """The evaluation transform of a config on one image."""
    return transforms.preprocess_for_inference(image, transforms.TransformConfig.from_config(cfg.data), canvas_mode,
                                               int(cfg.model.size_divisor))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    cfg = config()
    params, ckpt = labelled_checkpoint(root, cfg)
    gen = np.random.default_rng(0)
    sizes = {"wide.jpg": (48, 64), "tall.png": (70, 40)}
    images = {}
    for name, (h, w) in sizes.items():
        pixels = gen.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        images[name] = np.array(Image.open(root / name).convert("RGB"))
    (root / "copy").mkdir()
    Image.fromarray(images["wide.jpg"]).save(root / "copy" / "wide.png")  # same pixels, lossless
    images["copy/wide.png"] = images["wide.jpg"]
    (root / "tiny.py").write_text(CONFIG_FILE)
    return dict(root=root, cfg=cfg, params=params, ckpt=ckpt, images=images)


def coco_ground_truth(path, images: dict, paths: list[str]) -> str:
    """A small COCO file whose image ids are the positions in `paths`, one box per image."""
    entries, anns = [], []
    for i, p in enumerate(paths):
        h, w = images[p].shape[:2]
        entries.append({"id": i, "file_name": os.path.basename(p), "height": h, "width": w})
        anns.append({"id": i + 1, "image_id": i, "category_id": LABEL_MAP["category_ids"][i % 3],
                     "bbox": [2.0, 3.0, w / 2, h / 2], "area": w * h / 4, "iscrowd": 0})
    cats = [{"id": c, "name": n} for c, n in zip(LABEL_MAP["category_ids"], LABEL_MAP["names"])]
    with open(path, "w") as f:
        json.dump({"images": entries, "annotations": anns, "categories": cats}, f)
    return str(path)


def test_results_are_valid_coco_in_original_pixels(files, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, cfg = files["root"], files["cfg"]
    names = ["wide.jpg", "tall.png", "copy/wide.png"]
    paths = [str(root / n) for n in names]
    dets, cat_ids, class_names, images = run_predict(cfg, files["ckpt"], paths)
    assert cat_ids == (1, 3, 7) and class_names == ("cat", "dog", "fox")
    out = tmp_path / "out" / "dets.json"
    results = predict.write_outputs(dets, paths, cat_ids, class_names, images, str(out), str(tmp_path / "vis"), 0.3)
    written = json.loads(out.read_text())
    assert written == results and len(written) > 0

    for i, name in enumerate(names):
        mine = [r for r in written if r["image_id"] == i]
        assert 0 < len(mine) <= cfg.model.test.max_per_img
        h, w = files["images"][name].shape[:2]
        for r in mine:
            x, y, bw, bh = r["bbox"]
            assert r["file_name"] == os.path.basename(name)
            assert r["category_id"] in (1, 3, 7) and 0.05 < r["score"] <= 1
            assert -1e-3 <= x and x + bw <= w + 1e-3 and -1e-3 <= y and y + bh <= h + 1e-3 and bw >= 0 and bh >= 0
    # the same pixels under another name and position give the same detections
    strip = lambda rs: [(r["category_id"], r["bbox"], r["score"]) for r in rs]  # noqa: E731
    assert strip([r for r in written if r["image_id"] == 0]) == strip([r for r in written if r["image_id"] == 2])

    gt = COCO(coco_ground_truth(tmp_path / "gt.json", files["images"], names))
    evaluator = COCOeval(gt, gt.loadRes(str(out)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert len(evaluator.stats) == 12

    # a repeated file stem gets the image's position appended
    assert sorted(os.listdir(tmp_path / "vis")) == ["tall.png", "wide_0.png", "wide_2.png"]
    for png_name, name in (("wide_0.png", "wide.jpg"), ("tall.png", "tall.png"), ("wide_2.png", "copy/wide.png")):
        png = Image.open(tmp_path / "vis" / png_name)
        h, w = files["images"][name].shape[:2]
        assert png.size == (w, h) and png.format == "PNG"
    drawn = np.asarray(Image.open(tmp_path / "vis" / "tall.png").convert("RGB"))
    assert (drawn != files["images"]["tall.png"]).any()  # boxes were drawn (scores reach 0.3)


def test_boxes_match_a_hand_rescaled_forward_pass(files, tmp_path):
    """predict's boxes = the model's boxes on a canvas built by hand, divided by the hand-computed scale.

    Nothing of the input pipeline is reused: the size follows mmdetection's rule written out here, and
    the image is made so that its bilinear resize (half-pixel centres, edges clamped) is exact integers,
    worked out with np.interp: pixel = R[row] + C[col] with R a multiple of 8 (72 -> 96 rows: weights in
    eighths) and C in {0, 106} (40 -> 53 columns: weights in 106ths), so no uint8 rounding rule enters.
    sx = 53 / 40 differs from sy = 96 / 72, so swapped or unrounded scale factors show."""
    cfg, params = files["cfg"], files["params"]
    h, w = 72, 40
    gen = np.random.default_rng(1)
    rows = gen.integers(0, 19, size=(h, 3)) * 8  # 0..144
    cols = gen.integers(0, 2, size=(w, 3)) * 106  # 0 or 106: pixels stay <= 250
    image = (rows[:, None, :] + cols[None, :, :]).astype(np.uint8)
    path = str(tmp_path / "ramps.png")
    Image.fromarray(image).save(path)
    dets, *_ = run_predict(cfg, files["ckpt"], [path])

    s = min(96 / 72, 64 / 40)  # data.scale = (96, 64): long side <= 96, short side <= 64
    new_h, new_w = int(h * s + 0.5), int(w * s + 0.5)
    assert (new_h, new_w) == (96, 53)
    src_y = (np.arange(new_h) + 0.5) * h / new_h - 0.5
    src_x = (np.arange(new_w) + 0.5) * w / new_w - 0.5
    resized = np.stack([np.interp(src_y, np.arange(h), rows[:, c])[:, None]
                        + np.interp(src_x, np.arange(w), cols[:, c])[None, :] for c in range(3)])
    assert np.abs(resized - np.rint(resized)).max() < 1e-9
    mean, std = np.array(cfg.data.mean)[:, None, None], np.array(cfg.data.std)[:, None, None]
    canvas = np.zeros((3, 96, 64), np.float32)  # the portrait canvas (w <= h), zero-padded right and bottom
    canvas[:, :new_h, :new_w] = (np.rint(resized) - mean) / std
    np.testing.assert_allclose(preprocess(image, cfg)["image"], canvas, atol=1e-6)

    with torch.no_grad():
        logits, deltas = retinanet.apply(params, torch.from_numpy(canvas)[None], spec_of(cfg))
    spec = spec_of(cfg)
    anchors = anchor_lib.anchors((96, 64), spec.anchors)
    ref = detect(logits, deltas, anchors, anchor_lib.level_counts((96, 64), spec.anchors),
                 torch.tensor([[new_h, new_w]]), None, spec.test, spec.coder)
    n = int(ref.valid[0].sum())
    assert n > 0 and len(dets[0].scores) == n
    sx, sy = new_w / w, new_h / h  # 1.325, 1.333...
    expected = ref.boxes[0, :n].numpy() / np.array([sx, sy, sx, sy])
    np.testing.assert_allclose(dets[0].boxes, expected, atol=1e-3)
    np.testing.assert_allclose(dets[0].scores, ref.scores[0, :n].numpy(), atol=1e-5)


def test_foreign_weights_use_index_plus_one_ids(files, tmp_path):
    weights = tmp_path / "tv.pth"
    torch.save(to_torchvision(files["params"], spec_of(files["cfg"])), weights)
    dets, cat_ids, names, _ = run_predict(files["cfg"], str(weights), [str(files["root"] / "wide.jpg")])
    assert cat_ids == (1, 2, 3) and names == ("1", "2", "3")
    results = predict.to_results(dets, ["wide.jpg"], cat_ids)
    assert {r["category_id"] for r in results} <= {1, 2, 3}
    assert [r["category_id"] - 1 for r in results] == dets[0].labels.tolist()


def test_canvas_must_hold_the_configured_scale(files):
    cfg = config()
    cfg.data.scale = (1333, 800)
    with pytest.raises(ValueError, match=r"data.landscape_canvas=\(64, 96\).*needs at least \(800, 1333\)"):
        run_predict(cfg, files["ckpt"], [str(files["root"] / "wide.jpg")])


def test_torchvision_resize_mode_and_tight_canvas(files):
    cfg = config()
    cfg.data.resize_mode = "torchvision"
    image = files["images"]["tall.png"]  # 70 x 40: s = 96 / 70, width 40 * 96 / 70 = 54.9
    sample = preprocess(image, cfg, "tight")
    assert tuple(sample["image_hw"]) == (96, 54)  # floored (mmdetection rounds to 55)
    assert sample["image"].shape == (3, 96, 64)  # 54 rounded up to a multiple of 32
    wide = preprocess(files["images"]["wide.jpg"], cfg, "tight")  # 48 x 64: s = 4 / 3
    assert tuple(wide["image_hw"]) == (64, 85) and wide["image"].shape == (3, 64, 96)
    cfg.data.resize_mode = "cv2"
    with pytest.raises(ValueError, match="data.resize_mode"):
        preprocess(image, cfg)


def test_command_line(files, tmp_path):
    root = files["root"]
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "experiments.predict", f"--config={root / 'tiny.py'}", f"--weights={files['ckpt']}",
           "--images", str(root / "wide.jpg"), str(root / "tall.png"), f"--out={out}", f"--draw={tmp_path / 'png'}",
           "--score-thr", "0.2", "--config.model.test.max_per_img=5", "--use_config_for=model.test.max_per_img"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for i in (0, 1):
        assert 0 < sum(r["image_id"] == i for r in results) <= 5  # the override reached the config
    assert {r["file_name"] for r in results} == {"wide.jpg", "tall.png"}
    assert sorted(os.listdir(tmp_path / "png")) == ["tall.png", "wide.png"]
