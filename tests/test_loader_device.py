"""retina_fn/data/loader.py's device side: how many workers data.workers means, when batches are pinned, and
the prefetching iterator that moves them to the device."""

from types import SimpleNamespace

import pytest
import torch

from retina_fn.data import loader
from retina_fn.data.random_batch import random_batch


def test_explicit_worker_counts_are_kept():
    assert [loader.resolve_workers(n, local_processes=8, cpus=2) for n in (0, 1, 7, 40)] == [0, 1, 7, 40]


def test_auto_workers_leave_one_cpu_per_training_process():
    assert loader.resolve_workers("auto", local_processes=1, cpus=16) == 15
    assert loader.resolve_workers("auto", local_processes=8, cpus=128) == 15
    assert loader.resolve_workers("auto", local_processes=8, cpus=64) == 7
    assert loader.resolve_workers("auto", local_processes=1, cpus=256) == loader.AUTO_WORKERS_CAP
    assert loader.resolve_workers("auto", local_processes=1, cpus=2) == 1
    assert loader.resolve_workers("auto", local_processes=4, cpus=2) == 0  # fewer CPUs than processes
    assert 0 <= loader.resolve_workers("auto") <= loader.AUTO_WORKERS_CAP  # this machine's CPUs


@pytest.mark.parametrize("bad", [-1, "many", 2.0, True, None])
def test_other_worker_settings_are_refused(bad):
    with pytest.raises(ValueError, match="data.workers must be an int >= 0 or 'auto'"):
        loader.resolve_workers(bad)


def test_pinned_only_for_accelerators():
    assert not loader.pin_memory_for(torch.device("cpu"))
    assert loader.pin_memory_for(torch.device("cuda", 0))
    assert loader.pin_memory_for(SimpleNamespace(type="npu"))  # torch.device("npu") needs torch_npu


def _items():
    a, b, c = (random_batch(batch_size=2, canvas=(32, 32), seed=s) for s in range(3))
    return [a, (b, c)]  # a batch, then an accumulation group


def _check_moved(moved, device):
    expected = _items()
    assert len(moved) == len(expected)
    assert isinstance(moved[0], dict) and isinstance(moved[1], tuple) and len(moved[1]) == 2
    for got, want in zip([moved[0], *moved[1]], [expected[0], *expected[1]]):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].device.type == torch.device(device).type and torch.equal(got[key].cpu(), want[key]), key


def test_prefetch_moves_every_item_in_order():
    _check_moved(list(loader.prefetch_to_device(iter(_items()), torch.device("cpu"))), "cpu")
    assert list(loader.prefetch_to_device([], torch.device("cpu"))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetch_on_cuda_copies_on_a_side_stream_and_waits_for_it():
    device = torch.device("cuda")
    pinned = [{k: v.pin_memory() for k, v in b.items()} if isinstance(b, dict) else
              tuple({k: v.pin_memory() for k, v in x.items()} for x in b) for b in _items()]
    moved = []
    for item in loader.prefetch_to_device(iter(pinned), device):
        torch.cuda._sleep(10_000_000)  # a long kernel on the compute stream while the next copy runs
        moved.append(item)
    _check_moved(moved, device)
    assert list(loader.prefetch_to_device([], device)) == []
