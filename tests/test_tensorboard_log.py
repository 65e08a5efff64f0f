"""train.tensorboard=True: the records of metrics.jsonl also go to TensorBoard scalars (retina_fn.engine.hooks.
MetricsLog), read back here with TensorBoard's own EventAccumulator and compared with the JSONL file."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from configs import smoke
from retina_fn.engine import hooks as train_hooks, trainer


def scalars_in(log_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files under log_dir, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_equal_the_jsonl_records(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the project's [dev] extra has it)")
    cfg = smoke.get_config()
    cfg.data.root = str(tmp_path / "data")
    cfg.data.synthetic.num_train = 16
    cfg.data.synthetic.num_val = 4
    cfg.train.max_steps = 3
    cfg.train.log_every = 1
    cfg.train.tensorboard = True
    cfg.eval.max_vis_images = 0
    cfg.dist.device = "cpu"
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(cfg, str(workdir))

    records = [json.loads(line) for line in (workdir / train_hooks.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3]
    scalars = scalars_in(workdir / train_hooks.TENSORBOARD_DIR)
    for tag in ("train/loss", "train/loss_cls", "train/loss_box", "train/lr", "train/images_per_s", "eval/bbox_mAP",
                "eval/bbox_mAP_50"):
        assert tag in scalars, sorted(scalars)
    expected = {}
    for r in records:
        for key, value in r.items():
            if key not in ("kind", "step"):
                expected.setdefault(f"{r['kind']}/{key}", {})[r["step"]] = value
    assert set(scalars) == set(expected)
    for tag, by_step in expected.items():
        assert set(scalars[tag]) == set(by_step), tag
        for step, value in by_step.items():  # event files hold float32
            assert scalars[tag][step] == np.float32(value) or (np.isnan(value) and np.isnan(scalars[tag][step])), \
                (tag, step, scalars[tag][step], value)


def test_without_the_flag_no_event_file_is_written(tmp_path):
    log = train_hooks.MetricsLog(str(tmp_path))
    log.write({"kind": "train", "step": 1, "loss": 0.5})
    log.close()
    assert log.read() == [{"kind": "train", "step": 1, "loss": 0.5}]
    assert not (tmp_path / train_hooks.TENSORBOARD_DIR).exists()


def test_a_missing_tensorboard_stops_the_run_before_training(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else real_find_spec(name, *args))
    with pytest.raises(ImportError, match=r"train.tensorboard=True needs the tensorboard package: pip install "
                                          r"tensorboard"):
        train_hooks.MetricsLog(str(tmp_path), tensorboard=True)
    cfg = smoke.get_config()
    cfg.data.root = str(tmp_path / "data")
    cfg.data.synthetic.num_train = 8
    cfg.data.synthetic.num_val = 2
    cfg.train.tensorboard = True
    cfg.dist.device = "cpu"
    with pytest.raises(ImportError, match="--config.train.tensorboard=False"):
        trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / train_hooks.METRICS_FILE).exists()
