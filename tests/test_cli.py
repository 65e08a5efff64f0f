"""experiments.cli: a user's fixable mistake ends a program in one `error: ...` line and exit status 2, a bug keeps
its traceback, and RETINA_FN_DEBUG brings the traceback back.

Through the command line, one run per class of mistake (missing file, bad annotation file, bad image, weights
that do not fit, mistyped config field, invalid config value), spread over the five programs' entry points and
started together (each imports torch: a few seconds); the finer rules in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from absl import flags
from ml_collections import config_flags

from experiments import cli
from retina_fn import errors
from retina_fn.data.images import ImageLoadError
from tests.model_fixtures import smoke_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: (exit status, stdout, stderr)} of one command line per class of mistake, run side by side."""
    tmp = tmp_path_factory.mktemp("cli")
    ckpt = smoke_checkpoint(tmp / "ckpt", with_spec=False)  # a checkpoint of before specs: the config's spec
    (tmp / "ann").mkdir()
    (tmp / "ann" / "train.json").write_text('{"images": [')  # cut off mid-file
    (tmp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    python, coco = [sys.executable, "-m"], "experiments.coco_retinanet"
    coco_files = [f"--config.data.{k}={v}" for k, v in (("dataset", "coco"), ("root", tmp / "ann"),
                                                        ("train_ann", "train.json"), ("val_ann", "train.json"))]
    commands = {
        "missing_file": python + [coco, f"--config={ROOT}/configs/retinanet_r50_fpn_1x_coco.py",
                                  f"--workdir={tmp / 'w1'}", f"--config.data.root={tmp / 'no_coco'}"],
        "typo": python + [coco, f"--config={SMOKE}", f"--workdir={tmp / 'w2'}", "--config.optim.lrr=0.1"],
        "bad_annotation": python + [coco, f"--config={SMOKE}", f"--workdir={tmp / 'w3'}", *coco_files],
        "bad_image": python + ["experiments.predict", f"--config={SMOKE}", f"--weights={ckpt}",
                               f"--images={tmp / 'broken.jpg'}", f"--out={tmp / 'dets.json'}"],
        "checkpoint_mismatch": python + ["experiments.export", f"--config={SMOKE}", f"--weights={ckpt}",
                                         f"--out={tmp / 'export'}", "--canvas=64x64", "--config.data.scale=64,64",
                                         "--config.model.num_classes=3"],
        "invalid_value": python + ["experiments.benchmark", f"--config={SMOKE}", "--mode=train",
                                   f"--json={tmp / 'bench.json'}", "--config.train.precision=fp17"],
    }
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    env["OMP_NUM_THREADS"] = "1"
    started = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, cmd in commands.items()}
    done = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=300)
        done[name] = (proc.returncode, out, err)
    return dict(done, tmp=tmp)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("case, first_line", [
    ("missing_file", "error: annotation file not found: {tmp}/no_coco/annotations/instances_train2017.json "
                     "(data.root='{tmp}/no_coco' joined with data.train_ann='annotations/instances_train2017.json'; "
                     "point --config.data.root or --config.data.train_ann at the file)"),
    ("typo", "error: --config.optim.lrr: optim has no field 'lrr'. Did you mean --config.optim.lr?"),
    ("bad_annotation", "error: {tmp}/ann/train.json: malformed JSON: Expecting value: line 1 column 13 (char 12)"),
    ("bad_image", "error: cannot decode image {tmp}/broken.jpg (image id 0): "),
    ("checkpoint_mismatch", "error: {tmp}/ckpt/ckpt_000000001.pt does not match the model:"),
    ("invalid_value", "error: --config.train.precision='fp17': must be one of ('fp32', 'fp16', 'bf16')"),
])
def test_a_users_mistake_is_one_error_line_and_exit_status_2(runs, case, first_line):
    status, _, stderr = runs[case]
    expected = first_line.format(tmp=runs["tmp"])
    assert status == cli.EXIT_USER_ERROR, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith(expected), stderr[-3000:]
    if case == "checkpoint_mismatch":  # the report goes on with the fix
        assert "set --config.model.num_classes=5 to use the checkpoint's head" in stderr


# ----------------------------------------------------------------------------------------------------
# In-process: what is caught and what is not


def test_call_reports_user_errors_and_lets_bugs_through(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def fails(err):
        raise err

    assert cli.call(fails, errors.ConfigError("optim.lr must be > 0, got -1")) == 2
    assert capsys.readouterr().err == "error: optim.lr must be > 0, got -1\n"
    with pytest.raises(ValueError, match="a bug"):  # a plain ValueError is not the user's: traceback
        cli.call(fails, ValueError("a bug"))
    assert cli.call(lambda: 7) == 7
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(errors.ConfigError):
        cli.call(fails, errors.ConfigError("optim.lr must be > 0, got -1"))
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert not cli.debugging()


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise ImageLoadError("image file not found: x.jpg (image id 3)", "x.jpg", 3)


def test_an_image_error_from_a_loader_worker_is_still_the_users_and_keeps_its_message():
    loader = torch.utils.data.DataLoader(_Unreadable(), num_workers=1)
    with pytest.raises(ImageLoadError) as caught:
        next(iter(loader))
    assert "DataLoader worker process 0" in str(caught.value)  # torch's re-raise wraps the message
    assert cli.error_message(caught.value) == "image file not found: x.jpg (image id 3)"


def parse(tmp_path, monkeypatch, *args: str, config: str = "x = 1") -> list[str]:
    """cli.parse_flags on a fresh set of flags with a config flag over tmp_path/cfg.py, whose get_config()
    returns {'optim': {'lr': 0.01, 'momentum': 0.9}, 'data': {'root': ''}} after running `config`."""
    (tmp_path / "cfg.py").write_text(
        "from ml_collections import ConfigDict\n\n\ndef get_config():\n    " + config + "\n"
        "    return ConfigDict({'optim': {'lr': 0.01, 'momentum': 0.9}, 'data': {'root': ''}})\n")
    argv = ["prog", *args]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values)
    flags.DEFINE_integer("batch", 1, "batch", flag_values=values)
    return cli.parse_flags(argv, values)


def test_flag_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    cfg = str(tmp_path / "cfg.py")
    assert parse(tmp_path, monkeypatch, f"--config={cfg}", "--config.optim.lr=0.1", "rest") == ["prog", "rest"]
    for args, message in [
        (["--config.optim.moment=0.5"], "--config.optim.moment: optim has no field 'moment'. Did you mean "
                                        "--config.optim.momentum?"),
        (["--config.optim.zzz=0.5"], "--config.optim.zzz: optim has no field 'zzz'. Its fields: lr, momentum."),
        (["--config.optim.lr.x=1"], "--config.optim.lr.x: optim.lr is a value (float), not a group of fields"),
        (["--config.optim.lr=fast"], "flag --config.optim.lr=fast: could not convert string to float: 'fast'"),
        (["--batch=two"], "flag --batch=two: invalid literal for int() with base 10: 'two'"),
    ]:
        with pytest.raises(SystemExit) as stop:
            parse(tmp_path, monkeypatch, f"--config={cfg}", *args)
        assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n", args
    for args in (["--config=nowhere/cfg.py"], ["--config=nowhere/cfg.py", "--config.optim.lr=0.1"]):
        with pytest.raises(SystemExit) as stop:
            parse(tmp_path, monkeypatch, *args)
        assert stop.value.code == 2
        assert capsys.readouterr().err.startswith("error: --config nowhere/cfg.py: config file not found")


def test_a_bug_while_parsing_keeps_its_traceback(tmp_path, monkeypatch):
    """An AttributeError in the config file's own code is not an override typo."""
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        parse(tmp_path, monkeypatch, f"--config={tmp_path / 'cfg.py'}", "--config.optim.lr=0.1",
              config="import os; os.nope")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(AttributeError):  # a typo too, when debugging
        parse(tmp_path, monkeypatch, f"--config={tmp_path / 'cfg.py'}", "--config.optim.lrr=0.1")
