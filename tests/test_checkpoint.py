import collections
import logging
import os

import pytest
import torch

from retina_fn import checkpoint, tree

Moments = collections.namedtuple("Moments", ["mu", "count"])


def make_state(step=0):
    g = torch.Generator().manual_seed(step)
    return {"params": {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)},
            "opt": Moments(mu={"w": torch.zeros(3, 4), "b": torch.ones(4)}, count=torch.tensor(step)),
            "step": torch.tensor(step, dtype=torch.int64)}


def test_round_trip_is_bitwise_and_keeps_meta(tmp_path):
    state = make_state(5)
    meta = {"config": {"lr": 0.01}, "label_map": {"cat_ids": [1, 3]}, "data": {"epoch": 2, "step_in_epoch": 7}}
    path = checkpoint.save(str(tmp_path), 5, state, meta)
    assert os.path.basename(path) == "ckpt_000000005.pt"
    restored = checkpoint.restore_latest(str(tmp_path))
    assert restored.step == 5 and restored.meta == meta
    back = checkpoint.restore_into(restored.state, make_state(0), "test")
    assert isinstance(back["opt"], Moments)
    assert tree.all_equal(back, state)


def test_keeps_only_the_newest_k(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(str(tmp_path), step, make_state(step), keep=2)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == [
        "ckpt_000000004.pt", "ckpt_000000003.pt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000000003.pt", "ckpt_000000003.sha256",
                                            "ckpt_000000004.pt", "ckpt_000000004.sha256"]


def test_truncated_newest_falls_back_to_previous_with_a_warning(tmp_path, caplog):
    checkpoint.save(str(tmp_path), 1, make_state(1))
    newest = checkpoint.save(str(tmp_path), 2, make_state(2))
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.restore_latest(str(tmp_path))
    assert restored.step == 1
    assert "ckpt_000000002.pt" in caplog.text and "digest" in caplog.text


def test_corruption_without_digest_is_still_detected(tmp_path):
    path = checkpoint.save(str(tmp_path), 3, make_state(3))
    os.remove(path[:-3] + ".sha256")  # e.g. a crash between the two renames
    with open(path, "wb") as f:
        f.write(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CorruptCheckpoint, match="ckpt_000000003.pt"):
        checkpoint.load(path)
    assert checkpoint.restore_latest(str(tmp_path)) is None


def test_bit_flip_is_caught_by_the_digest(tmp_path):
    path = checkpoint.save(str(tmp_path), 3, make_state(3))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="digest"):
        checkpoint.load(path)


def test_leftover_temporary_files_are_not_checkpoints(tmp_path):
    checkpoint.save(str(tmp_path), 1, make_state(1))
    (tmp_path / "ckpt_000000002.pt.tmp.123").write_bytes(b"partial")
    assert checkpoint.restore_latest(str(tmp_path)).step == 1


def test_restore_into_reports_every_mismatch(tmp_path):
    checkpoint.save(str(tmp_path), 1, make_state(1))
    restored = checkpoint.restore_latest(str(tmp_path)).state
    like = make_state(0)
    like["params"]["w"] = torch.zeros(2, 2)
    like["params"]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        checkpoint.restore_into(restored, like, "ckpt")
    assert "params/w: (3, 4) vs expected (2, 2)" in str(e.value) and "missing params/extra" in str(e.value)


def test_a_save_removes_temporaries_that_a_killed_writer_left(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    stale = directory / "ckpt_000000003.pt.tmp.999999999"  # a pid that is not this process
    stale.write_bytes(b"half a checkpoint")
    unrelated = directory / "notes.tmp.1"
    unrelated.write_text("not ours")
    checkpoint.save(str(directory), 4, {"w": torch.ones(2)})
    assert not stale.exists() and unrelated.exists()
    assert checkpoint.restore_latest(str(directory)).step == 4
