"""The benchmark harness (experiments/benchmark/) on a tiny config: its runs, JSON and command line, device
choice, variants and their patches, FLOP counting and speed-up arithmetic, and compiled-vs-eager parity of
the whole train step."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from experiments import benchmark
from experiments.benchmark import variants
from retina_fn import postprocess, rng, tree
from retina_fn.data.random_batch import random_batch
from retina_fn.model import resnet
from retina_fn.train import build_optimizer, init_train_state, make_train_step
from tests.model_fixtures import synthetic_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAT_KEYS = {"median", "p10", "p90", "min", "max", "mean", "n"}


def tiny(canvas=(64, 64)):
    cfg = tiny_config(canvas=canvas)
    cfg.model.head.stacked_convs = 1
    cfg.data.max_boxes = 8
    return cfg


def check_subject(r: dict, iters: int) -> None:
    assert set(r["step_s"]) >= STAT_KEYS and r["step_s"]["n"] == iters == len(r["times"])
    s = r["step_s"]
    assert 0 < s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"]
    assert r["images_per_s"] == pytest.approx(2 / s["median"])
    assert r["peak_memory_mb"] > 0 and r["memory_kind"]
    assert r["flops_per_image"] > 0
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_image"] * 2 / s["median"] / 1e12)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.5)


def test_train_and_infer_run_one_iteration_and_write_valid_json(tmp_path):
    opts = dict(batch=2, canvas=(64, 64), iters=1, warmup=1, peak_tflops=0.5, threads=None)
    train = benchmark.run(tiny(), benchmark.Options(mode="train", variants=("unfolded_bn",), **opts))
    infer = benchmark.run(tiny(), benchmark.Options(mode="infer", **opts))
    for result in (train, infer):
        path = tmp_path / f"{result['mode']}.json"
        benchmark.write_json(str(path), result)
        loaded = json.loads(path.read_text())
        assert loaded["batch"] == 2 and loaded["canvas"] == [64, 64] and loaded["precision"] == "fp32"
        check_subject(loaded["ours"], iters=1)
        assert loaded["machine"]["threads"] >= 1 and loaded["machine"]["torch"] == torch.__version__
        assert loaded["torchvision"] is None
        assert isinstance(benchmark.format_table(loaded), str)
    # forward + backward counts more than the forward alone: about 3x, less the frozen stem's backward
    ratio = train["ours"]["flops_per_image"] / infer["ours"]["flops_per_image"]
    assert 2.0 < ratio < 3.05
    variant = train["variants"]["unfolded_bn"]
    check_subject(variant, iters=1)
    assert variant["speedup_of_ours"]["paired"] == pytest.approx(variant["step_s"]["median"] /
                                                                  train["ours"]["step_s"]["median"])
    assert 0 <= infer["ours"]["breakdown"]["detect_share"] <= 1


def test_data_mode_times_the_loader_over_generated_jpegs():
    cfg = tiny()
    cfg.data.workers = 0
    result = benchmark.run(cfg, benchmark.Options(mode="data", batch=2, canvas=(64, 64), iters=2, warmup=1,
                                                  image_size=80))
    d = result["data"]
    assert d["batches"] == 2 and d["images"] == 4 and d["images_per_s"] > 0
    assert "synthetic JPEGs of about 80 px" in d["source"] and d["scale"] == (64, 64)


def test_command_line_writes_json(tmp_path):
    out = tmp_path / "infer.json"
    cmd = [sys.executable, "-m", "experiments.benchmark", "--config", os.path.join(ROOT, "configs", "smoke.py"),
           "--mode", "infer", "--canvas", "64x64", "--batch", "1", "--iters", "1", "--warmup", "0", "--threads", "1",
           "--skip-flops", "--json", str(out), "--config.model.test.max_per_img=10"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "infer" and result["config"] == "smoke" and result["ours"]["images_per_s"] > 0
    assert result["ours"]["flops_per_image"] is None
    assert "ours" in done.stdout and "img/s" in done.stdout


@pytest.mark.skipif(not benchmark.torchvision_available(), reason="torchvision is not installed")
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_torchvision_comparison_on_a_small_canvas(mode):
    from configs import torchvision_retinanet_v1

    opts = benchmark.Options(mode=mode, batch=1, canvas=(64, 64), iters=2, rounds=2, warmup=1, compare="torchvision")
    result = benchmark.run(torchvision_retinanet_v1.get_config(), opts)
    tv, ours = result["torchvision"], result["ours"]
    assert tv["step_s"]["n"] == ours["step_s"]["n"] == 2 and len(tv["round_medians"]) == 2
    assert tv["variant"] == "pretrained" and result["ratio_images_per_s"] > 0
    # the same network: torchvision's FLOP count equals ours
    assert tv["flops_per_image"] == pytest.approx(ours["flops_per_image"], rel=0.01)


def test_bad_arguments_are_named():
    assert benchmark.parse_canvas("512x768") == (512, 768)
    with pytest.raises(ValueError, match="--canvas"):
        benchmark.parse_canvas("512")
    with pytest.raises(ValueError, match="--variants"):
        benchmark.run(tiny(), benchmark.Options(variants=("no_such",)))
    with pytest.raises(ValueError, match="--iters"):
        benchmark.run(tiny(), benchmark.Options(iters=0))
    with pytest.raises(ValueError, match="--device .tpu."):
        benchmark.run(tiny(), benchmark.Options(device="tpu"))


def test_device_comes_from_the_parallel_backend():
    from retina_fn.parallel import backend

    opts = benchmark.Options(mode="infer", batch=1, canvas=(64, 64), iters=1, warmup=0, count_flops=False,
                             device="cpu")
    assert benchmark.run(tiny(), opts)["machine"]["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(backend.DeviceUnavailable, match="--device"):
            benchmark.run(tiny(), opts._replace(device="cuda"))


def test_variants_edit_a_copy_and_patches_are_undone():
    cfg = tiny()
    cfg.train.compile = False
    setups = variants.variant_setups(cfg, ("nchw", "compile_step", "unfolded_bn"))
    assert [name for name, _, _ in setups] == ["ours", "ours-nchw", "ours-compile_step", "ours-unfolded_bn"]
    assert setups[0][1] is cfg and cfg.train.compile is False
    assert setups[1][1].model.backbone.channels_last is False and setups[2][1].train.compile is True
    original_conv_norm, original_top = resnet._conv_norm, postprocess._top_sorted
    for name in ("unfolded_bn", "sort_topk"):
        with pytest.raises(RuntimeError, match="inside"):
            with variants.VARIANTS[name].patch():
                assert (resnet._conv_norm, postprocess._top_sorted) != (original_conv_norm, original_top)
                raise RuntimeError("inside")
    assert resnet._conv_norm is original_conv_norm and postprocess._top_sorted is original_top


def test_flop_count_of_a_convolution_by_hand():
    x, w = torch.randn(2, 3, 10, 12), torch.randn(8, 3, 3, 3)
    # each of the 2 * 8 * 5 * 6 outputs (stride 2, padding 1) is 3 * 3 * 3 multiply-adds
    assert benchmark.count_flops(lambda: F.conv2d(x, w, stride=2, padding=1)) == 2 * (2 * 8 * 5 * 6) * 27
    w.requires_grad_(True)
    # backward to the weight only: one more product of the same size
    flops = benchmark.count_flops(lambda: F.conv2d(x, w, stride=2, padding=1).sum().backward())
    assert flops == 2 * 2 * (2 * 8 * 5 * 6) * 27


def test_speedup_from_medians_and_paired_by_round():
    ours = {"step_s": {"median": 2.0}, "round_medians": [1.0, 2.0, 4.0]}
    other = {"step_s": {"median": 3.0}, "round_medians": [1.5, 5.0, 4.4]}
    sp = benchmark.speedup(ours, other)
    assert sp["from_medians"] == pytest.approx(1.5)
    assert sp["per_round"] == pytest.approx([1.5, 2.5, 1.1])
    assert sp["paired"] == pytest.approx(1.5)


def test_the_benchmark_batch_follows_the_conventions():
    """run() times random_batch(batch_size=...) with the config's box counts and classes."""
    cfg = tiny()

    def build(seed):
        return random_batch(batch_size=3, canvas=(256, 384), max_boxes=cfg.data.max_boxes,
                            max_ignore_boxes=cfg.data.max_ignore_boxes, num_classes=cfg.model.num_classes,
                            seed=seed, device=torch.device("cpu"))

    b = build(1)
    assert b["image"].shape == (3, 3, 256, 384) and b["boxes"].shape == (3, 8, 4)
    assert b["ignore_boxes"].shape == (3, cfg.data.max_ignore_boxes, 4) and not bool(b["ignore_valid"].any())
    counts = b["box_valid"].sum(1)
    assert bool(((counts >= 3) & (counts <= 6)).all())
    real = b["boxes"][b["box_valid"]]
    assert bool((real[:, 2:] > real[:, :2]).all()) and bool((real[:, 2] <= 384).all() & (real[:, 3] <= 256).all())
    assert bool((b["boxes"][~b["box_valid"]] == 0).all()) and int(b["labels"].max()) < cfg.model.num_classes
    assert tree.all_equal(b, build(1)) and not torch.equal(b["image"], build(2)["image"])


def test_compiled_train_step_matches_eager():
    """train.compile compiles the whole pure step; three SGD steps on a tiny model must match the eager step."""
    cfg = tiny(canvas=(64, 64))
    cfg.model.backbone.base_width = 16
    compiled_cfg = cfg.copy_and_resolve_references()
    compiled_cfg.train.compile = True
    optimizer = build_optimizer(cfg)
    eager = make_train_step(cfg, optimizer, steps_per_epoch=10, global_batch=2)
    compiled = make_train_step(compiled_cfg, optimizer, steps_per_epoch=10, global_batch=2)
    torch._dynamo.reset()
    s_eager = s_compiled = init_train_state(cfg, rng.key(0), optimizer)
    for i in range(3):
        batch = synthetic_batch(num_boxes=(1, 3), canvas=(64, 64), max_boxes=8, num_classes=3, seed=i)
        s_eager, m_eager = eager(s_eager, batch)
        s_compiled, m_compiled = compiled(s_compiled, batch)
        assert float(m_eager["num_pos"]) > 0 and float(m_eager["finite"]) == 1.0
        for k in ("loss", "loss_cls", "loss_box", "normalizer", "grad_norm", "lr"):
            assert torch.allclose(m_compiled[k], m_eager[k], rtol=1e-5, atol=1e-7), k
    flat_compiled = tree.flatten_by_path(s_compiled["params"])
    for path, p in tree.flatten_by_path(s_eager["params"]).items():
        assert torch.allclose(flat_compiled[path], p, rtol=1e-5, atol=1e-7), path
    assert int(s_compiled["step"]) == 3
