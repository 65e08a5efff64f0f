"""train.compile: the compiled pure train step computes what the eager step computes."""

import pytest
import torch

from retina_fn import rng, tree
from retina_fn.train import build_optimizer, init_train_state, make_train_step
from tests.model_fixtures import settings_of, spec_of, synthetic_batch, tiny_config


@pytest.mark.slow
def test_compiled_train_step_matches_eager():
    """train.compile compiles the whole pure step; three SGD steps on a tiny model must match the eager step."""
    cfg = tiny_config(canvas=(64, 64))
    cfg.model.head.stacked_convs = 1
    cfg.model.backbone.base_width = 16
    cfg.data.max_boxes = 8
    compiled_cfg = cfg.copy_and_resolve_references()
    compiled_cfg.train.compile = True
    spec, settings = spec_of(cfg), settings_of(cfg)
    optimizer = build_optimizer(settings)
    eager = make_train_step(spec, settings, optimizer, steps_per_epoch=10, global_batch=2)
    compiled = make_train_step(spec, settings_of(compiled_cfg), optimizer, steps_per_epoch=10, global_batch=2)
    torch._dynamo.reset()
    s_eager = s_compiled = init_train_state(spec, settings, rng.key(0), optimizer)
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
