"""Files a user passes around (checkpoints, weights files, export folders) never run code and never give a quietly
wrong answer: every fault ends in one user error naming the file (and the field or tensor at fault)."""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from configs import smoke
from retina_fn import checkpoint, errors, tree
from retina_fn.export import folder as export_folder, program as export_program
from retina_fn.interop import CheckpointMismatch, weights as weights_lib
from retina_fn import predictor
from retina_fn.predictor import Predictor
from tests.model_fixtures import spec_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES: collections.Counter = collections.Counter()  # cases tried per family, printed at the end (pytest -s)


def teardown_module():
    print("\ncases per family:", dict(sorted(CASES.items())))


class OpensAFile:
    """Unpickling this calls open(marker, 'w'), which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def payload_bytes(marker, as_torch: bool = True) -> bytes:
    """A pickle that creates `marker` when unpickled: as torch.save writes it, or a bare pickle."""
    if not as_torch:
        return pickle.dumps({"w": OpensAFile(marker)}, protocol=2)
    buffer = io.BytesIO()
    torch.save((OpensAFile(marker),), buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------
# Export folders


class Scale(torch.nn.Module):
    """A one-constant program: enough for an archive of torch.export's layout."""

    def __init__(self):
        super().__init__()
        self.w = torch.ones(4)

    def forward(self, x):
        return x * self.w


@pytest.fixture(scope="module")
def program_folder(tmp_path_factory):
    """An export folder of experiments.export's layout (model.json of the smoke detector) whose model.pt2 is a small
    program saved as retina_fn.export saves it (no sample inputs)."""
    root = tmp_path_factory.mktemp("program")
    program = torch.export.export(Scale(), (torch.ones(4),))
    program.example_inputs = None
    torch.export.save(program, str(root / export_folder.PROGRAM_FILE))
    spec = export_program.export_spec(spec_of(smoke.get_config()), (160, 160))
    meta = export_folder.make_spec(spec, name="t", batch=1, files={"exported": export_folder.PROGRAM_FILE},
                                   weights="w.pt", opset=None)
    (root / export_folder.SPEC_FILE).write_text(json.dumps(meta))
    return root


def rewrite(folder, out, edit) -> str:
    """A copy of `folder` whose model.pt2 is rewritten entry by entry: edit(entries {name: bytes}) changes them."""
    shutil.copytree(folder, out)
    path = os.path.join(out, export_folder.PROGRAM_FILE)
    with zipfile.ZipFile(os.path.join(folder, export_folder.PROGRAM_FILE)) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    edit(entries)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def _config(entries, kind):
    name = f"model/data/{kind}/model_{kind}_config.json"
    return name, json.loads(entries[name])


def pickled_constant(marker):
    def edit(entries):
        name, cfg = _config(entries, "constants")
        cfg["config"]["w"]["use_pickle"] = True
        entries[name] = json.dumps(cfg).encode()
        entries["model/data/constants/tensor_0"] = payload_bytes(marker)
    return edit


def pickled_weight(marker):
    def edit(entries):
        name, cfg = _config(entries, "weights")
        cfg["config"]["v"] = {"path_name": "weight_0", "is_param": True, "use_pickle": True, "tensor_meta": None}
        entries[name] = json.dumps(cfg).encode()
        entries["model/data/weights/weight_0"] = payload_bytes(marker)
    return edit


def opaque_constant(marker):
    def edit(entries):
        name, cfg = _config(entries, "constants")
        cfg["config"]["o"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False,
                              "tensor_meta": None}
        entries[name] = json.dumps(cfg).encode()
        entries["model/data/constants/opaque_obj_0"] = payload_bytes(marker, as_torch=False)
    return edit


def sample_inputs(marker):
    def edit(entries):
        entries["model/data/sample_inputs/model.pt"] = payload_bytes(marker)
    return edit


def legacy_constants(marker):
    def edit(entries):
        entries["model/data/constants/model.pt"] = payload_bytes(marker)
    return edit


PLANTS = {"pickled constant": pickled_constant, "pickled weight": pickled_weight, "opaque object": opaque_constant,
          "sample inputs": sample_inputs, "legacy constants file": legacy_constants}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_an_export_folder_carrying_code_is_refused_unrun(program_folder, tmp_path, plant):
    CASES["planted payload"] += 1
    marker = tmp_path / "ran"
    path = rewrite(program_folder, tmp_path / "out", PLANTS[plant](marker))
    with pytest.raises(errors.InputFormatError, match=rf"^{path}: .*refused unloaded \(nothing of it was run\)"):
        Predictor(str(tmp_path / "out"))
    assert not marker.exists()


def test_predict_exported_refuses_a_planted_program_in_one_line(program_folder, tmp_path):
    CASES["planted payload"] += 1
    marker = tmp_path / "ran"
    path = rewrite(program_folder, tmp_path / "out", sample_inputs(marker))
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    done = subprocess.run([sys.executable, "-m", "experiments.predict", f"--exported={tmp_path / 'out'}",
                           "--images", str(image), f"--out={tmp_path / 'dets.json'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: entry model/data/sample_inputs/model.pt holds pickled sample inputs")
    assert "Traceback" not in done.stderr and not marker.exists()


def test_a_program_folder_saved_as_export_saves_it_loads(program_folder):
    export_folder.check_archive(str(program_folder / export_folder.PROGRAM_FILE))
    run = torch.export.load(str(program_folder / export_folder.PROGRAM_FILE)).module()
    assert torch.equal(run(torch.full((4,), 2.0)), torch.full((4,), 2.0))


def test_a_truncated_or_flipped_program_names_the_file(program_folder, tmp_path):
    for name, damage in (("truncated", lambda d: d[:len(d) // 2]),
                         ("bit flip", lambda d: d[:200] + bytes([d[200] ^ 0x10]) + d[201:])):
        CASES["bit flip"] += 1
        shutil.copytree(program_folder, tmp_path / name)
        path = str(tmp_path / name / export_folder.PROGRAM_FILE)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(damage(data))
        with pytest.raises(errors.InputFormatError, match=rf"^{path}: "):
            Predictor(str(tmp_path / name))


def test_a_non_finite_program_constant_is_refused_naming_it(program_folder, tmp_path):
    def edit(entries):
        entries["model/data/constants/tensor_0"] = struct.pack("<4f", 1.0, float("inf"), 1.0, 1.0)
    path = rewrite(program_folder, tmp_path / "out", edit)
    with pytest.raises(errors.InputFormatError, match=rf"^{path}: tensor 'w' holds non-finite values \(1 of 4"):
        Predictor(str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------------
# Checkpoints and weights files carrying code


def test_a_checkpoint_or_weights_file_carrying_code_is_refused_unrun(tmp_path, caplog):
    marker = tmp_path / "ran"
    checkpoint.save(str(tmp_path), 1, {"params": {"w": torch.ones(2)}})
    planted = checkpoint.path_for(str(tmp_path), 2)
    torch.save({"format": checkpoint.FORMAT, "step": 2, "state": {"w": OpensAFile(marker)}, "meta": {}}, planted)
    weights = tmp_path / "w.pth"
    weights.write_bytes(payload_bytes(marker, as_torch=False))
    CASES["planted payload"] += 3
    with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"^{planted}: refused by weights-only loading"):
        checkpoint.load(planted)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore_latest(str(tmp_path)).step == 1
    assert f"{planted}: refused" in caplog.text
    with pytest.raises(CheckpointMismatch, match=rf"^{weights}: refused by weights-only loading: it names the "
                                                 r"Python object io\.open"):
        weights_lib.read_weights(weights)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# Bit flips, sidecars, non-finite and mis-shaped tensors


def tensor_records(path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each tensor record of a torch zip file."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                f.seek(info.header_offset)
                header = f.read(30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                out.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
    return out


def two_checkpoints(directory):
    state = lambda s: {"params": {"w": torch.full((8, 8), float(s)), "b": torch.arange(5.0) + s},
                       "step": torch.tensor(s)}
    checkpoint.save(str(directory), 1, state(1))
    return checkpoint.save(str(directory), 2, state(2))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_bit_flip_in_tensor_data_without_the_sidecar_is_caught(tmp_path, caplog, where):
    newest = two_checkpoints(tmp_path)
    os.remove(newest[:-3] + ".sha256")
    for name, offset, size in tensor_records(newest):
        CASES["bit flip"] += 1
        at = offset + {"first": 0, "middle": size // 2, "last": size - 1}[where]
        with open(newest, "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0x04]))
        with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"^{newest}: content does not match the digest "
                                                                 r"stored in it"):
            checkpoint.load(newest)
        with pytest.raises(CheckpointMismatch, match=rf"^{newest}: content does not match"):
            weights_lib.read_weights(newest)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert checkpoint.restore_latest(str(tmp_path)).step == 1
        assert f"skipping checkpoint: {newest}: content does not match" in caplog.text
        with open(newest, "r+b") as f:
            f.seek(at)
            f.write(bytes([byte]))
        assert checkpoint.load(newest).step == 2


def test_a_sidecar_that_is_not_text_names_the_sidecar(tmp_path, caplog):
    newest = two_checkpoints(tmp_path)
    sidecar = newest[:-3] + ".sha256"
    with open(sidecar, "wb") as f:
        f.write(b"\xff\xfe\x00garbage")
    with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"^{sidecar}: not a sha256 digest file"):
        checkpoint.load(newest)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore_latest(str(tmp_path)).step == 1
    assert sidecar in caplog.text


def flat_detector(tmp_path, **changes) -> str:
    """A flat retina_fn {path: tensor} file (a few of a detector's keys) with `changes` applied."""
    flat = {"backbone/conv1/weight": torch.ones(8, 3, 7, 7), "head/cls_logits/weight": torch.ones(45, 8, 3, 3),
            "head/cls_logits/bias": torch.zeros(45), **changes}
    path = str(tmp_path / "flat.pt")
    torch.save(flat, path)
    return path


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    path = flat_detector(tmp_path, **{"head/cls_logits/bias": torch.tensor([0.0, float("inf")] + [0.0] * 43)})
    with pytest.raises(CheckpointMismatch, match=rf"^{path}: tensor 'head/cls_logits/bias' holds non-finite values "
                                                 r"\(1 of 45"):
        weights_lib.read_weights(path)
    directory = tmp_path / "run"
    ckpt = checkpoint.save(str(directory), 1, {"params": {"w": torch.full((3,), float("nan"))}})
    with pytest.raises(checkpoint.CorruptCheckpoint, match=rf"^{ckpt}: state 'params/w' holds non-finite values"):
        checkpoint.load(ckpt)
    with pytest.raises(CheckpointMismatch, match=rf"^{ckpt}: state 'params/w' holds non-finite"):
        weights_lib.read_weights(ckpt)


def test_a_zero_dim_class_conv_names_the_tensor_and_its_shape(tmp_path):
    path = flat_detector(tmp_path, **{"head/cls_logits/weight": torch.tensor(1.0)})
    with pytest.raises(CheckpointMismatch, match=rf"^{path}: head/cls_logits/weight has shape \(\); a classification "
                                                 r"conv weight is \[anchors x classes, channels, 3, 3\]"):
        weights_lib.count_in_weights(path, 9)


# ----------------------------------------------------------------------------------------------------
# What a file that is no weights file is called


def test_files_that_are_no_checkpoint_are_called_what_they_are(tmp_path):
    def npy(path):
        np.save(path, np.zeros(3))

    def plain_zip(path):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("a.txt", "x")

    cases = {"random.pt": (lambda p: p.write_bytes(bytes(np.random.default_rng(0).integers(1, 255, 256, np.uint8))),
                           r"not a PyTorch checkpoint \(unrecognised binary content\)"),
             "notes.pt": (lambda p: p.write_text("epoch 3: loss 0.4\n"), "text, not a PyTorch checkpoint"),
             "archive.pt": (plain_zip, r"not a PyTorch checkpoint \(a zip archive without data\.pkl\)"),
             "array.npy": (npy, r"a NumPy array file \(\.npy\)"),
             "empty.pt": (lambda p: p.write_bytes(b""), "empty file"),
             "half.pt": (lambda p: p.write_bytes(open(two_checkpoints(tmp_path / "run"), "rb").read()[:300]),
                         "a truncated or corrupt zip archive")}
    for name, (write, expected) in cases.items():
        write(tmp_path / name)
        with pytest.raises(CheckpointMismatch) as err:
            weights_lib.read_weights(tmp_path / name)
        text = str(err.value)
        assert text.startswith(f"{tmp_path / name}: ") and len(text.splitlines()) == 1, text
        assert re.search(expected, text), text
        assert "weights_only=False" not in text and "code" not in text, text


def test_a_program_given_as_weights_says_pass_it_with_exported(program_folder):
    path = program_folder / export_folder.PROGRAM_FILE
    with pytest.raises(CheckpointMismatch, match=rf"^{path}: an exported program .*--exported DIR"):
        weights_lib.read_weights(path)
    with pytest.raises(errors.MissingFileError, match=rf"^{program_folder} is an export folder: pass it with "
                                                      r"--exported DIR"):
        weights_lib.read_weights(program_folder)


def test_a_run_folder_as_weights_uses_its_newest_checkpoint(tmp_path, caplog, program_folder):
    params = {"backbone": {"conv1": {"weight": torch.ones(8, 3, 7, 7)}},
              "head": {"cls_logits": {"bias": torch.ones(9)}}}
    checkpoint.save(str(tmp_path / "run" / "checkpoints"), 1, {"params": params})
    ckpt = checkpoint.save(str(tmp_path / "run" / "checkpoints"), 2, {"params": params})
    with caplog.at_level(logging.INFO):
        raw = weights_lib.read_weights(tmp_path / "run")
    assert raw.format == "retina_fn" and torch.equal(raw.state_dict["head/cls_logits/bias"], torch.ones(9))
    assert f"{tmp_path / 'run'} is a run folder: using its newest checkpoint {ckpt}" in caplog.text
    assert predictor._is_run_folder(str(tmp_path / "run")) and not predictor._is_run_folder(str(program_folder))
    with pytest.raises(errors.MissingFileError, match="holding no checkpoints"):
        weights_lib.read_weights(tmp_path)  # holds run/, no checkpoint of its own


# ----------------------------------------------------------------------------------------------------
# The checkpoint schema


def digest(flat: dict) -> str:
    """sha256 over the sorted paths with each tensor's dtype, shape and bytes: what a checkpoint stores."""
    h = hashlib.sha256()
    for key in sorted(flat):
        t = flat[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(bytes(t.reshape(-1).view(torch.uint8).tolist()))
    return h.hexdigest()


def not_json(value) -> bool:
    if isinstance(value, dict):
        return any(not isinstance(k, str) or not_json(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(not_json(v) for v in value)
    return not isinstance(value, (str, int, float, bool, type(None)))


def good_checkpoint() -> dict:
    flat = {"params/w": torch.ones(2, 3), "params/b": torch.zeros(3), "step": torch.tensor(4)}
    return {"format": checkpoint.FORMAT, "step": 4, "state": flat,
            "meta": {"data_position": {"epoch": 0, "step_in_epoch": 4}, "world_size": 1},
            "digest": digest(flat)}


def without(field):
    return lambda c: c.pop(field)


def setting(*keys, value):
    def change(c):
        node = c
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return change


SCHEMA_FAULTS = {
    "no step": (without("step"), "'step' is missing"), "no state": (without("state"), "'state' is missing"),
    "no meta": (without("meta"), "'meta' is missing"),
    "step a string": (setting("step", value="4"), "'step' must be int, got str"),
    "step a bool": (setting("step", value=True), "'step' must be int, got bool"),
    "negative step": (setting("step", value=-1), "'step' must be >= 0"),
    "state a list": (setting("state", value=[torch.ones(1)]), "'state' must be dict, got list"),
    "meta a list": (setting("meta", value=[1]), "'meta' must be dict, got list"),
    "an extra field": (setting("optimizer", value={}), "'optimizer' is not a checkpoint field"),
    "a state key that is no path": (setting("state", 7, value=torch.ones(1)), "'state' has a key 7"),
    "a state leaf that is a list": (setting("state", "params/c", value=[1, 2]), "'state/params/c' must be a tensor"),
    "meta data_position a string": (setting("meta", "data_position", value="0:4"),
                                    "'meta/data_position' must be dict, got str"),
    "meta holding a tensor": (setting("meta", "extra", value={"t": torch.ones(1)}), "'meta/extra' holds a Tensor"),
    "a sparse state tensor": (setting("state", "params/s", value=torch.eye(2).to_sparse()), "is a torch.sparse_coo"),
    "digest an int": (setting("digest", value=3), "'digest' must be str"),
    "a stale digest": (setting("state", "params/b", value=torch.ones(3)), "does not match the digest stored in it"),
    "paths through a leaf": (setting("state", "params/w/x", value=torch.ones(1)), "'state': path 'params/w/x' runs"),
}


@pytest.mark.parametrize("fault", sorted(SCHEMA_FAULTS))
def test_a_checkpoint_failing_the_schema_is_refused_naming_the_field(tmp_path, caplog, fault):
    CASES["schema fault"] += 1
    change, expected = SCHEMA_FAULTS[fault]
    checkpoint.save(str(tmp_path), 1, {"params": {"w": torch.ones(2)}})
    bad = good_checkpoint()
    change(bad)
    state = bad.get("state")
    dense = isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) and
                                            v.layout == torch.strided for k, v in state.items())
    if fault != "a stale digest" and dense:
        bad["digest"] = digest(state) if isinstance(bad.get("digest"), str) else bad["digest"]
    path = checkpoint.path_for(str(tmp_path), 4)
    torch.save(bad, path)
    with pytest.raises(checkpoint.CorruptCheckpoint) as err:
        checkpoint.load(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value), str(err.value)
    with pytest.raises(CheckpointMismatch, match=rf"^{path}: "):
        weights_lib.read_weights(path)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore_latest(str(tmp_path)).step == 1
    assert f"skipping checkpoint: {path}: " in caplog.text


def test_the_stored_digest_is_the_documented_one(tmp_path):
    state = {"params": {"w": torch.randn(3, 2), "h": torch.ones(2, dtype=torch.bfloat16)}, "n": torch.tensor(3)}
    path = checkpoint.save(str(tmp_path), 1, state)
    stored = torch.load(path, weights_only=True)
    assert stored["digest"] == digest({"params/w": state["params"]["w"], "params/h": state["params"]["h"],
                                       "n": state["n"]})


def test_a_checkpoint_without_a_digest_field_still_loads(tmp_path):
    old = good_checkpoint()
    del old["digest"]
    path = checkpoint.path_for(str(tmp_path), 4)
    torch.save(old, path)
    restored = checkpoint.load(path)
    assert restored.step == 4 and torch.equal(restored.state["params"]["w"], torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------------
# Generated checkpoints: they load and equal what was saved, or give one user error naming the file

NAMES = st.text("abcxyz", min_size=1, max_size=3)
FLOATS = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])
TENSORS = st.builds(lambda shape, dtype, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)
                                                           ).to(dtype),
                    st.lists(st.integers(0, 3), max_size=3).map(tuple), FLOATS, st.integers(0, 9)) | st.builds(
    lambda n: torch.arange(n), st.integers(0, 5))
PLAIN = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4) | st.floats(allow_nan=False,
                                                                                         allow_infinity=False)
JSON = st.recursive(PLAIN, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
                    max_leaves=6)
GARBAGE = st.recursive(PLAIN | TENSORS | st.floats() | st.binary(max_size=4),
                       lambda inner: st.lists(inner, max_size=3) | st.tuples(inner) |
                       st.dictionaries(NAMES | st.integers(), inner, max_size=3), max_leaves=5)


@st.composite
def valid_checkpoints(draw):
    paths = draw(st.lists(st.lists(NAMES, min_size=1, max_size=2).map("/".join), max_size=4, unique=True))
    paths = [p for p in paths if not any(q.startswith(p + "/") for q in paths)]
    state = {p: draw(TENSORS) for p in paths}
    obj = {"format": checkpoint.FORMAT, "step": draw(st.integers(0, 10 ** 6)), "state": state,
           "meta": draw(st.dictionaries(NAMES, JSON, max_size=3))}
    if draw(st.booleans()):
        obj["digest"] = digest(state)
    return obj


FAULTS = ("missing", "mistyped", "extra", "leaf type", "nonfinite", "garbage", "digest")


@st.composite
def faulty_checkpoints(draw, kind):
    obj = draw(valid_checkpoints())
    field = draw(st.sampled_from(["format", "step", "state", "meta"]))
    if kind == "missing":
        del obj[field]
    elif kind == "mistyped":
        obj[field] = draw(GARBAGE.filter(lambda v, f=field: not isinstance(v, {"format": str, "step": int,
                                                                              "state": dict, "meta": dict}[f])))
    elif kind == "extra":
        obj[draw(NAMES.filter(lambda n: n not in obj))] = draw(GARBAGE)
    elif kind == "leaf type":
        obj["state"][draw(NAMES) + "/q"] = draw(st.sampled_from([[1.0], (1,), {"x": 1}, b"x", float("nan")]))
    elif kind == "nonfinite":
        t = torch.zeros(draw(st.integers(1, 4)))
        t[draw(st.integers(0, len(t) - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        obj["state"] = {**obj["state"], "bad/t": t}
        obj.pop("digest", None)
    elif kind == "garbage":
        obj["meta"] = {"x": draw(GARBAGE.filter(not_json))}
    else:
        obj["digest"] = draw(st.text("0123456789abcdef", min_size=64, max_size=64))
    return obj


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def load_contract(tmp_path, obj):
    """checkpoint.load of `obj` saved with torch.save: the Restored, or the UserError (never anything else)."""
    path = str(tmp_path / "ckpt_000000001.pt")
    torch.save(obj, path)
    try:
        return checkpoint.load(path)
    except errors.UserError as e:
        assert str(e).startswith(f"{path}: "), str(e)
        assert "\n" not in str(e)
        return e


SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(valid_checkpoints())
def test_generated_valid_checkpoints_load_and_equal_what_was_saved(tmp_path, obj):
    CASES["hypothesis valid"] += 1
    restored = load_contract(tmp_path, obj)
    assert isinstance(restored, checkpoint.Restored), restored
    assert restored.step == obj["step"] and equal(restored.meta, obj["meta"])
    assert equal(tree.flatten_by_path(restored.state), obj["state"])


@pytest.mark.parametrize("kind", FAULTS)
@settings(SETTINGS, max_examples=25)
@given(data=st.data())
def test_generated_faulty_checkpoints_give_one_user_error(tmp_path, kind, data):
    obj = data.draw(faulty_checkpoints(kind))
    CASES[f"hypothesis fault: {kind}"] += 1
    assert isinstance(load_contract(tmp_path, obj), errors.UserError)
