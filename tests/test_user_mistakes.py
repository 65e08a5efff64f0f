"""A user's mistake ends every program in one `error: ...` line naming the field (exit status 2), Ctrl-C in one
`interrupted: ...` line (exit status 130), through the command line; and the smaller promises behind them.

One short smoke run makes the checkpoint the resume cases start from; the mistakes then run side by side."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from experiments import cli
from retina_fn import viz
from retina_fn.engine import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = [sys.executable, "-m"]
TRAIN = "experiments.coco_retinanet"


def env() -> dict:
    found = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    return dict(found, OMP_NUM_THREADS="1")


def smoke(tmp, workdir, *extra: str) -> list[str]:
    return PY + [TRAIN, "--config=configs/smoke.py", f"--workdir={workdir}", f"--config.data.root={tmp / 'data'}",
                 "--config.train.validate=False", "--config.train.max_steps=2", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tmp, the run folder) of a 2-step smoke run."""
    tmp = tmp_path_factory.mktemp("mistakes")
    done = subprocess.run(smoke(tmp, tmp / "run"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, tmp / "run"


def copy_run(tmp, run, name):
    shutil.copytree(run, tmp / name)
    return tmp / name


@pytest.fixture(scope="module")
def mistakes(trained):
    """{case: (exit status, stderr)} of one command line per mistake, run side by side."""
    tmp, run = trained
    ckpt = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    (tmp / "empty").mkdir()
    predict = PY + ["experiments.predict", f"--weights={ckpt}", f"--out={tmp / 'dets.json'}"]
    commands = {
        "images_per_device": smoke(tmp, tmp / "w1", "--config.data.images_per_device=-1"),
        "device": smoke(tmp, tmp / "w2", "--config.dist.device=tpu"),
        "seed": smoke(tmp, tmp / "w3", "--config.seed=-1"),
        "accum_steps": smoke(tmp, tmp / "w4", "--config.optim.accum_steps=0"),
        "micro_batches": smoke(tmp, tmp / "w5", "--config.optim.micro_batches=3"),
        "max_boxes": smoke(tmp, tmp / "w6", "--config.data.max_boxes=0"),
        "dataset": smoke(tmp, tmp / "w7", "--config.data.dataset=cocoo"),
        "predict_batch_size": predict + ["--images=x.jpg", "--batch_size=0"],
        "predict_no_images": predict,
        "eval_no_checkpoint": PY + [TRAIN, "--mode=eval", f"--workdir={tmp / 'empty'}"],
        "head_width": smoke(tmp, copy_run(tmp, run, "c1"), "--config.model.head.feat_channels=16"),
        "batch_size": smoke(tmp, copy_run(tmp, run, "c2"), "--config.data.images_per_device=4"),
        "other_config": PY + [TRAIN, "--config=configs/demo.py", f"--workdir={copy_run(tmp, run, 'c3')}",
                              f"--config.data.root={tmp / 'data_demo'}", "--config.data.synthetic.num_train=8",
                              "--config.data.synthetic.num_val=2"],
        "more_epochs": smoke(tmp, copy_run(tmp, run, "c4"), "--config.optim.epochs=40"),
        "more_steps": smoke(tmp, copy_run(tmp, run, "c5"), "--config.train.max_steps=3"),
    }
    started = {k: subprocess.Popen(c, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for k, c in commands.items()}
    return {k: (p.wait(timeout=300), p.communicate()[1]) for k, p in started.items()}


@pytest.mark.parametrize("case, names, at_start", [
    ("images_per_device", ["--config.data.images_per_device=-1"], True),
    ("device", ["--config.dist.device='tpu'"], True),
    ("seed", ["--config.seed=-1"], True),
    ("accum_steps", ["--config.optim.accum_steps=0"], True),
    ("micro_batches", ["--config.optim.micro_batches=3", "data.images_per_device=8"], True),
    ("max_boxes", ["--config.data.max_boxes=0"], True),
    ("dataset", ["--config.data.dataset='cocoo'", "'synthetic'"], True),
    ("predict_batch_size", ["--batch_size", "got 0"], True),
    ("predict_no_images", ["--images"], True),
    ("eval_no_checkpoint", ["no usable checkpoint", "empty/checkpoints", "--weights"], True),
    ("head_width", ["(config 'smoke')", "--config.model.head.feat_channels=16 (the checkpoint's 32)"], False),
    ("batch_size", ["global batch of 8", "--config.optim.accum_steps=2"], False),
    ("other_config", ["(config 'smoke')", "this config ('demo')", "--config.model.fpn.out_channels=64"], False),
    ("more_epochs", ["(config 'smoke')", "--config.optim.epochs=40 (the checkpoint's 30)", "new --workdir"], False),
])
def test_a_mistake_is_one_error_line_naming_the_field(mistakes, case, names, at_start):
    status, stderr = mistakes[case]
    lines = stderr.strip().splitlines()
    assert status == cli.EXIT_USER_ERROR, stderr[-3000:]
    assert "Traceback" not in stderr and "reinit_class_head" not in stderr
    assert lines[-1].startswith("error: ") and all(n in lines[-1] for n in names), lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1
    if at_start:  # refused before anything is built or logged
        assert len(lines) == 1, lines


def test_a_longer_run_of_the_same_schedule_resumes(mistakes):
    status, stderr = mistakes["more_steps"]
    assert status == 0, stderr[-3000:]
    assert "resumed from" in stderr and "ckpt_000000002.pt" in stderr


def test_torchrun_shows_the_workers_one_line(tmp_path):
    """Through the scripts' launcher with one CPU process: the worker's line, not torchrun's report."""
    from tests.dist_scripts import launch

    done = subprocess.run(PY + ["experiments.launch", "--nproc_per_node=1", f"--master_port={launch.free_port()}",
                                "-m", TRAIN, "--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.seed=-1"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == ["error: --config.seed=-1: must be an integer in 0..9223372036854775807"]


def interrupt_after(command: list[str], line: str, timeout: float = 240) -> tuple[int, list[str]]:
    """Starts command, sends it SIGINT once `line` is in its stderr; returns (exit status, stderr lines)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen, deadline = [], time.monotonic() + timeout
    for text in proc.stderr:
        seen.append(text.rstrip("\n"))
        if line in text or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    seen.extend(proc.stderr.read().splitlines())
    return proc.wait(timeout=60), seen


def check_interrupted(status, lines, *names):
    assert status == cli.EXIT_INTERRUPTED, lines[-20:]
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), lines[-20:]
    assert [line for line in lines if line.startswith("interrupted: ")] == [lines[-1]]
    assert all(n in lines[-1] for n in names), lines[-1]


def test_ctrl_c_in_training_names_the_checkpoint_it_resumes_from(trained, tmp_path):
    tmp, _ = trained
    work = tmp_path / "run"
    status, lines = interrupt_after(smoke(tmp, work, "--config.train.max_steps=400", "--config.train.log_every=1",
                                          "--config.train.checkpoint_every_steps=1"), "checkpoint ")
    newest = sorted((work / "checkpoints").glob("ckpt_*.pt"))[-1]
    check_interrupted(status, lines, f"the newest checkpoint is {newest}", "the same command resumes from it")


def test_ctrl_c_while_compiling_says_so_first(trained, tmp_path):
    tmp, _ = trained
    status, lines = interrupt_after(smoke(tmp, tmp_path / "run", "--config.train.compile=True"),
                                    "compiling the train step")
    assert any("train.compile=True: compiling the train step (takes minutes on the first step)..." in line
               for line in lines)
    check_interrupted(status, lines, "before its first checkpoint", "the same command starts it again")


def test_ctrl_c_in_eval_and_predict(trained, tmp_path):
    tmp, run = trained
    status, lines = interrupt_after(PY + [TRAIN, "--mode=eval", f"--workdir={run}"], "evaluating ")
    check_interrupted(status, lines, "evaluation of", "the same command evaluates it again")
    image = tmp_path / "a.png"
    Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(image)
    ckpt = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    status, lines = interrupt_after(PY + ["experiments.predict", f"--weights={ckpt}", f"--out={tmp_path / 'd.json'}",
                                          "--images", *[str(image)] * 400], "predicting 400 image(s)")
    check_interrupted(status, lines, "prediction stopped", "the same command predicts again")


def test_make_synthetic_refuses_a_folder_it_did_not_write(tmp_path):
    command = PY + ["experiments.make_synthetic", f"--out={tmp_path}", "--num-train=2", "--num-val=1", "--seed=0",
                    "--image-size=64"]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text('{"mine": 1}')
    done = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: --out {tmp_path} holds annotations/ but no synthetic.json: not a folder this program wrote, so it "
        f"is not written over; pass an empty or new --out"]
    assert (tmp_path / "annotations" / "instances_train.json").read_text() == '{"mine": 1}'
    shutil.rmtree(tmp_path / "annotations")
    for _ in range(2):  # its own output, written over
        done = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "annotations" / "instances_train.json").read_text())["images"]) == 2


def test_export_prints_no_warnings(trained, tmp_path):
    _, run = trained
    ckpt = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    done = subprocess.run(PY + ["experiments.export", f"--weights={ckpt}", f"--out={tmp_path / 'e'}",
                                "--canvas=160x160"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if "Warning" in line or line.startswith("W")] == []


def test_vis_images_are_enlarged_and_explain_the_white_boxes():
    image = np.full((120, 150, 3), 100, np.uint8)
    img = viz.draw_detections(image, np.array([[10.0, 10, 60, 60]]), np.array([0.9]), np.array([0]), ["a"],
                          gt_boxes=np.array([[20.0, 30, 100, 90]]), min_side=480)
    assert img.size == (600, 480)
    pixels = np.asarray(img)
    assert (pixels[120, 250:400] == 255).all()  # the ground truth's top edge, at 4x
    strip = pixels[-14:, :200]
    assert (strip == 0).all(axis=-1).mean() > 0.5 and (strip > 200).all(axis=-1).any()  # light text on black
    plain = viz.draw_detections(image, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), ["a"])
    assert plain.size == (150, 120) and (np.asarray(plain) == 100).all()  # no legend without ground truth
    assert "white: ground truth" in viz.LEGEND


def test_a_run_too_short_to_leave_out_warm_up_reports_its_rate():
    seg = dict(measured_images=0, measured_s=0.0, start_step=0, end_step=3, global_batch=4, train_s=2.0)
    assert reporting.throughput([seg]) == (6.0, True)
    measured = dict(seg, measured_images=40, measured_s=4.0)
    assert reporting.throughput([measured, seg]) == (10.0, False)
    assert reporting.throughput([dict(seg, end_step=0)]) == (0.0, False)
