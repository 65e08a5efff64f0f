"""Our RetinaNet against torchvision's own, without torchvision: golden files on rebuilt weights.

tests/golden/torchvision_v1.npz was written by `python -m tests.golden.make_torchvision_golden` (run
beside torch 2.14.1 / torchvision 0.29.1; see that script and README "Tests"): torchvision's
retinanet_resnet50_fpn (v1, FrozenBatchNorm2d eps 0) with every weight drawn from
tests/golden/recipe.py's integer-seeded streams and calibrated (factors stored), run on five rebuilt
images of different sizes and aspect ratios, one image per call. Here the same state_dict is rebuilt
(checked against stored sums), saved in torchvision's published layout and read by our loader; our
backbone, pyramid, head and `experiments.predict` (default settings: the fixed canvases, canvas-exact)
must reproduce torchvision's numbers at the stored positions and its detections.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs import torchvision_retinanet_v1
from retina_fn import anchors as anchor_lib
from retina_fn.interop import load_detector_weights
from retina_fn.model import fpn, head, resnet, retinanet
from tests.detection_match import count_twins
from tests.golden import recipe
from tests.model_fixtures import spec_of
from tests.test_predict import preprocess, run_predict

GOLDEN = Path(__file__).parent / "golden" / "torchvision_v1.npz"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    data = np.load(GOLDEN)
    meta = json.loads(str(data["meta"]))
    spec = [(k, tuple(shape)) for k, shape in meta["spec"]]
    factors = {k: data[f"factor/{k}"] for k in meta["factors"]}
    state = recipe.calibrate(recipe.synthesize(spec, meta["seed"]), factors)
    sums = np.array([float(state[k].double().abs().sum()) for k, _ in spec])
    assert np.allclose(sums, data["state_abs_sum"], rtol=1e-9, atol=0), "rebuilt weights differ from the writer's"
    root = tmp_path_factory.mktemp("golden_tv")
    weights = root / "retinanet_tv.pth"
    torch.save(state, weights)
    paths, images = [], []
    for i, hw in enumerate(meta["image_sizes"]):
        img = recipe.image(i + 1, *hw)
        assert recipe.digest(img) == str(data[f"image{i}/digest"]), f"image {i} differs from the writer's"
        images.append(img)
        paths.append(str(root / f"img{i}.png"))
        Image.fromarray(img).save(paths[-1])
    return dict(data=data, meta=meta, weights=str(weights), paths=paths, images=images, cfg=torchvision_retinanet_v1)


def _ours_on_fixed_canvas(golden, i: int):
    cfg = golden["cfg"].get_config()
    spec = spec_of(cfg)
    params = load_detector_weights(golden["weights"], spec).params
    sample = preprocess(golden["images"][i], cfg, "fixed")
    image = torch.from_numpy(sample["image"])[None]
    image_hw = torch.from_numpy(sample["image_hw"])[None]
    data = golden["data"]
    assert tuple(sample["image_hw"]) == tuple(data[f"image{i}/resized_hw"])  # the same resize as torchvision
    with torch.no_grad():
        masks = retinanet.extent_masks(image, image_hw, spec)
        feats = resnet.apply(params["backbone"], image, spec.backbone, masks)
        levels = fpn.apply(params["fpn"], feats, spec.fpn, masks)
        logits, deltas = head.apply(params["head"], levels, spec.num_classes, spec.head, masks, spec.anchors.strides)
    return spec, image, feats, levels, logits, deltas


def _close(ours: np.ndarray, theirs: np.ndarray, scale: float, rel: float = 2e-4) -> float:
    err = float(np.abs(ours - theirs).max() / scale)
    assert err < rel, err
    return err


@pytest.mark.parametrize("i", [1, 4])  # 800 x 1000 on the landscape canvas; the 2.3:1 image
def test_backbone_pyramid_and_head_equal_torchvision_on_the_fixed_canvas(golden, i):
    data = golden["data"]
    cfg, image, feats, levels, logits, deltas = _ours_on_fixed_canvas(golden, i)
    assert tuple(image.shape[-2:]) != tuple(data[f"image{i}/padded_hw"])  # a canvas larger than torchvision's
    for name in ("C2", "C3", "C4", "C5"):
        ref_mean, pos, val = (data[f"image{i}/{name}_{k}"] for k in ("mean", "pos", "val"))
        fmap = feats[name][0]
        ours = fmap[pos[:, 0], pos[:, 1], pos[:, 2]].numpy()
        _close(ours, val, np.abs(val).max())
        h, w = (int(np.ceil(data[f"image{i}/padded_hw"][k] / (2 ** (int(name[1]))))) for k in (0, 1))
        _close(fmap[:, :h, :w].mean(dim=(1, 2)).numpy(), ref_mean, np.abs(ref_mean).max())
    for k, level in enumerate(levels):
        h, w = data[f"image{i}/P{k + 3}_hw"]
        ref_mean = data[f"image{i}/P{k + 3}_mean"]
        _close(level[0, :, :h, :w].mean(dim=(1, 2)).numpy(), ref_mean, np.abs(ref_mean).max())
    counts = anchor_lib.level_counts(tuple(image.shape[-2:]), cfg.anchors)
    sizes = anchor_lib.level_sizes(tuple(image.shape[-2:]), cfg.anchors.strides)
    starts = np.cumsum((0,) + counts)
    cells = data[f"image{i}/anchor_cells"]  # (level, y, x, a) on torchvision's maps
    rows = [starts[lv] + (y * sizes[lv][1] + x) * 9 + a for lv, y, x, a in cells]
    ref_logits, ref_deltas = data[f"image{i}/cls_logits"], data[f"image{i}/bbox_regression"]
    print(f"image {i}: logits err {_close(logits[0, rows].numpy(), ref_logits, np.abs(ref_logits).max()):.1e}, "
          f"deltas err {_close(deltas[0, rows].numpy(), ref_deltas, np.abs(ref_deltas).max()):.1e}")


def _twins_per_image(golden, detections) -> list[tuple[int, int]]:
    data, out = golden["data"], []
    for i, det in enumerate(detections):
        ref = [data[f"image{i}/det_{k}"] for k in ("boxes", "scores", "labels")]
        top = min(100, len(ref[1]))
        out.append((count_twins(*ref, det.boxes, det.scores, det.labels), top))
    return out


def test_predict_with_default_settings_gives_torchvision_detections(golden):
    cfg = golden["cfg"].get_config()
    dets, category_ids, _, _ = run_predict(cfg, golden["weights"], golden["paths"])
    assert category_ids == tuple(range(91))
    twins = _twins_per_image(golden, dets)
    print("twins of torchvision's top-100 per image (default canvas):", twins)
    assert all(top == 100 and n == top for n, top in twins), twins


def test_predict_on_tight_canvases_gives_torchvision_detections(golden):
    cfg = golden["cfg"].get_config()
    dets, _, _, _ = run_predict(cfg, golden["weights"], golden["paths"][:2], canvas_mode="tight")
    twins = _twins_per_image(golden, dets)
    print("twins of torchvision's top-100 per image (tight canvas):", twins)
    assert all(n == top == 100 for n, top in twins), twins


def test_eval_mode_writes_torchvision_detections_as_a_coco_results_file(golden, tmp_path):
    """`coco_retinanet --mode eval --weights` on a COCO-format folder whose annotation file is an image-info
    file (images and categories, no annotations, as COCO test-dev's): categories 0..90 make class index =
    category id = torchvision's label. Two of the five images, one per canvas (the 1100 x 800 portrait and
    the 2.3:1 landscape): what this test adds to the predict test above, which checks all five through the
    same step, is the loader, the evaluator and the results file, the same code for every image."""
    import subprocess
    import sys

    from retina_fn.interop import COCO91_NAMES

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    entries = []
    chosen = (2, 4)
    for i in chosen:
        img = golden["images"][i]
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        entries.append(dict(id=i + 1, file_name=f"{i}.png", height=img.shape[0], width=img.shape[1]))
    info = dict(images=entries, categories=[dict(id=k, name=n) for k, n in enumerate(COCO91_NAMES)])
    (root / "image_info.json").write_text(json.dumps(info))
    workdir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "experiments.coco_retinanet", "--config",
                    "configs/torchvision_retinanet_v1.py", "--mode", "eval", "--weights", golden["weights"],
                    "--workdir", str(workdir), f"--config.data.root={root}", "--config.data.val_ann=image_info.json",
                    "--config.data.val_images=images", "--config.dist.device=cpu",
                    # one image per call, as the golden file was written: no padding slot to compute
                    "--config.data.eval_images_per_device=1"],
                   check=True, cwd=Path(__file__).parents[1], timeout=1200)
    results = json.loads((workdir / "detections_bbox.json").read_text())
    data, twins = golden["data"], []
    assert {r["image_id"] for r in results} == {i + 1 for i in chosen}
    for i in chosen:
        mine = [r for r in results if r["image_id"] == i + 1]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]).reshape(-1, 4)
        scores = np.array([r["score"] for r in mine])
        labels = np.array([r["category_id"] for r in mine])
        ref = [data[f"image{i}/det_{k}"] for k in ("boxes", "scores", "labels")]
        twins.append(count_twins(*ref, boxes, scores, labels))
    print("twins of torchvision's top-100 per image (eval mode results file):", twins)
    assert twins == [100] * len(chosen)
