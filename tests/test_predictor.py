"""retina_fn/predictor.py: a detector called on images in memory, with the weights read once.

experiments.predict (files in, JSON out) is the reference: its boxes are checked against a forward pass
built by hand in tests/test_predict.py. The tiny model and checkpoint are that file's."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from retina_fn import errors
from retina_fn import predictor as predictor_lib
from retina_fn.interop import COCO80_IDS, COCO80_NAMES, label_table, to_torchvision
from retina_fn.predictor import Prediction, Predictor
from tests.model_fixtures import spec_of
from tests.test_predict import CONFIG_FILE, LABEL_MAP, config, labelled_checkpoint, run_predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint with a label map, the tiny config as a file, and two images: a.jpg 48 x 64 (landscape
    canvas 64 x 96), b.png 70 x 40 (portrait canvas 96 x 64)."""
    root = tmp_path_factory.mktemp("predictor")
    params, ckpt = labelled_checkpoint(root, config())
    gen = np.random.default_rng(0)
    for name, (h, w) in {"a.jpg": (48, 64), "b.png": (70, 40)}.items():
        Image.fromarray(gen.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "tiny.py").write_text(CONFIG_FILE)
    images = {name: np.array(Image.open(root / name).convert("RGB")) for name in ("a.jpg", "b.png")}
    return dict(root=root, params=params, ckpt=ckpt, images=images)


@pytest.fixture(scope="module")
def reference(files):
    """experiments.predict's detections for the files a.jpg and b.png."""
    paths = [str(files["root"] / name) for name in ("a.jpg", "b.png")]
    detections, _, names, _ = run_predict(config(), files["ckpt"], paths)
    assert names == ("cat", "dog", "fox")
    return detections


@pytest.fixture(scope="module")
def shared(files):
    """One Predictor for the tests that only call it."""
    return Predictor(files["ckpt"], device="cpu")  # the checkpoint's own spec


def readme_snippet() -> str:
    """The python block that follows the README's marker for this test."""
    text = open(os.path.join(ROOT, "README.md")).read()
    after = text[text.index("tests/test_predictor.py runs the python block below"):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def assert_same(found: Prediction, reference: Prediction):
    assert len(reference.scores) > 0  # the lively weights detect something on every image
    np.testing.assert_allclose(found.boxes, reference.boxes, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(found.scores, reference.scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(found.labels, reference.labels)


def test_the_readme_snippet_gives_experiments_predicts_detections(files, reference, tmp_path, monkeypatch):
    """The block runs as written, in a folder laid out as it names: the newest checkpoint (no config: its own
    spec), a.jpg and b.png."""
    code = readme_snippet()
    (tmp_path / "runs" / "demo" / "checkpoints").mkdir(parents=True)
    shutil.copy(files["ckpt"], tmp_path / "runs" / "demo" / "checkpoints" / "<newest>.pt")
    for name in ("a.jpg", "b.png"):
        shutil.copy(files["root"] / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)

    detections = namespace["detections"]
    assert len(detections) == 2
    for found, ref in zip(detections, reference):
        assert_same(found, ref)
        assert found.names == tuple(LABEL_MAP["names"][k] for k in ref.labels)


def test_numpy_and_torch_images_give_the_file_detections(files, shared, reference):
    a, b = files["images"]["a.jpg"], files["images"]["b.png"]
    as_arrays = shared([a, b])
    as_tensors = shared((torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(b).permute(2, 0, 1).float() / 255))
    for found in (as_arrays, as_tensors):
        assert isinstance(found, list) and len(found) == 2
        for one, ref in zip(found, reference):
            assert_same(one, ref)
    single = shared(a)  # one image in, one Prediction out
    assert isinstance(single, Prediction)
    assert_same(single, reference[0])


def test_images_are_batched_by_canvas_in_their_order(files, monkeypatch):
    batches = []
    step = predictor_lib.make_eval_step

    def recording_make_eval_step(*args, **kwargs):
        inner = step(*args, **kwargs)

        def recorded(params, batch):
            batches.append(tuple(batch["image"].shape))
            return inner(params, batch)
        return recorded

    monkeypatch.setattr(predictor_lib, "make_eval_step", recording_make_eval_step)
    a, b = files["images"]["a.jpg"], files["images"]["b.png"]
    fixed = Predictor(files["ckpt"], device="cpu", batch_size=2)
    first = fixed(a)
    batched = fixed([a, b, a, a])
    # on the fixed canvases: a's three copies in a batch of 2 and one of 1, then b's
    assert batches == [(1, 3, 64, 96), (2, 3, 64, 96), (1, 3, 64, 96), (1, 3, 96, 64)]
    np.testing.assert_array_equal(batched[3].boxes, first.boxes)  # alone in its batch, as in the first call
    batches.clear()
    tight = Predictor(files["ckpt"], device="cpu", canvas_mode="tight")
    tight([a, b, a[:20]])  # 20 x 64 -> 30 x 96 -> canvas 32 x 96
    assert batches == [(1, 3, 64, 96), (1, 3, 96, 64), (1, 3, 32, 96)]


def test_a_config_must_agree_with_the_checkpoints_spec_or_name_what_it_overrides(files, caplog):
    cfg = config()
    cfg.model.test.score_thr = 0.6
    cfg.model.anchors.octave_base_scale = 2.0
    with pytest.raises(errors.ConfigError) as caught:
        Predictor(files["ckpt"], cfg, device="cpu")
    assert "--config.model.anchors.octave_base_scale=2.0 (the weights' 4.0)" in str(caught.value)
    assert "--config.model.test.score_thr=0.6 (the weights' 0.05)" in str(caught.value)
    with caplog.at_level("WARNING", logger="retina_fn"):
        taken = Predictor(files["ckpt"], cfg, device="cpu", use_config_for=["model.test.score_thr",
                                                                           "model.anchors.octave_base_scale"])
    assert taken.spec.test.score_thr == 0.6 and taken.spec.anchors.octave_base_scale == 2.0
    assert "model.test.score_thr: 0.6 from the config instead of the weights' 0.05 (--use_config_for)" in caplog.text
    strict = taken(files["images"]["b.png"])
    assert len(strict.scores) == 0 or float(strict.scores.min()) > 0.6


def test_auto_class_count_and_foreign_weights(files, tmp_path):
    weights = tmp_path / "tv.pth"
    torch.save(to_torchvision(files["params"], spec_of(config())), weights)
    cfg = config()
    cfg.model.num_classes = "auto"
    found = Predictor(weights, cfg, device="cpu")
    assert cfg.model.num_classes == "auto"  # the caller's config is left as it was
    assert found.spec.num_classes == 3 and found.format == "torchvision"
    assert (found.category_ids, found.names) == ((1, 2, 3), ("1", "2", "3"))
    detections = found(files["images"]["b.png"])
    assert len(detections.labels) > 0 and detections.names == tuple(str(k + 1) for k in detections.labels)


def test_bad_images_are_named_before_anything_runs(shared, files):
    a = files["images"]["a.jpg"]
    with pytest.raises(ValueError, match=r"^image 1 of the list: float64 pixels in \[0, 255\]"):
        shared([a, a.astype(np.float64)])
    with pytest.raises(TypeError, match="^the image: got builtins.str"):
        shared("a.jpg")
    assert shared([]) == []


def test_bad_arguments_are_refused(files, tmp_path):
    with pytest.raises(ValueError, match="canvas_mode must be one of"):
        Predictor(files["ckpt"], device="cpu", canvas_mode="loose")
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        Predictor(files["ckpt"], device="cpu", batch_size=0)
    with pytest.raises(FileNotFoundError, match="config file not found: .*nowhere.py"):
        Predictor(files["ckpt"], str(tmp_path / "nowhere.py"))
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="empty.py defines no get_config"):
        Predictor(files["ckpt"], str(tmp_path / "empty.py"))


def test_label_tables():
    ids, names = label_table(91, {})
    assert ids[18] == 18 and names[18] == "dog"  # torchvision: the class index is the COCO id
    assert label_table(80, None) == (COCO80_IDS, COCO80_NAMES)
    assert label_table(4, {}) == ((1, 2, 3, 4), ("1", "2", "3", "4"))
    assert label_table(3, {"label_map": LABEL_MAP}) == ((1, 3, 7), ("cat", "dog", "fox"))  # older checkpoints
    with pytest.raises(ValueError, match="label map has 3 classes but the detector has 5"):
        label_table(5, {"label_map": LABEL_MAP})
