"""A trained detector comes back from its checkpoint alone: the spec it was trained with travels in the file, and
prediction, evaluation and export use it without a config (retina_fn.trained, retina_fn.predictor, the programs).

One short smoke run with a non-default anchor scale, box coder and score threshold is trained once; its own
evaluation's detections (detections_bbox.json) are the reference."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retina_fn.data import coco
from retina_fn.data.images import decode_image
from retina_fn.engine import trainer
from retina_fn.predictor import Predictor
from tests.test_experiment import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"model.anchors.octave_base_scale": 3.0, "model.coder.stds": (0.5, 0.5, 1.0, 1.0),
            "model.test.score_thr": 0.02, "model.test.max_per_img": 30, "train.max_steps": 24}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    cfg = smoke_config(base / "data", **SETTINGS)
    results = trainer.train_and_evaluate(cfg, str(base / "run"))
    ckpt = sorted(glob.glob(str(base / "run" / "checkpoints" / "ckpt_*.pt")))[-1]
    detections = json.loads((base / "run" / "detections_bbox.json").read_text())
    assert detections, "the short run detects something at its score threshold"
    return dict(base=base, cfg=cfg, results=results, ckpt=ckpt, detections=detections)


def _program(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _by_image(results: list[dict]) -> dict[int, list[tuple]]:
    """{image id: [(category id, bbox, score)] sorted by score}."""
    out: dict[int, list] = {}
    for r in results:
        out.setdefault(r["image_id"], []).append((r["category_id"], r["bbox"], r["score"]))
    return {k: sorted(v, key=lambda d: -d[2]) for k, v in out.items()}


def _assert_same_detections(got: dict, want: dict, ids) -> None:
    for image_id in ids:
        g, w = got.get(image_id, []), want.get(image_id, [])
        assert len(g) == len(w), image_id
        for (gc, gb, gs), (wc, wb, ws) in zip(g, w):
            assert gc == wc and abs(gs - ws) < 1e-5, image_id
            np.testing.assert_allclose(gb, wb, atol=1e-3)


def test_the_checkpoint_alone_predicts_the_runs_own_evaluation_detections(run):
    predictor = Predictor(run["ckpt"], device="cpu")  # no config: the spec the run stored
    spec = predictor.spec
    assert spec.anchors.octave_base_scale == 3.0 and spec.coder.stds == (0.5, 0.5, 1.0, 1.0)
    assert spec.test.score_thr == 0.02 and spec.test.max_per_img == 30
    val = coco.load_split(run["cfg"].data, "val")
    records = val.records[:6]
    images = [decode_image(r.path, r.image_id) for r in records]
    found = predictor.predict_arrays(images, [r.path for r in records])
    mine = []
    for record, det in zip(records, found):
        for box, score, label in zip(det.boxes, det.scores, det.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            mine.append({"image_id": record.image_id, "category_id": predictor.category_ids[int(label)],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    assert predictor.names == tuple(val.label_map.names)
    _assert_same_detections(_by_image(mine), _by_image(run["detections"]), [r.image_id for r in records])


def test_a_config_that_differs_stops_in_one_line_naming_each_field(run, tmp_path):
    image = glob.glob(str(run["base"] / "data" / "val" / "*"))[0]
    done = _program("experiments.predict", "--config=configs/smoke.py", f"--weights={run['ckpt']}",
                    f"--images={image}", f"--out={tmp_path / 'dets.json'}")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    for field in ("model.anchors.octave_base_scale=2.0 (the weights' 3.0)",
                  "model.coder.stds=(1.0, 1.0, 1.0, 1.0) (the weights' (0.5, 0.5, 1.0, 1.0))",
                  "model.test.score_thr=0.05 (the weights' 0.02)", "model.test.max_per_img=50 (the weights' 30)"):
        assert f"--config.{field}" in lines[0], lines[0]
    taken = _program("experiments.predict", "--config=configs/smoke.py", f"--weights={run['ckpt']}",
                     f"--images={image}", f"--out={tmp_path / 'dets.json'}",
                     "--use_config_for=model.test.score_thr,model.test.max_per_img,model.anchors.octave_base_scale,"
                     "model.coder.stds")
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert "model.test.score_thr: 0.05 from the config instead of the weights' 0.02 (--use_config_for)" in taken.stderr


def test_evaluation_without_a_config_scores_the_run_again(run, tmp_path):
    done = _program("experiments.coco_retinanet", "--mode=eval", f"--workdir={tmp_path / 'eval'}",
                    f"--weights={run['ckpt']}")
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert again["bbox_mAP"] == pytest.approx(run["results"]["bbox_mAP"], abs=1e-9)


@pytest.mark.slow
def test_an_export_without_a_config_gives_the_checkpoints_detections(run, tmp_path):
    out = tmp_path / "export"
    done = _program("experiments.export", f"--weights={run['ckpt']}", f"--out={out}", "--format=exported")
    assert done.returncode == 0, done.stderr[-3000:]
    spec = json.loads((out / "model.json").read_text())["detector_spec"]
    assert spec["anchors"]["octave_base_scale"] == 3.0 and spec["test"]["static_shapes"] is True
    val = coco.load_split(run["cfg"].data, "val")
    records = val.records[:3]
    images = [decode_image(r.path, r.image_id) for r in records]
    eager = Predictor(run["ckpt"], device="cpu").predict_arrays(images, [r.path for r in records])
    exported = Predictor(str(out)).predict_arrays(images, [r.path for r in records])
    for e, x in zip(eager, exported):
        assert np.array_equal(e.labels, x.labels)
        np.testing.assert_allclose(e.scores, x.scores, atol=1e-5)
        np.testing.assert_allclose(e.boxes, x.boxes, atol=1e-3)
