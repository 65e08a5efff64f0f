"""A COCO-format dataset of one's own: model.num_classes='auto' takes the class count and label map from the
annotation files (retina_fn/class_count.py), and docs/own_dataset.md's command for it runs as written.

The data is the synthetic shapes set with 3 classes written as COCO files: category ids 1, 2, 4 named circle,
square, triangle, unlike COCO's 80 (or the demo's 5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from configs.common import base_config
from experiments import benchmark, predict
from retina_fn import class_count
from retina_fn.engine import trainer
from experiments.benchmark.options import Options
from retina_fn import anchors, checkpoint, rng, schema, trained as trained_lib
from retina_fn.predictor import Predictor
from retina_fn.data import synthetic
from retina_fn.interop import to_mmdet, to_torchvision
from retina_fn.model import retinanet
from tests.dist_scripts import launch

ROOT = launch.ROOT
GUIDE = os.path.join(ROOT, "docs", "own_dataset.md")
NUM_CLASSES = 3


def guide_command() -> str:
    """The first bash block of docs/own_dataset.md, its continuation lines joined."""
    with open(GUIDE) as f:
        text = f.read()
    assert "```bash\n" in text, f"{GUIDE} has no bash block"
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ").strip()


def stored_labels(meta: dict) -> dict:
    """The label map of a checkpoint's stored spec, as `categories_in` gives it."""
    return {"category_ids": list(meta["spec"]["category_ids"]), "names": list(meta["spec"]["names"])}


def categories_in(ann_file: str) -> dict:
    """{'category_ids': [...], 'names': [...]} read straight from an annotation file, ids ascending."""
    with open(ann_file) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    return {"category_ids": [c["id"] for c in cats], "names": [c["name"] for c in cats]}


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """A 3-class COCO-format folder in the README's layout (8 training and 4 validation images of ~128 px)."""
    root = tmp_path_factory.mktemp("own") / "mydata"
    synthetic.generate_synthetic(root, num_train=8, num_val=4, seed=0, image_size=128, num_classes=NUM_CLASSES)
    return root


def own_config(root) -> object:
    """configs.common.base_config() (model.num_classes left at its default) made small: a narrow ResNet-18
    RetinaNet on 128 x 160 canvases, reading the folder `root` as data.dataset='coco'."""
    cfg = base_config()
    m = cfg.model
    m.backbone.depth = 18
    m.backbone.base_width = 16
    m.fpn.out_channels = 32
    m.head.feat_channels = 32
    m.head.stacked_convs = 1
    d = cfg.data
    d.dataset = "coco"
    d.root = str(root)
    d.update(synthetic.LAYOUT)
    d.scale = (160, 128)
    d.landscape_canvas = (128, 160)
    d.portrait_canvas = (160, 128)
    d.max_boxes = 16
    d.images_per_device = 2
    d.eval_images_per_device = 2
    d.workers = 0
    cfg.optim.warmup_iters = 1
    cfg.train.max_steps = 2
    cfg.train.log_every = 1
    cfg.train.validate = False
    cfg.eval.max_vis_images = 0
    cfg.dist.device = "cpu"
    return cfg


@pytest.fixture(scope="module")
def trained(own_data, tmp_path_factory):
    """(workdir, newest checkpoint) of 2 training steps of own_config, num_classes never set."""
    workdir = tmp_path_factory.mktemp("own_run")
    cfg = own_config(own_data)
    assert cfg.model.num_classes == class_count.AUTO  # the default, not set by the test
    trainer.train_and_evaluate(cfg, str(workdir))
    return workdir, checkpoint.restore_latest(str(workdir / "checkpoints")).path


def with_renamed_val_category(src, dst, category_id: int, name: str):
    """A copy of the folder `src` at `dst` whose validation file names `category_id` `name`."""
    shutil.copytree(src, dst)
    ann = dst / synthetic.LAYOUT["val_ann"]
    data = json.loads(ann.read_text())
    for cat in data["categories"]:
        if cat["id"] == category_id:
            cat["name"] = name
    ann.write_text(json.dumps(data))
    return dst


def test_training_counts_the_annotation_files_categories(own_data, trained):
    workdir, ckpt = trained
    expected = categories_in(str(own_data / synthetic.LAYOUT["train_ann"]))
    assert expected["names"] == ["circle", "square", "triangle"] and expected["category_ids"] == [1, 2, 4]
    restored = checkpoint.load(ckpt)
    assert restored.step == 2
    assert stored_labels(restored.meta) == expected
    # the classification conv has (anchors per cell) x (the file's category count) outputs
    per_cell = anchors.anchors_per_cell(own_config(own_data).model.anchors)
    assert restored.state["params"]["head"]["cls_logits"]["weight"].shape[0] == per_cell * NUM_CLASSES
    with open(workdir / "config.json") as f:
        assert json.load(f)["model"]["num_classes"] == NUM_CLASSES  # the resolved config is what is saved


def test_the_guide_command_trains_on_a_coco_format_folder(own_data, tmp_path):
    """docs/own_dataset.md's command as written, with overrides appended for a 2-step run of a small model on small
    canvases (later flags win): it trains on the folder without being told the class count."""
    workdir = tmp_path / "run"
    overrides = [
        f"--workdir={workdir}", f"--config.data.root={own_data}",  # in place of runs/mydata and data/mydata
        "--config.model.backbone.pretrained=",  # no ImageNet file here: random initialisation
        "--config.model.backbone.depth=18", "--config.data.scale='(160, 128)'",
        "--config.data.landscape_canvas='(128, 160)'", "--config.data.portrait_canvas='(160, 128)'",
        "--config.data.workers=0", "--config.train.max_steps=2", "--config.dist.device=cpu",
    ]
    env = launch.worker_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the command runs `python`
    done = subprocess.run(["bash", "-c", guide_command() + " " + " ".join(overrides)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "label map of" in output and "0: 1 circle, 1: 2 square, 2: 4 triangle" in output
    restored = checkpoint.restore_latest(str(workdir / "checkpoints"))
    assert restored.step == 2
    assert stored_labels(restored.meta) == categories_in(str(own_data / synthetic.LAYOUT["train_ann"]))
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 2 and "bbox_mAP_50" in results  # evaluated on the validation file at the end
    with open(workdir / "config.json") as f:
        resolved = json.load(f)
    assert resolved["model"]["num_classes"] == NUM_CLASSES and resolved["data"]["root"] == str(own_data)


def test_validation_categories_that_differ_stop_training_at_start(own_data, tmp_path):
    root = with_renamed_val_category(own_data, tmp_path / "data", category_id=2, name="box")
    cfg = own_config(root)
    cfg.train.validate = True
    with pytest.raises(ValueError) as err:
        trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    message = str(err.value)
    assert str(root / synthetic.LAYOUT["train_ann"]) in message and str(root / synthetic.LAYOUT["val_ann"]) in message
    assert "2 'square' vs 'box'" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_validation_file_with_other_ids_names_them(own_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(own_data, root)
    ann = root / synthetic.LAYOUT["val_ann"]
    data = json.loads(ann.read_text())
    data["categories"].append({"id": 9, "name": "star"})
    ann.write_text(json.dumps(data))
    cfg = own_config(root)
    cfg.train.validate = True
    with pytest.raises(ValueError, match=r"ids only in the second: \[9 'star'\]"):
        trainer.train_and_evaluate(cfg, str(tmp_path / "run"))


def test_an_explicit_class_count_is_checked_against_the_file(own_data, tmp_path):
    cfg = own_config(own_data)
    cfg.model.num_classes = 80
    with pytest.raises(ValueError) as err:
        trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert str(own_data / synthetic.LAYOUT["train_ann"]) in str(err.value)
    assert "--config.model.num_classes=3" in str(err.value)


def test_an_explicit_matching_class_count_trains(own_data, tmp_path):
    cfg = own_config(own_data)
    cfg.model.num_classes = NUM_CLASSES
    cfg.train.max_steps = 1
    results = trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert results["steps"] == 1


def test_evaluation_only_with_weights_counts_the_validation_file(own_data, trained, tmp_path):
    _, ckpt = trained
    cfg = own_config(own_data)
    results = trainer.evaluate_only(cfg, str(tmp_path / "eval"), ckpt)
    assert [row["name"] for row in results["per_class"]] == ["circle", "square", "triangle"]
    assert results["weights"] == ckpt and 0.0 <= results["bbox_mAP"] <= 1.0


def test_evaluation_refuses_a_checkpoint_of_other_categories(own_data, trained, tmp_path):
    _, ckpt = trained
    root = with_renamed_val_category(own_data, tmp_path / "data", category_id=4, name="wedge")
    with pytest.raises(ValueError) as err:
        trainer.evaluate_only(own_config(root), str(tmp_path / "eval"), ckpt)
    message = str(err.value)
    assert ckpt in message and str(root / synthetic.LAYOUT["val_ann"]) in message
    assert "4 'triangle' vs 'wedge'" in message


def test_prediction_takes_the_class_count_from_the_checkpoint(own_data, trained):
    _, ckpt = trained
    cfg = own_config(own_data)
    image = sorted((own_data / "val").iterdir())[0]
    predictor = Predictor(ckpt, cfg, device="cpu")  # the config's 'auto' agrees with the stored 3 classes
    detections, _ = predict.predict_files(predictor, [str(image)])
    assert cfg.model.num_classes == class_count.AUTO  # the config given is left alone
    assert (list(predictor.category_ids), list(predictor.names)) == ([1, 2, 4], ["circle", "square", "triangle"])
    assert len(detections) == 1 and all(0 <= label < NUM_CLASSES for label in detections[0].labels)


@pytest.mark.parametrize("fmt", ["mmdet", "torchvision"])
def test_foreign_weights_are_counted_by_their_classification_conv(own_data, tmp_path, fmt):
    cfg = own_config(own_data)
    cfg.model.num_classes = 7
    spec = schema.detector_spec(cfg)
    params = retinanet.init(rng.key(0), spec)
    path = tmp_path / f"{fmt}.pth"
    torch.save(to_mmdet(params, spec) if fmt == "mmdet" else to_torchvision(params, spec), path)
    cfg.model.num_classes = class_count.AUTO
    loaded = trained_lib.load_trained(str(path), cfg)
    assert loaded.spec.num_classes == 7 and loaded.params["head"]["cls_logits"]["bias"].shape[0] == 7 * 9


def test_programs_without_data_or_weights_ask_for_an_int(own_data):
    cfg = own_config(own_data)
    with pytest.raises(ValueError, match=r"experiments.benchmark .*--config.model.num_classes=N"):
        benchmark.run(cfg, Options(mode="infer", device="cpu", iters=1, warmup=0, count_flops=False))
    cfg.model.num_classes = "eighty"
    with pytest.raises(ValueError, match="must be a positive integer or 'auto', got 'eighty'"):
        class_count.require_int(cfg, "a program")
    cfg.model.num_classes = 4
    assert class_count.require_int(cfg, "a program") == 4
