import subprocess
import sys

import numpy as np
import pytest
import torch

from retina_fn import rng


def test_same_key_same_numbers():
    a = rng.uniform(rng.key(7), (100,))
    b = rng.uniform(rng.key(7), (100,))
    assert torch.equal(a, b)
    assert not torch.equal(a, rng.uniform(rng.key(8), (100,)))


def test_split_keys_differ_and_are_deterministic():
    keys = rng.split(rng.key(0), 5)
    assert keys.shape == (5, 2) and keys.dtype == torch.int64
    assert len({tuple(k.tolist()) for k in keys}) == 5
    assert torch.equal(keys, rng.split(rng.key(0), 5))
    # the first two of a 5-way split are a 2-way split: keys depend only on (parent, index)
    assert torch.equal(keys[:2], rng.split(rng.key(0), 2))


def test_fold_in_is_deterministic_and_distinguishes_data():
    k = rng.key(3)
    assert torch.equal(rng.fold_in(k, 11), rng.fold_in(k, 11))
    folded = {tuple(rng.fold_in(k, i).tolist()) for i in range(1000)}
    assert len(folded) == 1000
    assert torch.equal(rng.fold_in(k, torch.tensor(11)), rng.fold_in(k, 11))
    assert not torch.equal(rng.fold_in(k, 2**40), rng.fold_in(k, 0))  # high bits matter
    with pytest.raises(ValueError):
        rng.fold_in(k, -1)


def test_words_stay_32_bit():
    k = rng.key(2**64 - 1)
    for derived in (k, rng.split(k, 3), rng.fold_in(k, 123), rng.bits(k, (50,))):
        assert int(derived.min()) >= 0 and int(derived.max()) < 2**32


def test_uniform_statistics():
    u = rng.uniform(rng.key(1), (200_000,), torch.float64)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1.0 / 12.0) < 0.002
    # neighbouring counters are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01


def test_meta_keys_give_the_shapes_and_dtypes_of_real_ones():
    """On the 'meta' device (parameter templates) the hash is skipped; every derived key and draw must
    still have the shape and dtype the real computation gives."""
    from retina_fn.nn import init

    def draws(k):
        a, b = rng.split(k)
        return [a, rng.split(k, 3), rng.fold_in(b, 5), rng.fold_in(rng.split(k, 4), torch.tensor(2)),
                rng.bits(a, (3, 5)), rng.uniform(b, (7,)), *rng.uniform_pair(a, (2, 3)),
                init.standard_normal(a, (6, 2, 3, 3)), init.xavier_uniform(b, (4, 6))]

    real = draws(rng.key(3))
    with torch.device("meta"):
        meta = draws(rng.key(3))
    assert all(m.device.type == "meta" for m in meta)
    assert [(m.shape, m.dtype) for m in meta] == [(r.shape, r.dtype) for r in real]


def test_host_generators_are_seeded_by_the_key():
    k = rng.key(5)
    assert np.array_equal(rng.numpy_generator(k).random(4), rng.numpy_generator(k).random(4))
    assert not np.array_equal(rng.numpy_generator(k).random(4), rng.numpy_generator(rng.fold_in(k, 1)).random(4))


def test_identical_draws_in_a_separate_process():
    code = (
        "from retina_fn import rng;"
        "k = rng.fold_in(rng.split(rng.key(42), 3)[2], 9);"
        "print(rng.bits(k, (8,)).tolist(), rng.numpy_generator(k).integers(0, 2**31, 4).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    k = rng.fold_in(rng.split(rng.key(42), 3)[2], 9)
    here = f"{rng.bits(k, (8,)).tolist()} {rng.numpy_generator(k).integers(0, 2**31, 4).tolist()}"
    assert out == here


def test_key_functions_compile_without_graph_breaks():
    k = rng.key(0)
    # backend="eager": dynamo traces the whole function (fullgraph fails on any graph break) without codegen
    f = torch.compile(lambda key, step: rng.uniform(rng.fold_in(key, step), (4,)), fullgraph=True, backend="eager")
    assert torch.equal(f(k, torch.tensor(3)), rng.uniform(rng.fold_in(k, 3), (4,)))
