"""Selection-logic tests for the optional accelerator probes.

torch_npu and apex are not installed here: stand-in modules are put into sys.modules (or an import hook
that fails the way a broken install does) to drive each branch of the probes. They test which answer
the probe gives, not the real packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from configs.common import base_config
from retina_fn import accel, tree
from retina_fn.accel import apex_sgd
from retina_fn.optim import decay_predicate, sgd
from retina_fn.train import build
from tests.model_fixtures import spec_of, settings_of

ROOT = Path(__file__).resolve().parents[1]
APEX_NAMES = ("apex", "apex.optimizers", "apex.multi_tensor_apply", "amp_C")


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    """Every test starts from an empty probe cache with no torch_npu, apex or torch.npu visible."""
    for name in ("torch_npu", *APEX_NAMES):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delattr(torch, "npu", raising=False)
    accel.clear_probe_cache()
    yield monkeypatch
    accel.clear_probe_cache()


def fake_torch_npu(monkeypatch, available: bool = True, count: int = 2):
    module = types.ModuleType("torch_npu")
    module.npu = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", module.npu, raising=False)  # torch_npu attaches torch.npu on import
    return module


def fake_apex(monkeypatch, optimizer_classes: dict | None, kernels: bool = False):
    """An `apex` package; with `optimizer_classes` an `apex.optimizers` holding them; `kernels` adds amp_C."""
    apex = types.ModuleType("apex")
    monkeypatch.setitem(sys.modules, "apex", apex)
    if optimizer_classes is None:
        monkeypatch.delitem(sys.modules, "apex.optimizers")  # a plain module: the submodule cannot be found
    else:
        apex.__path__ = []
        optimizers = types.ModuleType("apex.optimizers")
        for name, cls in optimizer_classes.items():
            setattr(optimizers, name, cls)
        apex.optimizers = optimizers
        monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)
    if kernels:
        monkeypatch.setitem(sys.modules, "amp_C", types.ModuleType("amp_C"))


class RecordingSGD(torch.optim.SGD):
    """Stands in for apex's fused SGD: torch's SGD, remembering its instances."""

    instances: list = []

    def __init__(self, params, lr, momentum=0.0, nesterov=False, **kw):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, **kw)
        RecordingSGD.instances.append(self)


# ---- torch_npu -----------------------------------------------------------------------------------------


def test_absent_torch_npu_reads_as_none():
    assert accel.torch_npu_module() is None
    assert accel.npu_available() is False


def test_fake_torch_npu_with_devices_is_available(fresh_probes):
    module = fake_torch_npu(fresh_probes, available=True, count=2)
    assert accel.torch_npu_module() is module
    assert accel.npu_available() is True


@pytest.mark.parametrize("available, count", [(False, 2), (True, 0)])
def test_fake_torch_npu_without_devices_is_not_available(fresh_probes, available, count):
    fake_torch_npu(fresh_probes, available=available, count=count)
    assert accel.torch_npu_module() is not None
    assert accel.npu_available() is False


class _FailingLoader(importlib.abc.Loader):
    def __init__(self, error: Exception):
        self.error = error

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


class _FailingFinder(importlib.abc.MetaPathFinder):
    """Finds `name` (so find_spec succeeds) but fails when it is executed, as a broken install does."""

    def __init__(self, name: str, error: Exception):
        self.name, self.error = name, error

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, _FailingLoader(self.error))


@pytest.mark.parametrize(
    "error",
    [
        ImportError("libhccl.so: cannot open shared object file; source CANN set_env.sh"),
        RuntimeError("init env failed"),
        OSError("bad ELF header"),
    ],
)
def test_torch_npu_that_fails_to_import_reads_as_none(fresh_probes, error):
    fresh_probes.delitem(sys.modules, "torch_npu")
    fresh_probes.setattr(sys, "meta_path", [_FailingFinder("torch_npu", error), *sys.meta_path])
    assert accel.torch_npu_module() is None
    assert accel.npu_available() is False


def test_probe_answers_are_cached_until_cleared(fresh_probes):
    assert accel.torch_npu_module() is None
    module = fake_torch_npu(fresh_probes)
    assert accel.torch_npu_module() is None  # cached answer
    accel.clear_probe_cache()
    assert accel.torch_npu_module() is module


# ---- apex ----------------------------------------------------------------------------------------------


def test_absent_apex_reads_as_none():
    assert accel.apex_flavor() is None


def test_pypi_web_toolkit_apex_reads_as_none(fresh_probes):
    fake_apex(fresh_probes, optimizer_classes=None)
    assert accel.apex_flavor() is None
    with pytest.raises(accel.AcceleratorUnavailable, match="an unrelated package named 'apex' is installed"):
        accel.require_apex("optim.backend='apex'")


def test_apex_optimizers_without_fused_classes_reads_as_none(fresh_probes):
    fake_apex(fresh_probes, optimizer_classes={"SomethingElse": object}, kernels=True)
    assert accel.apex_flavor() is None


def test_nvidia_apex_needs_fused_sgd_and_its_kernels(fresh_probes):
    fake_apex(fresh_probes, optimizer_classes={"FusedSGD": RecordingSGD}, kernels=False)
    assert accel.apex_flavor() is None  # a Python-only build: no fused kernels
    fresh_probes.setitem(sys.modules, "amp_C", types.ModuleType("amp_C"))
    accel.clear_probe_cache()
    assert accel.apex_flavor() == "nvidia"
    assert accel.fused_sgd_class() is RecordingSGD


def test_ascend_apex_is_recognised_even_with_fused_sgd_present(fresh_probes):
    class NpuFusedSGD(RecordingSGD):
        pass

    fake_apex(fresh_probes, optimizer_classes={"FusedSGD": RecordingSGD, "NpuFusedSGD": NpuFusedSGD}, kernels=True)
    assert accel.apex_flavor() == "ascend"
    flavor, optimizers = accel.require_apex("test")
    assert flavor == "ascend" and optimizers.NpuFusedSGD is NpuFusedSGD
    assert accel.fused_sgd_class() is NpuFusedSGD


def test_require_apex_without_apex_says_how_to_get_it():
    with pytest.raises(accel.AcceleratorUnavailable) as info:
        accel.require_apex("fused SGD")
    message = str(info.value)
    assert "no apex is installed" in message
    assert "built from source" in message and "unrelated" in message and "backend='native'" in message


# ---- the in-place fused SGD path, wired to a stand-in apex ---------------------------------------------


def test_apex_sgd_updates_in_place_and_matches_pure_sgd(fresh_probes):
    fake_apex(fresh_probes, optimizer_classes={"FusedSGD": RecordingSGD}, kernels=True)
    RecordingSGD.instances.clear()
    gen = torch.Generator().manual_seed(0)
    params = {"conv": {"weight": torch.randn(3, 2, 3, 3, generator=gen), "bias": torch.randn(3, generator=gen)}}
    grads = [tree.map(lambda p: torch.randn(p.shape, generator=gen), params) for _ in range(3)]
    lrs = (0.1, 0.05, 0.2)
    kwargs = dict(momentum=0.9, weight_decay=0.01, nesterov=True, weight_decay_mask=decay_predicate(False))

    pure_opt = sgd(**kwargs)
    pure, pure_state = params, pure_opt.init(params)
    for lr, g in zip(lrs, grads):
        pure, pure_state = pure_opt.update(g, pure_state, pure, torch.tensor(lr))

    fused_opt = apex_sgd(**kwargs)
    assert fused_opt.inplace
    fused = tree.map(torch.clone, params)
    owned = tree.leaves(fused)
    fused_state = fused_opt.init(fused)
    groups = RecordingSGD.instances[-1].param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]  # the 4-D kernel decays, the bias does not
    for lr, g in zip(lrs, grads):
        fused, fused_state = fused_opt.update(g, fused_state, fused, torch.tensor(lr))
    assert all(a is b for a, b in zip(tree.leaves(fused), owned))  # same tensors, written in place
    assert int(fused_state["count"]) == 3
    for a, b in zip(tree.leaves(fused), tree.leaves(pure)):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-6)

    with pytest.raises(ValueError, match="in place"):
        fused_opt.update(grads[0], fused_state, tree.map(torch.clone, fused), torch.tensor(0.1))


def test_apex_sgd_without_apex_explains():
    with pytest.raises(accel.AcceleratorUnavailable, match="optim.backend='apex'"):
        apex_sgd(momentum=0.9)


# ---- importing the project probes nothing --------------------------------------------------------------


def test_importing_the_library_never_probes_accelerators(tmp_path):
    """A fresh interpreter imports the modules while an import hook records lookups of torch_npu/apex."""
    script = textwrap.dedent(
        """
        import sys
        looked_up = []

        class Recorder:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch_npu", "apex", "amp_C"):
                    looked_up.append(name)
                return None

        sys.meta_path.insert(0, Recorder())
        import retina_fn.accel, retina_fn.precision, retina_fn.optim
        assert not looked_up, looked_up
        assert retina_fn.accel.apex_flavor() is None and retina_fn.accel.torch_npu_module() is None
        assert looked_up, "the probes should have looked"
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- torch_npu's overflow flag as an overflow check -----------------------------------------------------


def _grads() -> dict:
    return {"w": torch.tensor([[0.5, -1.0], [2.0, 3.0]]), "b": torch.tensor([0.25, 1.0])}


def test_npu_flag_check_with_a_stand_in_torch_npu(monkeypatch):
    """Selection logic only: a fake torch_npu whose npu_check_overflow reports a fixed answer."""
    seen = {"clears": 0, "inputs": []}
    fake = types.ModuleType("torch_npu")
    fake.npu = types.SimpleNamespace(
        utils=types.SimpleNamespace(npu_check_overflow=lambda t: seen["inputs"].append(t) or seen["answer"]),
        clear_npu_overflow_flag=lambda: seen.__setitem__("clears", seen["clears"] + 1),
    )
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    accel.clear_probe_cache()
    try:
        check = accel.npu_flag_check()
        cfg = base_config()
        cfg.train.overflow_check = "npu"
        assert build.overflow_check(cfg.train.overflow_check).__name__ == "npu_check"  # what the config's step gets
        seen["answer"] = True  # overflow
        assert bool(check(_grads(), torch.tensor(1.0))) is False
        seen["answer"] = False
        assert bool(check(_grads(), torch.tensor(1.0))) is True
        assert seen["clears"] == 2
        assert float(seen["inputs"][0].max()) == 3.0  # it was shown the gradients' magnitudes
    finally:
        accel.clear_probe_cache()


def test_npu_flag_check_without_torch_npu_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    accel.clear_probe_cache()
    try:
        with pytest.raises(accel.AcceleratorUnavailable, match="torch_npu"):
            accel.npu_flag_check()
    finally:
        accel.clear_probe_cache()


# ---- the Ascend config's real step with apex's fused SGD (stand-in) and with the native optimiser ----------


def _ascend_step(backend: str):
    from configs import retinanet_r50_fpn_1x_coco_npu
    from retina_fn import rng
    from retina_fn.train import build_optimizer, init_train_state, make_train_step

    cfg = retinanet_r50_fpn_1x_coco_npu.get_config()  # O1, static loss scale 64, clip 10, lr 0.04
    cfg.optim.backend = backend
    cfg.data.images_per_device = 2  # CPU-sized: 2 images of 64 x 64 instead of 8 of 800 x 1344
    cfg.data.landscape_canvas = cfg.data.portrait_canvas = (64, 64)
    cfg.data.scale = (64, 64)
    # a narrower network than R50's: what is compared is the optimiser path, not the layers (10x faster)
    cfg.model.backbone.depth = 18
    cfg.model.fpn.out_channels = cfg.model.head.feat_channels = 32
    optimizer = build_optimizer(settings_of(cfg))  # built once: the state and the step share it
    state = init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer)
    step = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=100, global_batch=2)
    return state, step


@pytest.mark.slow  # two R50-FPN steps
def test_the_ascend_config_steps_with_apex_fused_sgd_as_with_native_sgd(fresh_probes):
    """Three real steps of configs/retinanet_r50_fpn_1x_coco_npu.py (fp16 autocast with the static scale 64,
    clipping at 10; a ResNet-18 with 32-channel pyramid and head in place of R50), the second on a batch with an
    inf pixel: with optim.backend='apex' (torch's SGD standing in for the fused kernel, updating in place) and
    'native', the same parameters; the skipped step leaves the apex parameters bitwise unchanged, in the same
    tensors."""
    from retina_fn.data.random_batch import random_batch

    fake_apex(fresh_probes, optimizer_classes={"FusedSGD": RecordingSGD}, kernels=True)
    RecordingSGD.instances.clear()
    batches = [random_batch(batch_size=2, canvas=(64, 64), max_boxes=100, num_classes=80, seed=i) for i in range(3)]
    batches[1]["image"][0, 0, 5, 5] = float("inf")
    results = {}
    for backend in ("apex", "native"):
        state, step = _ascend_step(backend)
        finite = []
        for i, batch in enumerate(batches):
            before = tree.map(torch.clone, state["params"])
            owned = tree.leaves(state["params"])
            state, metrics = step(state, batch)
            finite.append(float(metrics["finite"]))
            if i == 1:  # the skipped step
                assert tree.all_equal(state["params"], before)
                if backend == "apex":
                    assert all(a is b for a, b in zip(tree.leaves(state["params"]), owned))
        assert finite == [1.0, 0.0, 1.0] and float(metrics["loss_scale"]) == 64.0
        results[backend] = state
    assert len(RecordingSGD.instances) == 1  # one fused optimiser, initialised once and used by the step
    for path, a in tree.flatten_by_path(results["apex"]["params"]).items():
        b = tree.flatten_by_path(results["native"]["params"])[path]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=path)
