import collections

import pytest
import torch

from retina_fn import tree

Pair = collections.namedtuple("Pair", ["first", "second"])


def sample_tree():
    return {
        "b": {"w": torch.arange(6.0).reshape(2, 3), "bias": torch.ones(3)},
        "a": Pair(torch.tensor([1, 2], dtype=torch.int64), {"z": torch.zeros(2, 2, dtype=torch.float64)}),
    }


def test_paths_are_slash_joined_and_sorted():
    t = sample_tree()
    assert tree.paths(t) == ["a/first", "a/second/z", "b/bias", "b/w"]
    assert [p for p, _ in tree.leaves_with_paths(t)] == tree.paths(t)


def test_flatten_unflatten_round_trip_for_dicts():
    t = {"x": {"y": torch.ones(2), "a": {"c": torch.zeros(1)}}, "k": torch.tensor(3.0)}
    flat = tree.flatten_by_path(t)
    assert list(flat) == ["k", "x/a/c", "x/y"]
    back = tree.unflatten_by_path(flat)
    assert tree.all_equal(back, t)


def test_unflatten_rejects_conflicting_paths():
    with pytest.raises(ValueError, match="runs through the leaf"):
        tree.unflatten_by_path({"a": torch.ones(1), "a/b": torch.ones(1)})


def test_map_and_map_with_path_keep_structure():
    t = sample_tree()
    doubled = tree.map(lambda x: x * 2, t)
    assert isinstance(doubled["a"], Pair)
    assert torch.equal(doubled["b"]["w"], t["b"]["w"] * 2)
    named = tree.map_with_path(lambda p, x: len(p), t)
    assert named["a"].second["z"] == len("a/second/z")


def test_filter_and_merge_partition_a_tree():
    t = {"x": {"y": torch.ones(2), "w": torch.zeros(1)}, "k": torch.tensor(3.0)}
    left = tree.filter(t, lambda p, _: p.endswith("y"))
    right = tree.filter(t, lambda p, _: not p.endswith("y"))
    assert tree.paths(left) == ["x/y"]
    assert tree.all_equal(tree.merge(left, right), t)
    with pytest.raises(ValueError, match="more than one tree"):
        tree.merge(t, left)


def test_global_norm_matches_concatenation():
    t = sample_tree()
    floats = torch.cat([t["b"]["w"].flatten(), t["b"]["bias"], t["a"].second["z"].flatten().float()])
    assert torch.allclose(tree.global_norm(t), floats.norm())


def test_cast():
    t = sample_tree()
    half = tree.cast(t, torch.float16)
    assert half["b"]["w"].dtype == torch.float16
    assert half["a"].second["z"].dtype == torch.float16
    assert half["a"].first.dtype == torch.int64  # integer leaves keep their dtype


def test_tree_passes_through_torch_func_grad():
    params = {"b": {"w": torch.randn(3)}, "a": torch.randn(2)}

    def f(p):
        return (p["b"]["w"] ** 2).sum() + p["a"].sum()

    g = torch.func.grad(f)(params)
    assert tree.paths(g) == tree.paths(params)
    assert torch.allclose(g["b"]["w"], 2 * params["b"]["w"])
