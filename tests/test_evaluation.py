"""The evaluation's reports (retina_fn.engine.evaluation.write_reports) and the eval mode end to end: the results
file, the per-class table, the figures, the error breakdown, and an image-info annotation file (no
'annotations', as COCO test-dev's) that gets a results file and no mAP."""

import json
import logging
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from configs import common
from retina_fn.engine import evaluation, trainer
from retina_fn import checkpoint, rng
from retina_fn.data import coco, synthetic
from retina_fn.eval import coco_eval
from retina_fn.model import retinanet
from tests.model_fixtures import spec_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("detections_bbox.json", "per_class.md", "pr_curves.png", "error_breakdown.md", "error_breakdown.png")


def _is_png(path) -> bool:
    with Image.open(path) as img:
        img.load()
        return img.format == "PNG" and min(img.size) > 0


def _tiny_set(tmp_path):
    """Two classes on two images; a detection of each box and one false positive."""
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 240} for i in (4, 7)],
          "categories": [{"id": 2, "name": "ant", "supercategory": "insect"},
                         {"id": 6, "name": "bee", "supercategory": "insect"}],
          "annotations": [
              {"id": 1, "image_id": 4, "category_id": 2, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
              {"id": 2, "image_id": 7, "category_id": 6, "bbox": [100, 50, 60, 60], "area": 3600, "iscrowd": 0}]}
    results = [{"image_id": 4, "category_id": 2, "bbox": [10, 10, 50, 40], "score": 0.9},
               {"image_id": 7, "category_id": 6, "bbox": [100, 50, 60, 60], "score": 0.5},
               {"image_id": 7, "category_id": 2, "bbox": [100, 50, 60, 60], "score": 0.7}]  # a bee called an ant
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(gt))
    return coco.load_coco(str(ann_file), str(tmp_path)), results


def _eval_cfg(**overrides):
    cfg = common.base_config().eval
    cfg.update(overrides)
    return cfg


def test_reports_files_and_results_entries(tmp_path, caplog):
    coco_set, results = _tiny_set(tmp_path)
    ids = [r.image_id for r in coco_set.records]
    scores = coco_eval.evaluate_detailed(coco_set.ann_file, results, img_ids=ids)
    run = evaluation.EvalRun(dict(scores.metrics), results, ids, scores, [])
    workdir = tmp_path / "run"
    workdir.mkdir()
    with caplog.at_level(logging.INFO, logger="retina_fn"):
        extra = evaluation.write_reports(_eval_cfg(), str(workdir), run, coco_set)
    assert sorted(extra) == ["detections_file", "error_breakdown", "per_class"]
    assert extra["detections_file"] == str(workdir / "detections_bbox.json")
    assert json.loads((workdir / "detections_bbox.json").read_text()) == results
    ant, bee = extra["per_class"]
    assert (ant["name"], ant["num_gt"], bee["name"], bee["num_gt"]) == ("ant", 1, "bee", 1)
    # the bee called an ant scores below the real ant: precision 1 up to full recall for both classes
    assert ant["AP"] == pytest.approx(1.0) and bee["AP"] == pytest.approx(1.0)
    assert list(extra["error_breakdown"]) == ["C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"]
    assert extra["error_breakdown"]["FN"] == 1.0
    assert all(_is_png(workdir / name) for name in FILES if name.endswith(".png"))
    table = (workdir / "per_class.md").read_text()
    assert "| ant | 2 | 1.000 | 1.000 | 1.000 | 1 |" in table
    assert "| ant | 2 | 1.000 | 1.000 | 1.000 | 1 |" in caplog.text  # the table is logged too
    assert "| Oth |" in (workdir / "error_breakdown.md").read_text()
    json.dumps(extra)  # results.json takes it as it is


def test_error_analysis_setting(tmp_path, monkeypatch, caplog):
    coco_set, results = _tiny_set(tmp_path)
    ids = [r.image_id for r in coco_set.records]
    run = evaluation.EvalRun({}, results, ids, coco_eval.evaluate_detailed(coco_set.ann_file, results), [])
    off = tmp_path / "off"
    off.mkdir()
    assert "error_breakdown" not in evaluation.write_reports(_eval_cfg(error_analysis=False), str(off), run, coco_set)
    assert not (off / "error_breakdown.png").exists() and (off / "per_class.md").exists()
    monkeypatch.setattr(evaluation, "ERROR_ANALYSIS_MAX_IMAGES", 1)  # the set (2 images) is now "large"
    large = tmp_path / "large"
    large.mkdir()
    with caplog.at_level(logging.INFO, logger="retina_fn"):
        assert "error_breakdown" not in evaluation.write_reports(_eval_cfg(), str(large), run, coco_set)
    assert "--config.eval.error_analysis=True runs it" in caplog.text
    forced = tmp_path / "forced"
    forced.mkdir()
    assert "error_breakdown" in evaluation.write_reports(_eval_cfg(error_analysis=True), str(forced), run, coco_set)


def test_image_info_set_writes_results_and_no_map(tmp_path, caplog):
    coco_set, results = _tiny_set(tmp_path)
    info = json.loads(open(coco_set.ann_file).read())
    del info["annotations"]
    (tmp_path / "info.json").write_text(json.dumps(info))
    info_set = coco.load_coco(str(tmp_path / "info.json"), str(tmp_path))
    run = evaluation.EvalRun({name: math.nan for name in coco_eval.METRIC_NAMES}, results, [4, 7], None, [])
    with caplog.at_level(logging.INFO, logger="retina_fn"):
        extra = evaluation.write_reports(_eval_cfg(), str(tmp_path), run, info_set)
    assert extra == {"detections_file": str(tmp_path / "detections_bbox.json")}
    assert json.loads((tmp_path / "detections_bbox.json").read_text()) == results
    assert "no mAP" in caplog.text and not (tmp_path / "per_class.md").exists()


# ---------------------------------------------------------------------------------------------------
# End to end, with the smoke config's untrained model (score threshold 0, so that it detects something)


@pytest.fixture(scope="module")
def smoke_eval(tmp_path_factory):
    """A 16-image synthetic validation set, an image-info copy of its annotation file, and a step-0
    checkpoint of the smoke model."""
    from configs import smoke

    base = tmp_path_factory.mktemp("eval_e2e")
    data = base / "data"
    synthetic.generate_synthetic(data, num_train=0, num_val=16, seed=5, image_size=128)
    with open(data / synthetic.LAYOUT["val_ann"]) as f:
        gt = json.load(f)
    info = {k: v for k, v in gt.items() if k != "annotations"}
    (data / "annotations" / "image_info_val.json").write_text(json.dumps(info))
    overrides = {"data.root": str(data), "data.dataset": "coco", "model.test.score_thr": 0.0}
    cfg = common.override(smoke.get_config(), **overrides)
    trainable, frozen = retinanet.split_trainable(retinanet.init(rng.key(0), spec_of(cfg)), spec_of(cfg))
    weights = checkpoint.save(str(base / "checkpoints"), 0, {"params": trainable, "frozen": frozen})
    return base, gt, overrides, weights


@pytest.mark.slow
def test_eval_mode_writes_every_report(smoke_eval):
    base, gt, overrides, weights = smoke_eval
    workdir = base / "eval"
    done = subprocess.run([sys.executable, "-m", "experiments.coco_retinanet", "--config", "configs/smoke.py",
                           f"--workdir={workdir}", "--mode=eval", f"--weights={weights}",
                           *(f"--config.{k}={v}" for k, v in overrides.items())],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "eval_results.json").read_text())
    detections = json.loads((workdir / "detections_bbox.json").read_text())
    assert len(detections) == results["num_detections"] > 0
    assert {d["category_id"] for d in detections} <= {c["id"] for c in gt["categories"]}
    assert [r["name"] for r in results["per_class"]] == [c["name"] for c in sorted(gt["categories"],
                                                                                    key=lambda c: c["id"])]
    assert sum(r["num_gt"] for r in results["per_class"]) == sum(not a["iscrowd"] for a in gt["annotations"])
    assert set(results["error_breakdown"]) == {"C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"}
    assert all((workdir / name).is_file() for name in FILES)
    assert _is_png(workdir / "pr_curves.png") and _is_png(workdir / "error_breakdown.png")
    assert "per-class AP" in done.stderr and "error breakdown (AP" in done.stderr


@pytest.mark.slow
def test_eval_on_an_image_info_file_writes_results_and_no_map(smoke_eval, caplog):
    from configs import smoke

    base, gt, overrides, weights = smoke_eval
    cfg = common.override(smoke.get_config(), **overrides, **{"data.val_ann": "annotations/image_info_val.json"})
    workdir = base / "info"
    with caplog.at_level(logging.INFO, logger="retina_fn"):
        results = trainer.evaluate_only(cfg, str(workdir), weights)
    assert math.isnan(results["bbox_mAP"]) and results["num_detections"] > 0
    assert "per_class" not in results and not (workdir / "per_class.md").exists()
    detections = json.loads((workdir / "detections_bbox.json").read_text())
    assert len(detections) == results["num_detections"]
    assert {d["image_id"] for d in detections} <= {im["id"] for im in gt["images"]}
    assert "no mAP" in caplog.text


@pytest.mark.slow
def test_training_puts_the_reports_in_results_json(tmp_path):
    from tests.test_experiment import smoke_config

    cfg = smoke_config(tmp_path / "data", **{"data.synthetic.num_train": 16, "train.max_steps": 2,
                                             "model.test.score_thr": 0.0,
                                             "eval.max_vis_images": 0})
    results = trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["per_class"] == results["per_class"] and len(on_disk["per_class"]) == 5
    assert on_disk["error_breakdown"]["FN"] == 1.0  # 16 validation images: the breakdown runs by default
    assert all((tmp_path / "run" / name).is_file() for name in FILES)
