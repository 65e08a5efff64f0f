"""The benchmark command (experiments/benchmark/) on a tiny config: its runs and JSON, the command line and its
errors, variants as config overrides, FLOP counting, the speed-up arithmetic, and the eager check of compiled or
graphed steps (experiments.benchmark.parity), which must catch a step that computes something else."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from experiments import benchmark
from experiments.benchmark import measurement, parity, subjects
from experiments.benchmark.options import VARIANTS, variant_config
from retina_fn import rng
from retina_fn.data.random_batch import config_batch
from retina_fn.train import build_optimizer, init_train_state, make_eval_step, make_train_step
from tests.model_fixtures import settings_of, spec_of, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def tiny(canvas=(64, 64)):
    cfg = tiny_config(canvas=canvas)
    cfg.model.head.stacked_convs = 1
    cfg.model.backbone.base_width = 16
    cfg.data.max_boxes = 8
    return cfg


def check_subject(r: dict, iters: int, batch: int = 2) -> None:
    s = r["step_s"]
    assert s["n"] == iters == len(r["times"]) and 0 < s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"]
    assert r["images_per_s"] == pytest.approx(batch / s["median"])
    assert r["peak_memory_mb"] > 0 and r["memory_kind"] == "cpu_rss_peak"
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_image"] * batch / s["median"] / 1e12)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.5)


@pytest.mark.slow
def test_train_and_infer_write_json_with_a_variant_timed_alternately(tmp_path):
    opts = dict(batch=2, canvas=(64, 64), iters=2, rounds=2, warmup=1, peak_tflops=0.5)
    train = benchmark.run(tiny(), benchmark.Options(mode="train", variants=("box_buckets", "cuda_graph"),
                                                    check_steps=1, **opts))
    infer = benchmark.run(tiny(), benchmark.Options(mode="infer", **opts))
    for result in (train, infer):
        path = tmp_path / f"{result['mode']}.json"
        benchmark.write_json(str(path), result)
        loaded = json.loads(path.read_text())
        assert loaded["batch"] == 2 and loaded["canvas"] == [64, 64] and loaded["precision"] == "fp32"
        check_subject(loaded["ours"], iters=2)
        assert len(loaded["ours"]["round_medians"]) == 2
        assert loaded["machine"]["torch"] == torch.__version__ and loaded["torchvision"] is None
        assert "ours" in benchmark.format_table(loaded)
    # forward + backward counts about 3x the forward alone, less the frozen stem's backward
    assert 2.0 < train["ours"]["flops_per_image"] / infer["ours"]["flops_per_image"] < 3.05
    variant = train["variants"]["box_buckets"]
    check_subject(variant, iters=2)
    assert variant["overrides"] == {"data.box_buckets": (8, 16, 32, 64)}
    assert variant["speedup_of_ours"]["per_round"] == pytest.approx(
        [v / o for o, v in zip(train["ours"]["round_medians"], variant["round_medians"])])
    # box buckets change the padding, not the network: the same FLOPs
    assert variant["flops_per_image"] == train["ours"]["flops_per_image"]
    # only a compiled or graphed subject is checked against eager (on a CPU the graph step runs eagerly)
    assert variant["check"] is None and train["ours"]["check"] is None
    assert train["variants"]["cuda_graph"]["check"]["ok"] and train["variants"]["cuda_graph"]["check"]["steps"] == 1


def test_variants_are_config_overrides_on_a_copy():
    cfg = tiny()
    for name, (doc, overrides) in VARIANTS.items():
        edited = variant_config(cfg, name)
        for dotted, value in overrides.items():
            node = edited
            for key in dotted.split("."):
                node = node[key]
            assert node == value, (name, dotted)
    assert cfg.train.compile is False and tuple(cfg.data.box_buckets) == ()
    # a bucketed config's batch: the same boxes, padded to the smallest bucket holding them
    plain, bucketed = (config_batch(c, 3) for c in (cfg, variant_config(cfg, "box_buckets")))
    assert plain["boxes"].shape[1] == 8 and bucketed["boxes"].shape[1] == 8
    assert torch.equal(plain["boxes"], bucketed["boxes"])


def test_data_mode_times_the_loader_over_generated_jpegs():
    cfg = tiny()
    cfg.data.workers = 0
    result = benchmark.run(cfg, benchmark.Options(mode="data", batch=2, canvas=(64, 64), iters=2, warmup=1,
                                                  image_size=80))
    d = result["data"]
    assert d["batches"] == 2 and d["images"] == 4 and d["images_per_s"] > 0
    assert "synthetic JPEGs of about 80 px" in d["source"] and d["scale"] == (64, 64)


def test_the_command_line_writes_json(tmp_path):
    out = tmp_path / "infer.json"
    cmd = [sys.executable, "-m", "experiments.benchmark", f"--config={SMOKE}", "--mode=infer", "--canvas=64x64",
           "--batch=1", "--iters=1", "--warmup=0", "--threads=1", "--skip-flops", f"--json={out}",
           "--config.model.test.max_per_img=10"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "infer" and result["config"] == "smoke" and result["ours"]["images_per_s"] > 0
    assert result["ours"]["flops_per_image"] is None
    assert "img/s" in done.stdout and f"wrote {out}" in done.stdout


@pytest.mark.parametrize("flags, message", [
    (["--variants=no_such"], "error: --variants: unknown ['no_such']"),
    (["--canvas=512"], "error: --canvas must be HxW"),
    (["--iters=0"], "error: need --iters >= 1"),
    (["--check-steps=-1"], "error: need --iters >= 1, --warmup >= 0, --rounds >= 1, --check-steps >= 0"),
    (["--mode=fast"], "error: flag --mode=fast"),
    (["--config.train.compile=maybe"], "error: flag --config.train.compile=maybe"),
])
def test_a_mistake_in_the_flags_is_one_error_line_and_exit_status_2(flags, message):
    cmd = [sys.executable, "-m", "experiments.benchmark", f"--config={SMOKE}", "--device=cpu"] + flags
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_bad_options_are_named_before_anything_runs():
    with pytest.raises(ValueError, match="--device .tpu."):
        benchmark.run(tiny(), benchmark.Options(device="tpu"))
    with pytest.raises(ValueError, match="train.compile and train.cuda_graph together"):
        cfg = tiny()
        cfg.train.compile = cfg.train.cuda_graph = True
        benchmark.run(cfg, benchmark.Options(mode="infer", iters=1, warmup=0, count_flops=False))
    if not subjects.torchvision_available():
        with pytest.raises(ValueError, match="torchvision is not installed"):
            benchmark.run(tiny(), benchmark.Options(compare="torchvision"))


def test_flop_count_of_a_convolution_by_hand():
    x, w = torch.randn(2, 3, 10, 12), torch.randn(8, 3, 3, 3)
    # each of the 2 * 8 * 5 * 6 outputs (stride 2, padding 1) is 3 * 3 * 3 multiply-adds
    assert measurement.count_flops(lambda: F.conv2d(x, w, stride=2, padding=1)) == 2 * (2 * 8 * 5 * 6) * 27
    w.requires_grad_(True)
    # backward to the weight only: one more product of the same size
    flops = measurement.count_flops(lambda: F.conv2d(x, w, stride=2, padding=1).sum().backward())
    assert flops == 2 * 2 * (2 * 8 * 5 * 6) * 27


def test_speedup_from_medians_and_paired_by_round():
    ours = {"step_s": {"median": 2.0}, "round_medians": [1.0, 2.0, 4.0]}
    other = {"step_s": {"median": 3.0}, "round_medians": [1.5, 5.0, 4.4]}
    sp = measurement.speedup(ours, other)
    assert sp["from_medians"] == pytest.approx(1.5)
    assert sp["per_round"] == pytest.approx([1.5, 2.5, 1.1])
    assert sp["paired"] == pytest.approx(1.5)  # the median of the rounds' ratios, not the ratio of medians


def eager_capture(body, warmup):
    """A stand-in for CUDA graph capture on the CPU (retina_fn.train.graph.Capture): replay runs the body."""
    warmup()
    return body


@pytest.mark.slow
def test_the_eager_check_passes_a_graphed_step_and_catches_a_step_that_differs():
    cfg = tiny()
    spec, settings = spec_of(cfg), settings_of(cfg)
    optimizer = build_optimizer(settings)
    batch = config_batch(cfg, 3)
    start = init_train_state(spec, settings, rng.key(0), optimizer)
    eager = make_train_step(spec, settings, optimizer, steps_per_epoch=10, global_batch=2)
    graph_cfg = cfg.copy_and_resolve_references()
    graph_cfg.train.cuda_graph = True
    graphed = make_train_step(spec, settings_of(graph_cfg), optimizer, steps_per_epoch=10, global_batch=2,
                              graph_capture=eager_capture)
    fp32 = parity.TOLERANCES["fp32"]
    same = parity.compare_train(graphed, eager, start, batch, 2, fp32)
    assert same["ok"] and same["failed"] == [] and same["differences"]["update"] == 0.0
    assert len(same["differences"]["loss"]) == 2

    # a step on a 1% brighter image: every metric and the update differ
    def brighter(state, b):
        return eager(state, dict(b, image=b["image"] * 1.01))

    assert set(parity.compare_train(brighter, eager, start, batch, 2, fp32)["failed"]) >= {
        "loss", "update"}
    # a 1% larger learning rate: the same losses and gradient norm, but not the same update
    faster_cfg = cfg.copy_and_resolve_references()
    faster_cfg.optim.lr = 1.01 * cfg.optim.lr
    faster = make_train_step(spec, settings_of(faster_cfg), build_optimizer(settings_of(faster_cfg)), steps_per_epoch=10,
                             global_batch=2)
    first = parity.compare_train(faster, eager, start, batch, 1, fp32)
    assert first["differences"]["loss"] == [0.0] and first["differences"]["grad_norm"] == [0.0]
    assert "update" in first["failed"] and first["differences"]["update"] == pytest.approx(0.01, rel=0.05)
    # a rounding-sized change passes the stated tolerance but not a tolerance of zero
    def nudged(state, b):
        return eager(state, dict(b, image=b["image"] * (1 + 1e-6)))

    assert parity.compare_train(nudged, eager, start, batch, 1, fp32)["ok"]
    zero = {k: 0.0 for k in fp32}
    assert not parity.compare_train(nudged, eager, start, batch, 1, zero)["ok"]


def test_the_eager_check_of_inference_catches_other_detections():
    cfg = tiny()
    params = subjects._fresh_params(cfg, torch.device("cpu"), 0)
    batch = config_batch(cfg, 3)
    eager = make_eval_step(spec_of(cfg))
    graphed = make_eval_step(spec_of(cfg), cuda_graph=True, graph_capture=eager_capture)
    assert parity.compare_infer(graphed, eager, params, batch, parity.TOLERANCES["fp32"])["ok"]
    head = dict(params["head"], cls_logits=dict(params["head"]["cls_logits"],
                                               bias=params["head"]["cls_logits"]["bias"] + 0.1))
    shifted = parity.compare_infer(lambda p, b: eager(dict(p, head=head), b), eager, params, batch,
                                   parity.TOLERANCES["bf16"])
    assert shifted["failed"] == ["score"] and shifted["differences"]["score"] > 0.02


def test_relative_differences_of_trees_by_hand():
    a = {"x": torch.tensor([3.0, 0.0]), "n": torch.tensor(1)}
    b = {"x": torch.tensor([0.0, 4.0]), "n": torch.tensor(2)}  # integer leaves are not compared
    assert parity.tree_relative(a, b) == pytest.approx(5.0 / 4.0)
    assert parity.tree_relative(b, b) == 0.0 and parity.relative(1.5, 1.0) == pytest.approx(0.5)
    nan = {"x": torch.tensor([float("nan"), 4.0]), "n": torch.tensor(2)}
    assert math.isnan(parity.tree_relative(nan, b))
    verdict = parity.compare_train(lambda s, bt: (s, {m: torch.tensor(float("nan")) for m in parity.METRICS}),
                                   lambda s, bt: (s, {m: torch.tensor(1.0) for m in parity.METRICS}),
                                   {"params": b, "opt": b}, {}, 1, parity.TOLERANCES["bf16"])
    assert set(verdict["failed"]) == set(parity.METRICS)  # a NaN never passes


@pytest.mark.skipif(not subjects.torchvision_available(), reason="torchvision is not installed")
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_torchvision_comparison_on_a_small_canvas(mode):
    from configs import torchvision_retinanet_v1

    opts = benchmark.Options(mode=mode, batch=1, canvas=(64, 64), iters=2, rounds=2, warmup=1, compare="torchvision")
    result = benchmark.run(torchvision_retinanet_v1.get_config(), opts)
    tv, ours = result["torchvision"], result["ours"]
    assert tv["step_s"]["n"] == ours["step_s"]["n"] == 2 and len(tv["round_medians"]) == 2
    assert result["speedup_vs_torchvision"]["from_medians"] > 0
    # the same network: torchvision's FLOP count equals ours
    assert tv["flops_per_image"] == pytest.approx(ours["flops_per_image"], rel=0.01)


def test_the_device_comes_from_the_parallel_backend():
    from retina_fn.parallel import backend

    opts = benchmark.Options(mode="infer", batch=1, canvas=(64, 64), iters=1, warmup=0, count_flops=False,
                             device="cpu")
    assert benchmark.run(tiny(), opts)["machine"]["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(backend.DeviceUnavailable, match="--device"):
            benchmark.run(tiny(), opts._replace(device="cuda"))
