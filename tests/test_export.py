"""experiments.export: the torch.export program and the ONNX model give experiments.predict's eager detections.

The reference is always the eager path (a Predictor of the same weights on the export's canvas, with the trained
post-processing, static_shapes off); the exported runs go through the programs a user runs:
`python -m experiments.export`, `python -m experiments.predict --exported` and `experiments/onnx_predict.py`
(with torch made unimportable). Detections are compared as twins: same label, IoU >= 0.99, scores within 1e-3.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from configs import demo, retinanet_r50_fpn_1x_coco, smoke
from experiments import onnx_predict, predict
from retina_fn import export, schema
from retina_fn.export import folder as export_format, onnx as export_onnx, program as export_program
from retina_fn.export import timing as export_timing
from retina_fn import checkpoint, nms, rng, topk
from retina_fn.data import transforms
from retina_fn.detector import Detector
from retina_fn.interop import COCO80_IDS, to_mmdet
from retina_fn.model import retinanet
from retina_fn.predictor import Predictor
from tests.model_fixtures import smoke_checkpoint, spec_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANVAS = (128, 128)
SCALE_OVERRIDE = "--config.data.scale=128,128"
IMAGE_SIZES = {"wide.png": (90, 150), "tall.jpg": (160, 96), "small.png": (40, 56)}  # (h, w); small is upscaled
LABEL_MAP = {"category_ids": [3, 5, 8, 13, 21], "names": ["disc", "bar", "cross", "ring", "star"]}
DEMO_CHANNELS = [0, 11, 32]  # classification channels (anchor * K + class) of classes 0, 1, 2 (K = 5)
R50_CHANNELS = [5, 170, 493]  # of classes 5, 10, 13 (K = 80)
ONNX_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(ONNX_MISSING), reason=f"not installed: {', '.join(ONNX_MISSING)} (the onnx "
                                                           f"extra: pip install -e '.[onnx]')")
# Runs experiments/onnx_predict.py as a script in a process where `import torch` fails.
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
# Runs `python -m experiments.export` in a process where `import onnx` and `import onnxscript` fail, as on a
# plain `pip install -e .`.
NO_ONNX = ("import runpy, sys; sys.modules['onnx'] = sys.modules['onnxscript'] = None; "
           "sys.argv = ['experiments.export'] + sys.argv[1:]; "
           "runpy.run_module('experiments.export', run_name='__main__')")


# ----------------------------------------------------------------------------------------------------
# Twins


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes [4]."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(np.array_equal(a, b))


def twin_problems(ref, other, *, iou_min: float = 0.99, score_tol: float = 1e-3) -> list[str]:
    """What keeps two detection lists of one image from being twins, [] when each detection of `ref` has its
    own twin in `other` (same label, IoU >= iou_min, scores within score_tol) and none is left over.

    Args:
      ref, other: (boxes [n, 4] xyxy, scores [n], labels [n], ...) (a Prediction or a tuple).
    """
    ref_boxes, ref_scores, ref_labels = (np.asarray(t) for t in tuple(ref)[:3])
    boxes, scores, labels = (np.asarray(t) for t in tuple(other)[:3])
    problems = [] if len(ref_scores) == len(scores) else [f"{len(ref_scores)} vs {len(scores)} detections"]
    free = set(range(len(scores)))
    for i in np.argsort(-ref_scores, kind="stable"):
        near = [j for j in free if labels[j] == ref_labels[i] and abs(scores[j] - ref_scores[i]) <= score_tol]
        best = max(near, key=lambda j: iou(ref_boxes[i], boxes[j]), default=None)
        if best is None or iou(ref_boxes[i], boxes[best]) < iou_min:
            problems.append(f"no twin for label {ref_labels[i]} score {ref_scores[i]:.4f} box {ref_boxes[i]}")
        else:
            free.discard(best)
    return problems + [f"left over: label {labels[j]} score {scores[j]:.4f} box {boxes[j]}" for j in sorted(free)]


def from_results(results: list[dict], count: int, category_ids) -> list[tuple]:
    """A COCO result list (bbox xywh) back to per-image (boxes xyxy, scores, class index)."""
    index = {c: i for i, c in enumerate(category_ids)}
    out = []
    for image_id in range(count):
        rows = [r for r in results if r["image_id"] == image_id]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)]).reshape(-1, 4)
        out.append((boxes, np.array([r["score"] for r in rows]), np.array([index[r["category_id"]] for r in rows])))
    return out


def assert_twins(reference, others, what: str):
    for i, (ref, other) in enumerate(zip(reference, others, strict=True)):
        problems = twin_problems(ref, other)
        assert not problems, f"{what}, image {i}: " + "; ".join(problems[:5])


def test_twin_matching_finds_exactly_the_twins():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 30]], np.float32)
    ref = (boxes, np.array([0.9, 0.5]), np.array([1, 2]))
    assert twin_problems(ref, (boxes[::-1] + 0.01, np.array([0.5004, 0.9]), np.array([2, 1]))) == []
    assert twin_problems(ref, (boxes, np.array([0.9, 0.502]), np.array([1, 2])))  # score off by 2e-3
    assert twin_problems(ref, (boxes, np.array([0.9, 0.5]), np.array([1, 3])))  # another label
    assert twin_problems(ref, (boxes + [0, 0, 0.2, 0], np.array([0.9, 0.5]), np.array([1, 2])))  # IoU 0.98
    assert twin_problems(ref, (boxes[:1], np.array([0.9]), np.array([1])))  # one missing
    both = (np.concatenate([boxes, boxes[:1]]), np.array([0.9, 0.5, 0.9]), np.array([1, 2, 1]))
    assert twin_problems(ref, both) == ["2 vs 3 detections", f"left over: label 1 score 0.9000 box {boxes[0]}"]


# ----------------------------------------------------------------------------------------------------
# Fixtures


def lively(params: dict, channels: list[int], bias: float, gain: float = 30.0) -> dict:
    """Random weights whose classification channels (anchor * K + class) `channels` respond to the image:
    their conv weights times `gain` (logits spread over several units, so scores are far apart) and bias
    `bias`, the other channels silenced (bias -30). Each image gets some tens of detections of a few classes
    (the demo's: 24 to 40, after NMS suppressed a fifth of the boxes above the score threshold), fewer than
    max_per_img (no cut-off at which near-equal scores could swap places)."""
    head = params["head"]["cls_logits"]
    weight = head["weight"].clone()
    weight[channels] *= gain
    head["weight"] = weight
    head["bias"] = torch.full_like(head["bias"], -30.0)
    head["bias"][channels] = bias
    return params


def write_images(folder) -> list[str]:
    gen = np.random.default_rng(0)
    paths = []
    for name, (h, w) in IMAGE_SIZES.items():
        # smooth colour ramps plus noise: structure the network responds to unevenly
        ramp = np.linspace(0, 1, h)[:, None, None] * gen.uniform(0, 255, 3) + np.linspace(0, 1, w)[None, :, None] * 60
        pixels = np.clip(ramp + gen.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
        paths.append(str(folder / name))
    return paths


def export_size_config(module, num_classes: int):
    """A recipe with the export's scale, so that every image fits the one canvas."""
    cfg = module.get_config()
    cfg.data.scale = CANVAS
    cfg.model.num_classes = num_classes
    return cfg


def eager_detections(weights: str, paths: list[str], module, num_classes: int):
    """The eager reference: the weights' detector on the export's one canvas with its own post-processing
    (static_shapes off), through the Predictor that experiments.predict runs; (detections, category ids, names,
    decoded images)."""
    cfg = export_size_config(module, num_classes)
    cfg.data.landscape_canvas = cfg.data.portrait_canvas = CANVAS
    predictor = Predictor(weights, cfg, use_config_for=["data.landscape_canvas", "data.portrait_canvas"],
                          device="cpu")
    found, images = predict.predict_files(predictor, paths)
    return found, predictor.category_ids, predictor.names, images


def exported_detections(folder: str, paths: list[str]):
    """What `experiments.predict --exported` computes, in process."""
    predictor = Predictor(folder)
    found, images = predict.predict_files(predictor, paths)
    return found, predictor.category_ids, predictor.names, images


def run(cmd: list[str], timeout: int = 900) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, time.perf_counter() - started


def export_command(weights: str, out: str, fmt: str, batch: int, config: str | None = None) -> list[str]:
    """The export command line; a config (with the export's scale) only for weights that store no spec."""
    return ([sys.executable, "-m", "experiments.export", f"--weights={weights}", f"--out={out}", f"--format={fmt}",
             "--canvas", f"{CANVAS[0]}x{CANVAS[1]}", f"--batch={batch}"]
            + ([f"--config={config}", SCALE_OVERRIDE] if config else []))


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """The demo model with random, lively weights in a retina_fn checkpoint that stores its spec (label map
    included) as training does, exported by the command line without a config for batches of 2 (both formats
    where ONNX is installed), three images (so the second batch is padded) and their eager detections."""
    root = tmp_path_factory.mktemp("export_demo")
    spec = schema.detector_spec(export_size_config(demo, 5), LABEL_MAP["category_ids"], LABEL_MAP["names"])
    params = lively(retinanet.init(rng.key(0), spec), DEMO_CHANNELS, bias=-9.0)
    trainable, frozen = retinanet.split_trainable(params, spec)
    ckpt = checkpoint.save(str(root / "run"), 3, {"params": trainable, "frozen": frozen},
                           meta={"spec": spec.to_json()})
    fmt = "exported" if ONNX_MISSING else "both"
    _, seconds = run(export_command(ckpt, str(root / "out"), fmt, batch=2))
    print(f"demo export ({fmt}) took {seconds:.0f} s")
    paths = write_images(root)
    eager = eager_detections(ckpt, paths, demo, 5)
    return dict(root=root, ckpt=ckpt, out=str(root / "out"), paths=paths, eager=eager)


# ----------------------------------------------------------------------------------------------------
# The demo model


def test_exported_program_gives_the_eager_detections(demo_export, tmp_path):
    detections, category_ids, names, images = demo_export["eager"]
    counts = [len(d.scores) for d in detections]
    assert all(0 < c < 100 for c in counts), counts  # detections, none cut off at max_per_img
    out = tmp_path / "dets.json"
    run([sys.executable, "-m", "experiments.predict", f"--exported={demo_export['out']}", "--images",
         *demo_export["paths"], f"--out={out}", f"--draw={tmp_path / 'vis'}", "--score-thr=0.1"])
    results = json.loads(out.read_text())
    assert {r["category_id"] for r in results} <= set(LABEL_MAP["category_ids"])
    assert_twins(detections, from_results(results, len(demo_export["paths"]), category_ids), "exported program")
    assert sorted(os.listdir(tmp_path / "vis")) == ["small.png", "tall.png", "wide.png"]
    for path, image in zip(demo_export["paths"], images):
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        assert Image.open(tmp_path / "vis" / name).size == image.shape[1::-1]


def test_exported_program_in_process(demo_export):
    """Predictor(folder): the label map from model.json, the same twins."""
    detections, category_ids, names, _ = exported_detections(demo_export["out"], demo_export["paths"])
    assert (category_ids, names) == (tuple(LABEL_MAP["category_ids"]), tuple(LABEL_MAP["names"]))
    assert_twins(demo_export["eager"][0], detections, "predict_exported")


def test_static_shapes_leave_the_detections_unchanged(demo_export):
    """The switch export sets: eager post-processing with and without static_shapes, bit for bit."""
    spec = export_program.export_spec(schema.detector_spec(export_size_config(demo, 5)), CANVAS)
    params = lively(retinanet.init(rng.key(0), spec), DEMO_CHANNELS, bias=-9.0)
    pipeline = transforms.TransformConfig.for_inference(spec.input)
    samples = [transforms.preprocess_for_inference(np.array(Image.open(p).convert("RGB")), pipeline)
               for p in demo_export["paths"]]
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in ("image", "image_hw", "scale_factor")}
    outputs = []
    for static in (False, True):
        with torch.no_grad():
            outputs.append(Detector(spec.replace(test=dataclasses.replace(spec.test, static_shapes=static)),
                                    [CANVAS]).predict(params, batch))
    assert outputs[0].valid.any()
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_the_program_file_holds_nothing_pickled(demo_export):
    """What torch.export.load would unpickle is absent: no sample inputs, every tensor stored raw."""
    path = os.path.join(demo_export["out"], export_format.PROGRAM_FILE)
    export_format.check_archive(path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert [z.getinfo(n).file_size for n in names if "/sample_inputs/" in n] == [0]
        for name in (n for n in names if n.endswith("_config.json")):
            assert all(not item["use_pickle"] for item in json.loads(z.read(name))["config"].values())


def test_model_json_describes_the_program(demo_export):
    spec = export_format.read_spec(demo_export["out"])
    assert spec["canvas"] == list(CANVAS) and spec["batch"] == 2 and spec["max_detections"] == 100
    assert spec["label_map"] == LABEL_MAP
    assert [i["name"] for i in spec["inputs"]] == ["image", "image_hw", "scale_factor"]
    assert [o["name"] for o in spec["outputs"]] == ["boxes", "scores", "labels", "valid"]
    pre = spec["preprocess"]
    cfg = demo.get_config()
    assert (pre["resize_mode"], pre["scale"]) == ("mmdet", [128, 128])
    assert pre["mean"] == list(cfg.data.mean) and pre["std"] == list(cfg.data.std)
    assert spec["files"]["exported"] == "model.pt2" and os.path.isfile(os.path.join(demo_export["out"], "model.pt2"))
    if ONNX_MISSING:
        return
    import onnx

    model = onnx.load(os.path.join(demo_export["out"], spec["files"]["onnx"]))
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(v.name, dims(v)) for v in model.graph.input] == [(i["name"], i["shape"]) for i in spec["inputs"]]
    assert [(v.name, dims(v)) for v in model.graph.output] == [(o["name"], o["shape"]) for o in spec["outputs"]]
    assert spec["onnx_opset"] == next(o.version for o in model.opset_import if o.domain == "")


def test_timing_covers_every_runtime_written(demo_export):
    rates = export_timing.time_export(demo_export["ckpt"], demo_export["out"], iters=1, rounds=1)
    assert list(rates) == ["eager", "exported"] + ([] if ONNX_MISSING else ["onnxruntime"])
    assert all(wall > 0 and cpu > 0 for wall, cpu in rates.values())


@needs_onnx
def test_onnxruntime_without_torch_gives_the_eager_detections(demo_export, tmp_path):
    out = tmp_path / "ort.json"
    proc, _ = run([sys.executable, "-c", NO_TORCH, os.path.join(ROOT, "experiments", "onnx_predict.py"),
                   demo_export["out"], *demo_export["paths"], f"--out={out}", "--score-thr=0.3"])
    assert "wide.png: " in proc.stdout and "detections" in proc.stdout
    results = json.loads(out.read_text())
    detections, category_ids, _, _ = demo_export["eager"]
    assert_twins(detections, from_results(results, len(demo_export["paths"]), category_ids), "onnxruntime")


# ----------------------------------------------------------------------------------------------------
# Pieces: preprocessing without torch, NMS and top-k under export


@pytest.mark.parametrize("mode", ["mmdet", "torchvision"])
def test_numpy_preprocessing_matches_the_pipeline(mode):
    """onnx_predict.prepare (numpy only) against retina_fn's input pipeline: bit for bit in 'mmdet' mode
    (the uint8 resize), within float rounding in 'torchvision' mode (the float resize)."""
    spec = {"canvas": [256, 256], "preprocess": {"resize_mode": mode, "scale": [256, 192], "mean": [123.675, 116.28,
            103.53], "std": [58.395, 57.12, 57.375]}}
    cfg = transforms.TransformConfig(scale=(256, 192), landscape_canvas=(256, 256), portrait_canvas=(256, 256),
                                     resize_mode=mode, flip_prob=0.0)
    gen = np.random.default_rng(1)
    for h, w in [(100, 150), (300, 200), (256, 192), (37, 411), (500, 97)]:  # up, down, same, extreme ratios
        image = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mine, ref = onnx_predict.prepare(image, spec), transforms.preprocess_for_inference(image, cfg)
        np.testing.assert_array_equal(mine.image_hw, ref["image_hw"])
        np.testing.assert_array_equal(mine.scale_factor, ref["scale_factor"])
        if mode == "mmdet":
            np.testing.assert_array_equal(mine.image, ref["image"])
        else:
            np.testing.assert_allclose(mine.image, ref["image"], atol=1e-5, rtol=0)


class _Nms(torch.nn.Module):
    def forward(self, boxes, scores, labels, valid):
        return nms.batched_nms(boxes, scores, labels, valid, 0.5, 40)


class _TopK(torch.nn.Module):
    def forward(self, key):
        return topk.top_k_sorted_indices(key, 50)


def _nms_inputs():
    """Two images of 600 boxes (three NMS blocks) in rows where each box overlaps its neighbours beyond the
    threshold, so decisions depend on one another (several fixed-point iterations per block); ties in score,
    three labels, invalid entries."""
    gen = torch.Generator().manual_seed(0)
    n = 600
    # 10 px boxes 2 px apart in rows: IoU 0.67 with a neighbour, 0.43 with the next but one, so a row is a
    # chain in which each decision depends on the one before
    x = torch.arange(n, dtype=torch.float32) % 50 * 2.0
    y = torch.div(torch.arange(n), 50, rounding_mode="floor").float() * 30.0
    boxes = torch.stack([x, y, x + 10, y + 10], -1).expand(2, n, 4) + torch.rand(2, n, 4, generator=gen) * 0.2
    scores = torch.round(torch.rand(2, n, generator=gen) * 20) / 20  # many ties
    labels = torch.randint(0, 3, (2, n), generator=gen)
    valid = torch.rand(2, n, generator=gen) > 0.1
    return boxes, scores, labels, valid


def _onnx_outputs(program, inputs, path) -> list[np.ndarray]:
    import onnxruntime

    export_onnx.to_onnx(program, str(path), input_names=[f"x{i}" for i in range(len(inputs))],
                   output_names=[f"y{i}" for i in range(len(program.graph_signature.user_outputs))])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {f"x{i}": t.numpy() for i, t in enumerate(inputs)})


@pytest.mark.parametrize("runtime", ["exported", pytest.param("onnx", marks=needs_onnx)])
def test_nms_and_top_k_export_exactly(runtime, tmp_path):
    """The export paths of retina_fn.nms (a while_loop per block) and retina_fn.topk (a stable sort) against
    the eager functions, tie order included."""
    inputs = _nms_inputs()
    # ties everywhere; 20000 entries: the eager top-k takes its chunked path (more than 4 * k * 64 entries)
    key = torch.round(torch.rand(3, 20000, generator=torch.Generator().manual_seed(1)) * 30)
    for module, args in ((_Nms(), inputs), (_TopK(), (key,))):
        with torch.no_grad():
            expected = module(*args)
            program = torch.export.export(module, args)  # as experiments.export writes it
        expected = expected if isinstance(expected, tuple) else (expected,)
        if runtime == "exported":
            got = program.module()(*args)
            got = [t.numpy() for t in (got if isinstance(got, tuple) else (got,))]
        else:
            got = _onnx_outputs(program, args, tmp_path / f"{type(module).__name__}.onnx")
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(e.numpy(), g)
    assert expected[0].shape == (3, 50)
    stable = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :50]
    np.testing.assert_array_equal(expected[0].numpy(), stable.numpy())


# ----------------------------------------------------------------------------------------------------
# The R50 1x model, from an mmdetection file


def test_r50_export_gives_the_eager_detections(tmp_path):
    cfg = export_size_config(retinanet_r50_fpn_1x_coco, 80)
    params = lively(retinanet.init(rng.key(1), spec_of(cfg)), R50_CHANNELS, bias=-7.5)
    weights = tmp_path / "retinanet_r50_mmdet.pth"
    torch.save(to_mmdet(params, cfg.model), weights)
    paths = write_images(tmp_path)
    detections, category_ids, _, _ = eager_detections(str(weights), paths, retinanet_r50_fpn_1x_coco, 80)
    assert category_ids == COCO80_IDS and all(0 < len(d.scores) < 100 for d in detections)
    fmt = "exported" if ONNX_MISSING else "both"
    config = os.path.join(ROOT, "configs", "retinanet_r50_fpn_1x_coco.py")
    _, seconds = run(export_command(str(weights), str(tmp_path / "out"), fmt, batch=1, config=config))
    print(f"R50 export ({fmt}) at {CANVAS[0]}x{CANVAS[1]} took {seconds:.0f} s")
    exported, *_ = exported_detections(str(tmp_path / "out"), paths)
    assert_twins(detections, exported, "R50 exported program")
    if ONNX_MISSING:
        return
    import onnxruntime

    spec = onnx_predict.read_spec(str(tmp_path / "out"))
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    prepared = [onnx_predict.prepare(np.asarray(Image.open(p).convert("RGB")), spec) for p in paths]
    assert_twins(detections, onnx_predict.detect(session, spec, prepared), "R50 onnxruntime")


# ----------------------------------------------------------------------------------------------------
# The default format on an install without the onnx extra


def test_the_default_format_without_onnx_writes_the_program_and_says_what_it_skipped(tmp_path, monkeypatch):
    """--format auto (the default) in a process where onnx cannot be imported: the .pt2 is written and runs, one
    log line names the skipped ONNX model and the extra that adds it; an explicit ONNX request fails instead.
    The smoke model on a 64 x 64 canvas with a short NMS list: the cheapest export there is."""
    ckpt = smoke_checkpoint(tmp_path / "run")
    out = tmp_path / "out"
    proc, _ = run([sys.executable, "-c", NO_ONNX, "--config=configs/smoke.py", f"--weights={ckpt}", f"--out={out}",
                   "--canvas=64x64", "--config.data.scale=64,64", "--config.model.test.max_candidates=100",
                   "--config.model.test.nms_pre=100", "--config.model.canvas_exact=False", "--config.model.num_classes=5",
                   "--use_config_for=data.scale,model.test.max_candidates,model.test.nms_pre,model.canvas_exact"])
    skipped = [line for line in proc.stderr.splitlines() if "ONNX is skipped" in line]
    assert len(skipped) == 1 and "onnx and onnxscript are not installed" in skipped[0], proc.stderr[-3000:]
    assert "pip install -e '.[onnx]'" in skipped[0]
    assert sorted(os.listdir(out)) == ["model.json", "model.pt2"]
    spec = export_format.read_spec(str(out))
    assert spec["files"] == {"exported": "model.pt2"} and spec["onnx_opset"] is None
    batch = dict(zip(("image", "image_hw", "scale_factor"), export_program.example_inputs(1, (64, 64))))
    detections = export_format.load_program(str(out), spec)(batch)
    assert detections.boxes.shape == (1, smoke.get_config().model.test.max_per_img, 4)

    monkeypatch.setitem(sys.modules, "onnx", None)  # the same absence in this process
    for fmt in ("onnx", "both"):
        with pytest.raises(ImportError, match=rf"--format {fmt} needs onnx and onnxscript.*pip install -e "):
            export.export(ckpt, str(tmp_path / fmt), fmt=fmt)
        assert not (tmp_path / fmt).exists()  # refused before anything is written


# ----------------------------------------------------------------------------------------------------
# Errors


def test_canvas_and_folder_errors(tmp_path):
    spec = spec_of(retinanet_r50_fpn_1x_coco.get_config(), 80)
    with pytest.raises(ValueError, match=r"cannot hold every image resized with data.scale=\(1333, 800\).*"
                                         r"--config.data.scale=512,512 --use_config_for=data.scale"):
        export_program.export_spec(spec, (512, 512))
    with pytest.raises(ValueError, match="multiples of the size divisor 32"):
        export_program.export_spec(spec, (1344, 1350))
    exported = export_program.export_spec(spec)
    assert exported.input.portrait_canvas == exported.input.landscape_canvas == (1344, 1344)  # both aspect groups
    assert exported.test.static_shapes and not spec.test.static_shapes  # the spec given is left alone
    with pytest.raises(FileNotFoundError, match="not a folder written by experiments.export"):
        export_format.read_spec(str(tmp_path))
    (tmp_path / "model.json").write_text(json.dumps({"format": export_format.SPEC_FORMAT, "version": export_format.SPEC_VERSION,
                                                      "files": {}}))
    with pytest.raises(FileNotFoundError, match="--format onnx"):
        export_format.load_program(str(tmp_path), export_format.read_spec(str(tmp_path)))
    with pytest.raises(ValueError, match="--format must be one of"):
        export.export("weights.pth", str(tmp_path), fmt="tflite")


def test_predict_refuses_exported_with_eager_flags(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.predict", f"--exported={tmp_path}", "--batch_size=4",
                           "--canvas=tight", f"--out={tmp_path / 'x.json'}", "a.jpg"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "pass no config, tight canvas or batch size with it" in proc.stderr
