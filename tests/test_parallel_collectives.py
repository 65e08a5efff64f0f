"""Tree collectives: bucket planning and checksums in-process, the single-process Runtime, and real gloo runs
under torchrun (2 processes on one node; 2 nodes x 2 processes over loopback)."""

import collections
from datetime import timedelta

import pytest
import torch

from configs.common import dist_config
from retina_fn import parallel, tree
from retina_fn.parallel import collectives
from retina_fn.parallel.env import LaunchEnv, LaunchError
from tests.dist_scripts import launch
from tests.dist_scripts import sample_trees as samples

Pair = collections.namedtuple("Pair", ["first", "second"])


# ---------------------------------------------------------------- in-process pieces


def test_plan_buckets_packs_each_dtype_in_path_order_up_to_the_cap():
    leaves = [
        torch.zeros(100),  # 400 bytes
        torch.zeros(10, dtype=torch.float64),  # 80
        torch.zeros(10, 10),  # 400
        torch.zeros(300),  # 1200: more than the cap, travels alone
        torch.zeros(5, 10),  # 200
    ]
    buckets = collectives.plan_buckets(leaves, bucket_bytes=1000)
    assert [(b.dtype, b.indices, b.numel) for b in buckets] == [
        (torch.float32, (0, 2), 200),
        (torch.float32, (3,), 300),
        (torch.float32, (4,), 50),
        (torch.float64, (1,), 10),
    ]
    with pytest.raises(ValueError, match="dist.bucket_mb"):
        collectives.plan_buckets(leaves, bucket_bytes=0)


def test_pack_copies_and_unpack_restores_shapes():
    leaves = [torch.arange(6.0).reshape(2, 3), torch.tensor(7.0), torch.arange(4.0).reshape(2, 1, 2)]
    (bucket,) = collectives.plan_buckets(leaves, bucket_bytes=1 << 20)
    buffer = collectives.pack(leaves, bucket)
    assert buffer.tolist() == [0, 1, 2, 3, 4, 5, 7, 0, 1, 2, 3]
    buffer.add_(100)  # must not reach the leaves
    assert leaves[0][0, 0] == 0
    out = [None] * 3
    collectives.unpack(buffer, leaves, bucket, out)
    assert [x.shape for x in out] == [(2, 3), (), (2, 1, 2)]
    assert out[1] == 107 and out[2][1, 0, 1] == 103


def test_reduce_rejects_leaves_it_cannot_reduce_naming_the_path():
    with pytest.raises(TypeError, match="'a/flag' has dtype torch.bool"):
        collectives.check_reducible({"a": {"flag": torch.ones(2, dtype=torch.bool)}}, "sum")
    with pytest.raises(TypeError, match="'n' has integer dtype"):
        collectives.check_reducible({"n": torch.ones(2, dtype=torch.int32), "x": torch.ones(1)}, "mean")
    collectives.check_reducible({"n": torch.ones(2, dtype=torch.int32)}, "sum")
    with pytest.raises(TypeError, match="'lr' is a float, not a tensor"):
        collectives.check_reducible({"lr": 0.1}, "mean")
    with pytest.raises(ValueError, match="'w' is on the CPU but backend 'nccl'"):
        collectives.check_reducible({"w": torch.ones(1)}, "mean", backend="nccl")


def test_checksums_detect_a_permutation_that_keeps_the_sum():
    a = {"layer": {"w": torch.tensor([1.0, 2.0, 3.0])}, "b": torch.zeros(2)}
    b = {"layer": {"w": torch.tensor([3.0, 2.0, 1.0])}, "b": torch.zeros(2)}
    ca, cb = collectives.tree_checksum(a), collectives.tree_checksum(b)
    assert list(ca) == ["b", "layer/w"]
    assert ca["layer/w"].total == cb["layer/w"].total == 6.0
    assert collectives.same_leaf(ca["b"], cb["b"]) and not collectives.same_leaf(ca["layer/w"], cb["layer/w"])
    assert collectives.first_checksum_difference([ca, collectives.tree_checksum(tree.map(torch.clone, a))]) is None
    message = collectives.first_checksum_difference([ca, ca, cb])
    assert "'layer/w'" in message and "rank 2" in message
    missing = collectives.first_checksum_difference([ca, {"b": ca["b"]}])
    assert "'layer/w' exists on rank 0 but not on rank 1" == missing


def test_checksum_distinguishes_dtype_and_shape_of_equal_bytes():
    base = collectives.leaf_checksum(torch.zeros(4))
    assert not collectives.same_leaf(base, collectives.leaf_checksum(torch.zeros(2, 2)))
    assert not collectives.same_leaf(base, collectives.leaf_checksum(torch.zeros(4, dtype=torch.int32)))
    assert collectives.same_leaf(base, collectives.leaf_checksum(torch.zeros(2, 2)[0].repeat(2)))
    assert collectives.leaf_checksum(torch.zeros(3, dtype=torch.bfloat16)).total == 0.0


@pytest.fixture
def no_launch_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK_ID", "RANK_SIZE", "DEVICE_ID"):
        monkeypatch.delenv(name, raising=False)


def cpu_dist_cfg(**overrides):
    cfg = dist_config()
    cfg.device = "cpu"
    cfg.update(overrides)
    return cfg


def test_single_process_runtime_has_no_process_group_and_identity_collectives(no_launch_env):
    grads = {"w": torch.ones(3), "pair": Pair(torch.zeros(2), torch.tensor(4))}
    with parallel.init(cpu_dist_cfg()) as runtime:
        assert (runtime.rank, runtime.world_size, runtime.is_main) == (0, 1, True)
        assert runtime.backend is None and runtime.group is None
        assert runtime.device == torch.device("cpu")
        assert runtime.reduce_mean(grads) is grads and runtime.reduce_sum(grads) is grads
        assert runtime.broadcast_tree(grads) is grads
        runtime.verify_same(grads)
        runtime.barrier()
        assert runtime.gather_objects({"id": 1}) == [{"id": 1}]
        assert runtime.all_gather_object(5) == [5]
    assert not torch.distributed.is_initialized()


def test_init_rejects_bad_config_and_missing_rendezvous(no_launch_env):
    with pytest.raises(ValueError, match="dist.timeout_s must be positive"):
        parallel.init(cpu_dist_cfg(timeout_s=0.0))
    with pytest.raises(ValueError, match="dist.bucket_mb must be positive"):
        parallel.init(cpu_dist_cfg(bucket_mb=-1.0))
    with pytest.raises(ValueError, match="dist.device must be one of"):
        parallel.init(cpu_dist_cfg(device="gpu"))
    two_without_master = LaunchEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT"):
        parallel.init(cpu_dist_cfg(), env=two_without_master)
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------- two processes under torchrun


def hand_reduce(trees, op):
    """Leafwise sum or mean over `trees` by plain Python accumulation in float64 (int64 for integers),
    cast back to each leaf's dtype; also, per path, a bound on the rounding error of any summation order:
    n * eps(dtype) * sum of |addends| (divided by n for the mean), zero for integers."""
    flats = [tree.flatten_by_path(t) for t in trees]
    expected, bounds = {}, {}
    for path, first in flats[0].items():
        floating = first.is_floating_point()
        wide = torch.float64 if floating else torch.int64
        total = torch.zeros(first.shape, dtype=wide)
        magnitude = torch.zeros(first.shape, dtype=torch.float64)
        for flat in flats:
            total = total + flat[path].to(wide)
            magnitude = magnitude + flat[path].to(torch.float64).abs()
        if op == "mean":
            total, magnitude = total / len(trees), magnitude / len(trees)
        expected[path] = total.to(first.dtype)
        eps = torch.finfo(first.dtype).eps if floating else 0.0
        bounds[path] = len(trees) * eps * magnitude
    return expected, bounds


def load_ranks(directory, world):
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Runs tests/dist_scripts/collectives_worker.py --scenario full on 2 processes; returns per-rank outputs."""
    out = tmp_path_factory.mktemp("two_ranks")
    finished = launch.run("collectives_worker.py", ["--scenario", "full", "--out", str(out)], nproc=2, limit_s=90)
    assert finished.returncode == 0, finished.output[-4000:]
    return load_ranks(out, 2)


def test_two_process_launch_facts(two_process_run):
    for rank, out in enumerate(two_process_run):
        env = out["env"]
        assert (env["rank"], env["world_size"], env["local_rank"], env["num_nodes"]) == (rank, 2, rank, 1)
        assert (out["backend"], out["device"], out["is_main"]) == ("gloo", "cpu", rank == 0)
        assert out["group_ranks"] == [0, 1]


def assert_matches(result, expected, bounds=None):
    """Same paths and dtypes as `expected`; values bitwise equal, or within `bounds` when given."""
    flat = tree.flatten_by_path(result)
    assert list(flat) == list(expected)
    for path, value in flat.items():
        assert value.dtype == expected[path].dtype, path
        if bounds is None:
            assert torch.equal(value, expected[path]), path
        else:
            error = (value.to(torch.float64) - expected[path].to(torch.float64)).abs()
            assert bool((error <= bounds[path]).all()), f"{path}: error {error.max()} over bound"


def test_two_process_reduce_sum_and_mean_equal_the_hand_computed_values(two_process_run):
    inputs = [samples.sample_tree(r) for r in range(2)]
    expected_sum, _ = hand_reduce(inputs, "sum")
    expected_mean, _ = hand_reduce([samples.float_part(t) for t in inputs], "mean")
    for out in two_process_run:
        # Two addends round once either way, so even fp16/bf16 agree bitwise.
        assert_matches(out["sum"], expected_sum)
        assert_matches(out["mean"], expected_mean)
        assert isinstance(out["mean"]["head"]["moments"], samples.Moments)  # NamedTuple kept
        assert out["input_unchanged"] and not out["shares_storage"]


def test_two_process_reductions_coalesce_leaves_into_few_all_reduce_calls(two_process_run):
    leaves = (
        samples.FLOAT32_LEAVES + samples.FLOAT64_LEAVES + samples.FLOAT16_LEAVES
        + samples.BFLOAT16_LEAVES + samples.INT64_LEAVES
    )  # fmt: skip
    # 4096-byte buckets of 1024-byte leaves: ceil(n / 4) calls per dtype.
    small = sum(-(-n // 4) for n in (24, 6, 4, 4, 4))
    for out in two_process_run:
        assert out["num_leaves"] == leaves == 42
        assert out["sum_calls"] == 5  # 25 MB buckets: one per dtype
        assert out["mean_calls"] == 4  # no int64 leaves
        assert out["small_bucket_sum_calls"] == small == 11


def test_two_process_broadcast_then_verify_same(two_process_run):
    source = samples.sample_tree(0)
    for out in two_process_run:
        assert tree.all_equal(out["broadcast"], source)
        assert out["verify_equal_error"] is None
    first, second = (out["checksum"] for out in two_process_run)
    assert list(first) == tree.paths(source)
    assert all(collectives.same_leaf(first[p], second[p]) for p in first)


def test_two_process_verify_same_names_the_differing_path_on_every_rank(two_process_run):
    for out in two_process_run:
        kind, message = out["verify_perturbed_error"]
        assert kind == "ReplicaMismatch"
        assert "first differing path 'backbone/layer07/weight'" in message and "rank 1" in message


def test_two_process_structure_and_dtype_errors_reach_every_rank(two_process_run):
    for out in two_process_run:
        assert out["broadcast_mismatch_error"][0] == "ReplicaMismatch"
        assert "'extra/surplus' is extra" in out["broadcast_mismatch_error"][1]
        assert out["mean_of_ints_error"][0] == "TypeError"
        assert "'counts/c0'" in out["mean_of_ints_error"][1]
        assert torch.equal(out["final_sum"]["one"], torch.full((2,), 2.0))  # still in step afterwards


def test_two_process_object_gathers(two_process_run):
    items = [{"rank": r, "image_ids": [3 * r, 3 * r + 1, 3 * r + 2]} for r in range(2)]
    assert two_process_run[0]["gathered"] == items
    assert two_process_run[1]["gathered"] is None
    for out in two_process_run:
        assert out["all_gathered"] == items
        assert out["broadcast_object"] == items[0]


def test_two_process_timed_checkpoints_follow_rank_0s_clock(two_process_run):
    """Rank 0's steps take 1 s, rank 1's 2.5 s, a checkpoint is due every 100 s: both ranks save at steps 100
    and 200 (rank 0's clock); on its own clock rank 1 would have saved at 40, 80, ..."""
    for out in two_process_run:
        assert out["timed_saves"] == [100, 200]


# ---------------------------------------------------------------- two nodes over loopback


def test_two_nodes_over_loopback_agree_on_reductions(tmp_path):
    """Two torchrun launchers (--nnodes=2, --node_rank 0 and 1, 2 processes each) form one 4-rank job."""
    finished = launch.run_nodes(
        "collectives_worker.py", ["--scenario", "reduce", "--out", str(tmp_path)], nnodes=2, nproc=2, limit_s=90
    )
    for node, outcome in enumerate(finished):
        assert outcome.returncode == 0, f"node {node}:\n{outcome.output[-4000:]}"
    outputs = load_ranks(tmp_path, 4)
    inputs = [samples.sample_tree(r) for r in range(4)]
    expected_sum, sum_bounds = hand_reduce(inputs, "sum")
    expected_mean, mean_bounds = hand_reduce([samples.float_part(t) for t in inputs], "mean")
    for rank, out in enumerate(outputs):
        env = out["env"]
        assert (env["rank"], env["world_size"], env["node_rank"], env["num_nodes"]) == (rank, 4, rank // 2, 2)
        assert (env["local_rank"], env["local_world_size"]) == (rank % 2, 2)
        assert out["group_ranks"] == [0, 1, 2, 3]
        # Four addends: the summation order inside gloo is not ours, so floats agree to rounding.
        assert_matches(out["sum"], expected_sum, sum_bounds)  # integers: bound 0, exact
        assert_matches(out["mean"], expected_mean, mean_bounds)
    for out in outputs[1:]:  # and all ranks hold the very same numbers
        assert tree.all_equal(out["sum"], outputs[0]["sum"])


# ---------------------------------------------------------------- CUDA (runs only where a GPU is present)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for NCCL")
def test_cuda_nccl_group_of_one_runs_every_collective_on_device_tensors(no_launch_env):
    """One GPU cannot host two NCCL ranks, so a one-rank NCCL group checks the device code paths: device
    buffers of every dtype, object collectives and the non-gloo barrier."""
    with parallel.init(cpu_dist_cfg(device="auto")) as alone:
        assert alone.device == torch.device("cuda", 0) and alone.backend is None
    choice = parallel.select_device("cuda", LaunchEnv())
    assert choice == parallel.DeviceChoice("cuda", 0, "nccl", "cuda", True)
    address = f"tcp://127.0.0.1:{launch.free_port()}"
    torch.distributed.init_process_group(
        "nccl", init_method=address, rank=0, world_size=1, timeout=timedelta(seconds=60), device_id=choice.device
    )
    try:
        group = torch.distributed.group.WORLD
        runtime = parallel.Runtime(LaunchEnv(), choice, timedelta(seconds=60), bucket_bytes=4096, group=group)
        source = samples.sample_tree(0)
        grads = tree.cast(source, device=choice.device)
        summed = runtime.reduce_sum(grads)
        mean = runtime.reduce_mean(samples.float_part(grads))
        assert {leaf.device for leaf in tree.leaves(summed)} == {choice.device}
        assert tree.all_equal(tree.cast(summed, device="cpu"), source)
        assert tree.all_equal(tree.cast(mean, device="cpu"), samples.float_part(source))
        assert tree.all_equal(tree.cast(grads, device="cpu"), source)  # input untouched
        shared = runtime.broadcast_tree(grads)
        assert tree.all_equal(tree.cast(shared, device="cpu"), source)
        runtime.verify_same(shared)
        on_device, on_host = runtime.tree_checksum(shared), runtime.tree_checksum(source)
        assert all(collectives.same_leaf(on_device[p], on_host[p]) for p in on_host)
        runtime.barrier()
        assert runtime.gather_objects({"ids": [1, 2]}) == [{"ids": [1, 2]}]
        assert runtime.all_gather_object(3) == [3]
        with pytest.raises(ValueError, match="'x' is on the CPU but backend 'nccl'"):
            runtime.reduce_sum({"x": torch.ones(1)})
    finally:
        torch.distributed.destroy_process_group()
