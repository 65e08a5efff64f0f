"""CUDA-graph capture of the pure steps (retina_fn/train/graph.py): static-buffer bookkeeping, a runner with an
eager stand-in for the capture against the eager step (the independent reference), the logged fallbacks,
the host-sync finder and constant lifting, train.compile_scope, and on a CUDA device the real graphs."""

from __future__ import annotations

import logging
from typing import NamedTuple

import pytest
import torch

from configs import smoke
from retina_fn import rng, tree
from retina_fn.data.random_batch import random_batch
from retina_fn.optim import Optimizer
from retina_fn.train import build, build_optimizer, full_params, graph, init_train_state, make_eval_step
from retina_fn.train import graph_host, make_train_step
from retina_fn.train import step as step_lib
from tests.model_fixtures import spec_of, settings_of, eval_step_of

CANVASES = ((64, 64), (64, 96))


class EagerCapture:
    """A stand-in for CUDA graphs: warms up twice, then 'replays' by running the body again."""

    def __init__(self):
        self.recorded = 0

    def __call__(self, body, warmup):
        warmup()
        warmup()
        self.recorded += 1
        return body


def smoke_cfg(**train):
    cfg = smoke.get_config()
    cfg.data.landscape_canvas, cfg.data.portrait_canvas = CANVASES
    cfg.data.scale = (64, 64)
    cfg.optim.name, cfg.optim.lr = "sgd", 0.01
    for name, value in train.items():
        cfg.train[name] = value
    return cfg


def batch_for(cfg, step: int) -> dict:
    return random_batch(batch_size=2, canvas=CANVASES[step % 2], max_boxes=cfg.data.max_boxes,
                        num_classes=cfg.model.num_classes, seed=step)


def test_graphed_train_step_equals_the_eager_step_over_steps_and_canvases():
    cfg = smoke_cfg()
    optimizer = build_optimizer(settings_of(cfg))
    eager = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=2)
    capture = EagerCapture()
    graphed = make_train_step(spec_of(smoke_cfg()), settings_of(smoke_cfg(cuda_graph=True)), optimizer, steps_per_epoch=10, global_batch=2,
                              graph_capture=capture)
    assert isinstance(graphed, graph.GraphedFunction)
    start = init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer)
    untouched = tree.map(torch.clone, start)
    s_eager = s_graphed = start
    for i in range(3):  # two canvases, alternating: two recordings sharing one state, then a replay
        batch = batch_for(cfg, i)
        s_eager, m_eager = eager(s_eager, batch)
        s_graphed, m_graphed = graphed(s_graphed, batch)
        assert tree.all_equal(m_graphed, m_eager), i
        assert tree.all_equal(s_graphed, s_eager), i  # warm-up calls never advanced the state
        assert s_graphed is graphed.state  # donation: the static buffers come back
    assert capture.recorded == graphed.signatures == 2 and int(s_graphed["step"]) == 3
    assert float(m_eager["lr"]) > 0 and float(m_eager["num_pos"]) > 0
    assert tree.all_equal(start, untouched)  # the caller's first state was copied, never written


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


def swap_and_count(state: dict, x: torch.Tensor):
    """A pure step that moves one state leaf into another's place: new a = old b, new b = old a + x."""
    new = dict(state, pair=Pair(state["pair"].b, state["pair"].a + x), count=state["count"] + 1)
    return new, {"sum": x.sum()}


def test_state_round_trip_donation_and_moved_leaves():
    runner = graph.GraphedFunction(swap_and_count, "cpu", EagerCapture(), updates_state=True, name="toy")
    first = {"pair": Pair(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])), "count": torch.tensor(0)}
    x = torch.tensor([10.0, 20.0])
    state, out = runner(first, x)
    assert torch.equal(state["pair"].a, torch.tensor([3.0, 4.0])) and torch.equal(state["pair"].b,
                                                                                     torch.tensor([11.0, 22.0]))
    assert int(state["count"]) == 1 and float(out["sum"]) == 30.0
    pointers = [leaf.data_ptr() for leaf in tree.leaves(state)]
    state, _ = runner(state, x)  # its own state back: no copy, the same buffers
    assert [leaf.data_ptr() for leaf in tree.leaves(state)] == pointers
    assert torch.equal(state["pair"].a, torch.tensor([11.0, 22.0])) and int(state["count"]) == 2

    other = {"pair": Pair(torch.tensor([5.0, 6.0]), torch.tensor([7.0, 8.0])), "count": torch.tensor(7)}
    runner.load_state(other)  # another state: copied into the buffers, read back equal
    assert tree.all_equal(runner.state, other) and [leaf.data_ptr() for leaf in tree.leaves(state)] == pointers
    state, _ = runner(other, x)
    assert torch.equal(state["pair"].a, torch.tensor([7.0, 8.0])) and int(state["count"]) == 8
    assert torch.equal(other["pair"].a, torch.tensor([5.0, 6.0]))  # the caller's tensors untouched

    with pytest.raises(ValueError, match="pair/a"):
        runner({"pair": Pair(torch.zeros(3), torch.zeros(2)), "count": torch.tensor(0)}, x)
    with pytest.raises(TypeError, match="trees of tensors"):
        runner(state, 1.0)


def reads_then_swaps(state: dict, x: torch.Tensor):
    """swap_and_count after a host read of a device value (what makes a real capture fail)."""
    if bool(x.sum() > 0):
        x = x * 1.0
    return swap_and_count(state, x)


def test_a_failed_capture_is_logged_with_its_cause_and_runs_eagerly(caplog):
    def refuse(body, warmup):
        raise graph.CaptureError("operation not permitted when stream is capturing")

    runner = graph.GraphedFunction(reads_then_swaps, "cpu", refuse, updates_state=True, name="toy")
    first = {"pair": Pair(torch.ones(2), torch.zeros(2)), "count": torch.tensor(0)}
    with caplog.at_level(logging.WARNING, logger="retina_fn.train.graph"):
        state, _ = runner(first, torch.ones(2))
        state, _ = runner(state, torch.ones(2))
    assert "capture failed" in caplog.text and "runs eagerly" in caplog.text
    assert "operation not permitted when stream is capturing" in caplog.text
    # the host read that a capture refuses, with the line it is on
    line = reads_then_swaps.__code__.co_firstlineno + 2
    assert f"_local_scalar_dense at {__file__}:{line}" in caplog.text
    assert caplog.text.count("capture failed") == 1  # decided once per shape
    # (a, b): (1, 0) -> (0, 2) -> (2, 1)
    assert torch.equal(state["pair"].a, torch.full((2,), 2.0)) and torch.equal(state["pair"].b, torch.ones(2))


def test_the_first_error_of_a_capture_is_the_one_reported():
    class ClosingCapture:  # as torch.cuda.graph: closing a failed capture raises a second error
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("operation failed due to a previous error during capture")

    with pytest.raises(RuntimeError) as caught:
        with ClosingCapture():
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    assert "previous error" in str(caught.value)
    assert str(graph.first_error(caught.value)) == "CUDA error: operation not permitted when stream is capturing"
    plain = ValueError("alone")
    assert graph.first_error(plain) is plain


def zero_class_bias(params: dict) -> dict:
    """Every (anchor, class) pair then passes the score threshold, so post-processing has work."""
    head = dict(params["head"])
    head["cls_logits"] = dict(head["cls_logits"], bias=torch.zeros_like(head["cls_logits"]["bias"]))
    return dict(params, head=head)


def test_graphed_eval_step_equals_predict():
    cfg = smoke_cfg()
    params = zero_class_bias(full_params(init_train_state(spec_of(cfg), settings_of(cfg), rng.key(1), build_optimizer(settings_of(cfg)))))
    eager = eval_step_of(cfg)
    graphed = eval_step_of(smoke_cfg(cuda_graph=True), graph_capture=EagerCapture())
    for i in range(3):
        batch = batch_for(cfg, i)
        expected, got = eager(params, batch), graphed(params, batch)
        assert int(expected.valid.sum()) > 0
        assert tree.all_equal(got._asdict(), expected._asdict()), i


def test_on_a_cpu_or_with_an_inplace_optimizer_the_step_runs_eagerly_and_says_why(caplog):
    cfg = smoke_cfg(cuda_graph=True)
    optimizer = build_optimizer(settings_of(cfg))
    with caplog.at_level(logging.WARNING, logger="retina_fn.train"):
        train_step = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=2, device="cpu")
        eval_step = eval_step_of(cfg, "cpu")
        inplace = Optimizer(optimizer.init, optimizer.update, inplace=True)
        apex_like = make_train_step(spec_of(cfg), settings_of(cfg), inplace, steps_per_epoch=10, global_batch=2, graph_capture=EagerCapture())
    assert "the train step runs without CUDA graphs on cpu (graph capture needs a CUDA device)" in caplog.text
    assert "the eval forward runs without CUDA graphs on cpu" in caplog.text
    assert "optim.backend='apex' updates in place" in caplog.text
    for step in (train_step, apex_like):
        assert not isinstance(step, graph.GraphedFunction)
        _, metrics = step(init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer), batch_for(cfg, 0))
        assert float(metrics["finite"]) == 1.0
    assert eval_step.__name__ == "eval_step"


def test_with_a_cross_replica_reduce_the_train_step_runs_eagerly_and_says_why(caplog):
    cfg = smoke_cfg(cuda_graph=True)
    optimizer = build_optimizer(settings_of(cfg))
    with caplog.at_level(logging.WARNING, logger="retina_fn.train"):
        replicated = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=2,
                                     reduce=lambda tree: tree, graph_capture=EagerCapture())
        single = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=2, graph_capture=EagerCapture())
    assert "more than one process" in caplog.text and caplog.text.count("more than one process") == 1
    assert not isinstance(replicated, graph.GraphedFunction) and isinstance(single, graph.GraphedFunction)


def test_host_syncs_lists_what_a_graph_cannot_capture():
    def reads_on_the_host(x):
        if bool(x.sum() > 0):  # a Python branch on a tensor value
            x = x * x.max().item()
        kept = x[x > 0]  # boolean indexing: a data-dependent shape
        return torch.equal(kept, kept), torch.nonzero(x), torch.tensor([1.0, 2.0]), x.tolist(), x.numpy(), x.cpu()

    found = graph_host.host_syncs(reads_on_the_host, torch.arange(-1.0, 4.0))
    assert found["syncs"] == {"_local_scalar_dense": 2, "index (bool index)": 1, "equal": 1, "nonzero": 1,
                              "Tensor.tolist": 1, "Tensor.numpy": 1, "Tensor.cpu": 1}
    assert found["host_data"] == {"lift_fresh": 1}
    first_line = reads_on_the_host.__code__.co_firstlineno
    assert found["where"]["equal"] == [f"{__file__}:{first_line + 4}"]
    assert found["where"]["_local_scalar_dense"] == [f"{__file__}:{first_line + 1}", f"{__file__}:{first_line + 2}"]
    assert graph_host.host_syncs(lambda x: (x * 2).sum(), torch.ones(3)) == {"syncs": {}, "host_data": {}, "where": {}}


@pytest.mark.parametrize("box_loss, normalizer", [("l1", "batch"), ("l1", "image"), ("giou", "batch"),
                                                  ("giou", "image")])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_the_train_step_never_waits_for_the_host(box_loss, normalizer, precision):
    """No host read of a device value (a sync) and no tensor made from Python data (a blocking host-to-device
    copy) anywhere in the step: on CUDA the host queues the loss and the backward without waiting for the
    forward. Accumulation over two canvases and micro-batches included."""
    cfg = smoke_cfg(precision=precision)
    cfg.model.loss.box_loss, cfg.model.loss.normalizer = box_loss, normalizer
    cfg.optim.micro_batches = 2
    optimizer = build_optimizer(settings_of(cfg))
    state = init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer)
    step = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=4)
    found = graph_host.host_syncs(step, state, (batch_for(cfg, 0), batch_for(cfg, 1)))
    assert found == {"syncs": {}, "host_data": {}, "where": {}}


@pytest.mark.parametrize("anchor_style, uint8_canvas", [("mmdet", False), ("torchvision", False),
                                                        ("mmdet", True)])
def test_the_eval_step_makes_no_host_data_and_only_nms_reads_the_host(anchor_style, uint8_canvas):
    """The eval forward (what a CUDA graph captures) neither syncs nor copies host data. Post-processing makes no
    tensor from Python data either; its only host reads are greedy NMS's convergence test and the trim of the
    candidates to the valid ones (retina_fn.nms, retina_fn.postprocess: data-dependent by design)."""
    cfg = smoke_cfg()
    cfg.model.anchors.style, cfg.data.uint8_canvas = anchor_style, uint8_canvas
    params = full_params(init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), build_optimizer(settings_of(cfg))))
    batch = batch_for(cfg, 1)
    if uint8_canvas:
        batch = dict(batch, image=(batch["image"].clamp(-2, 2) * 50 + 120).to(torch.uint8))
    found = graph_host.host_syncs(eval_step_of(cfg), params, batch)
    assert found["host_data"] == {}
    assert found["syncs"], "the smoke model's detections reach NMS"
    assert {place.rsplit(":", 1)[0].rsplit("/", 1)[-1] for places in found["where"].values() for place in places} \
        <= {"nms.py", "postprocess.py"}
    runs: list = []
    graphed_cfg = smoke_cfg(cuda_graph=True)
    graphed_cfg.model.anchors.style, graphed_cfg.data.uint8_canvas = anchor_style, uint8_canvas
    eval_step_of(graphed_cfg, graph_capture=lambda body, warmup: runs.append(warmup) or body)(params, batch)
    assert graph_host.host_syncs(runs[0]) == {"syncs": {}, "host_data": {}, "where": {}}  # warmup(): the forward


def test_host_constants_are_made_once_while_recording_and_handed_out_during_capture():
    constants = graph_host.HostConstants()
    with constants:
        a = torch.tensor([1.0, 2.0], device="meta")
        b = torch.as_tensor((1, 2), dtype=torch.int64, device="meta")
        ints = torch.tensor([1, 2], device="meta")  # equal to [1.0, 2.0] as Python data, yet another tensor
        cpu = torch.tensor([1.0, 2.0])
    assert len(constants.constants) == 3 and cpu.device.type == "cpu"
    assert ints is not a and ints.dtype == torch.int64 and a.dtype == torch.float32
    constants.recording = False
    with constants:
        assert torch.tensor([1.0, 2.0], device="meta") is a
        assert torch.as_tensor((1, 2), dtype=torch.int64, device="meta") is b
        assert torch.tensor([1, 2], device="meta") is ints
        assert torch.tensor([1.0, 2.0]) is not cpu  # the CPU's pass through
    with pytest.raises(RuntimeError, match="first called during graph capture"):
        with constants:
            torch.tensor([3.0], device="meta")


def test_compile_scope_auto_keeps_the_update_out_only_on_cuda_before_torch_2_13():
    assert build.resolve_compile_scope("auto", "cuda", "2.11.0+cu130") == "gradients"
    assert build.resolve_compile_scope("auto", "cuda", "2.13.0") == "step"
    assert build.resolve_compile_scope("auto", "cpu", "2.11.0") == "step"
    assert build.resolve_compile_scope("step", "cuda", "2.11.0") == "step"
    assert build.resolve_compile_scope("gradients", "cpu", "2.13.0") == "gradients"
    with pytest.raises(ValueError, match="compile_scope must be one of"):
        build.resolve_compile_scope("all", "cpu")


class Quadratic:
    """A tiny Objective: loss = sum((w * x - 1)^2) / normalizer."""

    def prepare(self, batch):
        return {}, torch.tensor(2.0)

    def loss(self, params, batch, extras, normalizer):
        loss = ((params["w"] * batch["x"] - 1.0) ** 2).sum() / normalizer
        return loss, {"loss": loss}


@pytest.mark.parametrize("scope", ["step", "gradients"])
def test_compile_scope_chooses_what_is_compiled(scope):
    from retina_fn.optim import sgd
    from retina_fn.precision import LossScaleState

    compiled: list[str] = []

    def fake_compile(fn):
        compiled.append(fn.__name__)
        return fn

    optimizer = sgd(momentum=0.9)
    schedule = lambda step: torch.tensor(0.1)  # noqa: E731
    plain = step_lib.make_train_step(Quadratic(), optimizer, schedule)
    wrapped = step_lib.make_train_step(Quadratic(), optimizer, schedule, compile_fn=fake_compile, compile_scope=scope)
    assert compiled == ["train_step" if scope == "step" else "gradients"]
    state = {"params": {"w": torch.tensor([0.5, 2.0])}, "frozen": {}, "opt": optimizer.init({"w": torch.zeros(2)}),
             "step": torch.tensor(0), "loss_scale": LossScaleState(torch.tensor(1.0), torch.tensor(0)),
             "nonfinite": torch.tensor(0)}
    batch = {"x": torch.tensor([[1.0, 1.0], [2.0, 0.5]])}
    s_plain, m_plain = plain(state, batch)
    s_wrapped, m_wrapped = wrapped(state, batch)
    assert tree.all_equal(s_plain, s_wrapped) and tree.all_equal(m_plain, m_wrapped)
    with pytest.raises(ValueError, match="compile_scope"):
        step_lib.make_train_step(Quadratic(), optimizer, schedule, compile_scope="update")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA graphs record GPU kernels")
def test_cuda_graphs_match_the_eager_steps_on_a_gpu():
    device = torch.device("cuda")
    cfg = smoke_cfg()
    optimizer = build_optimizer(settings_of(cfg))
    eager = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=2, device=device)
    graphed = make_train_step(spec_of(smoke_cfg()), settings_of(smoke_cfg(cuda_graph=True)), optimizer, steps_per_epoch=10, global_batch=2,
                              device=device)
    assert isinstance(graphed, graph.GraphedFunction)
    s_eager = s_graphed = init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer, device=device)
    for i in range(4):
        batch = {k: v.to(device) for k, v in batch_for(cfg, i).items()}
        s_eager, m_eager = eager(s_eager, batch)
        s_graphed, m_graphed = graphed(s_graphed, batch)
        for k in m_eager:
            assert torch.allclose(m_graphed[k], m_eager[k], rtol=1e-4, atol=1e-6), (i, k)
    assert graphed.signatures == 2 and int(s_graphed["step"]) == 4
    flat = tree.flatten_by_path(s_graphed["params"])
    for path, p in tree.flatten_by_path(s_eager["params"]).items():
        assert torch.allclose(flat[path], p, rtol=1e-4, atol=1e-5), path

    params = zero_class_bias(full_params(s_eager))
    eval_eager, eval_graphed = eval_step_of(cfg, device), eval_step_of(smoke_cfg(cuda_graph=True), device)
    for i in range(2):
        batch = {k: v.to(device) for k, v in batch_for(cfg, i).items()}
        expected, got = eval_eager(params, batch), eval_graphed(params, batch)
        assert int(expected.valid.sum()) > 0 and torch.equal(got.valid, expected.valid)
        assert torch.allclose(got.scores, expected.scores, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_a_gpu_the_train_step_and_the_eval_forward_run_under_sync_debug_errors(precision):
    # CUDA's own judge of the tracer above: any synchronising call (a pageable copy, .item()) raises.
    device = torch.device("cuda")
    cfg = smoke_cfg(precision=precision)
    optimizer = build_optimizer(settings_of(cfg))
    state = init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer, device=device)
    step = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=2, device=device)
    batches = [{k: v.to(device) for k, v in batch_for(cfg, i).items()} for i in range(2)]
    runs: list = []
    eval_step = eval_step_of(smoke_cfg(cuda_graph=True, precision=precision), device,
                             graph_capture=lambda body, warmup: runs.append(warmup) or body)
    eval_step(full_params(state), batches[1])  # records the forward (and runs NMS, which reads the host)
    state, _ = step(state, batches[0])  # first calls: lazy initialisation of the libraries
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            state, metrics = step(state, batch)
        runs[0]()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(metrics["loss"]).all()
