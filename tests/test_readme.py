"""The README's functional-core block runs as written and means what it says: a pure step that leaves its input
state alone and returns a new one."""

from __future__ import annotations

import os
import re

import torch

from retina_fn import tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "tests/test_readme.py runs the python block below as written"


def core_block() -> str:
    """The python block that follows the README's marker for this test."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert MARKER in text, f"README.md has no marker {MARKER!r}"
    return re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S).group(1)


def test_the_core_block_runs_and_its_step_is_pure():
    namespace: dict = {}
    exec(compile(core_block(), "README.md", "exec"), namespace)
    logits, deltas, batch = namespace["logits"], namespace["deltas"], namespace["batch"]
    spec = namespace["spec"]
    anchors = logits.shape[1]
    assert logits.shape == (2, anchors, spec.num_classes) and deltas.shape == (2, anchors, 4)
    state, new_state, metrics = namespace["state"], namespace["new_state"], namespace["metrics"]
    assert int(state["step"]) == 0 and int(new_state["step"]) == 1  # the input state is left as it was
    assert float(metrics["finite"]) == 1.0 and float(metrics["loss"]) > 0
    before, after = tree.flatten_by_path(state["params"]), tree.flatten_by_path(new_state["params"])
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step trained something
    assert batch["image"].shape[0] == 2
