"""experiments.benchmark.revisions: another revision's files, and the alternation and pairing of the rounds
(the benchmark processes are stood in for; their speed is never checked)."""

import os
import subprocess

from experiments.benchmark import revisions


def test_exported_revision_holds_that_revisions_files(tmp_path):
    tree = revisions.export_revision("HEAD", str(tmp_path))
    head_readme = subprocess.run(["git", "-C", revisions.ROOT, "show", "HEAD:README.md"], capture_output=True,
                                 text=True, check=True).stdout
    with open(os.path.join(tree, "README.md")) as f:
        assert f.read() == head_readme
    assert not os.path.exists(os.path.join(tree, ".git"))


def test_rounds_alternate_and_pair(monkeypatch):
    calls = []
    step_s = {"base": iter([2.0, 3.0, 2.2]), "head": iter([1.0, 1.0, 2.0])}

    def fake_run_once(tree, args, out_json):
        side = "head" if tree == revisions.ROOT else "base"
        calls.append(side)
        return {"batch": 8, "ours": {"step_s": {"median": next(step_s[side])}}}

    monkeypatch.setattr(revisions, "run_once", fake_run_once)
    result = revisions.compare("HEAD", ["--config", "configs/demo.py"], rounds=3)
    assert calls == ["base", "head"] * 3
    assert (result["base_s"], result["head_s"]) == (2.2, 1.0)
    assert result["speedup_paired"] == 2.0  # median of 2.0, 3.0, 1.1
    assert result["images_per_step"] == 8
