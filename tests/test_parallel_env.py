"""Launch-environment parsing and the device/backend selection logic (no process group is created here)."""

import sys
import types

import pytest
import torch

from retina_fn import accel
from retina_fn.parallel import backend
from retina_fn.parallel.env import LaunchEnv, LaunchError, check_rendezvous, read_launch_env, store_prefix


def torchrun_vars(rank, world, local_rank, local_world, group_rank, group_world, port="29500"):
    return {
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world), "GROUP_RANK": str(group_rank), "GROUP_WORLD_SIZE": str(group_world),
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": port,
    }  # fmt: skip


# ---------------------------------------------------------------- environment parsing


def test_no_launch_variables_means_one_process():
    assert read_launch_env({}) == LaunchEnv(0, 1, 0, 1, 0, 1, None, None, 0)
    assert not read_launch_env({}).distributed


def test_device_id_alone_picks_the_device_of_a_single_process():
    env = read_launch_env({"DEVICE_ID": "5"})
    assert (env.rank, env.world_size, env.device_index) == (0, 1, 5)


def test_torchrun_variables_of_the_third_process_on_the_second_of_two_nodes():
    env = read_launch_env(torchrun_vars(rank=6, world=8, local_rank=2, local_world=4, group_rank=1, group_world=2))
    assert env == LaunchEnv(
        rank=6, world_size=8, local_rank=2, local_world_size=4, node_rank=1, num_nodes=2,
        master_addr="10.0.0.1", master_port=29500, device_index=2,
    )  # fmt: skip
    assert env.distributed


def test_node_rank_and_count_are_derived_when_group_variables_are_absent():
    environ = torchrun_vars(rank=5, world=8, local_rank=1, local_world=4, group_rank=0, group_world=0)
    del environ["GROUP_RANK"], environ["GROUP_WORLD_SIZE"]
    env = read_launch_env(environ)
    assert (env.node_rank, env.num_nodes) == (1, 2)  # 5 // 4, 8 // 4


def test_ascend_script_variables_are_the_fallback():
    env = read_launch_env({"RANK_ID": "3", "RANK_SIZE": "8", "DEVICE_ID": "3", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 3, 8)
    assert (env.node_rank, env.num_nodes, env.device_index) == (0, 1, 3)


def test_ascend_device_id_need_not_equal_the_local_rank():
    # Two processes placed on devices 6 and 7 of one server.
    env = read_launch_env({"RANK_ID": "1", "RANK_SIZE": "2", "DEVICE_ID": "7"})
    assert (env.rank, env.local_rank, env.device_index) == (1, 1, 7)


def test_torchrun_variables_win_over_ascend_ones():
    environ = torchrun_vars(rank=1, world=2, local_rank=1, local_world=2, group_rank=0, group_world=1)
    environ.update(RANK_ID="5", RANK_SIZE="8", DEVICE_ID="6")
    env = read_launch_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.device_index) == (1, 2, 1, 1)


@pytest.mark.parametrize(
    "environ, names",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, ("RANK=2", "WORLD_SIZE=2")),
        ({"RANK_ID": "8", "RANK_SIZE": "8"}, ("RANK_ID=8", "RANK_SIZE=8")),
        ({"RANK": "one", "WORLD_SIZE": "2"}, ("RANK='one'", "not an integer")),
        ({"RANK": "0", "WORLD_SIZE": "2.5"}, ("WORLD_SIZE='2.5'",)),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ("WORLD_SIZE=0", ">= 1")),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, ("RANK=-1",)),
        ({"RANK": "1"}, ("RANK is set", "WORLD_SIZE")),
        ({"RANK_SIZE": "4"}, ("RANK_SIZE is set", "RANK")),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, ("LOCAL_RANK=2",)),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "4"}, ("LOCAL_WORLD_SIZE=4", "exceeds")),
        ({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2"}, ("not a multiple", "GROUP_WORLD_SIZE")),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "2"}, ("GROUP_RANK=2",)),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, ("MASTER_PORT=70000",)),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, ("MASTER_PORT='http'",)),
        ({"DEVICE_ID": "gpu0"}, ("DEVICE_ID='gpu0'",)),
    ],
)
def test_bad_launch_variables_are_named_in_the_error(environ, names):
    with pytest.raises(LaunchError) as info:
        read_launch_env(environ)
    for name in names:
        assert name in str(info.value)


def test_store_prefix_names_the_attempt_only_in_the_agents_long_lived_store():
    """With the agent's store (static rendezvous, or c10d sharing it) keys of earlier attempts stay, so each
    attempt has its own prefix; with one store per rendezvous round the prefix must not depend on the restart
    count, which agents count on their own (a node that joined later has its own count)."""
    agent_store = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert store_prefix(agent_store) == "retina_fn/attempt_2/"
    fresh_store = {"TORCHELASTIC_USE_AGENT_STORE": "False"}
    assert store_prefix(dict(fresh_store, TORCHELASTIC_RESTART_COUNT="2")) == store_prefix(fresh_store) == "retina_fn/"
    assert store_prefix({}) == "retina_fn/"


def test_rendezvous_endpoint_is_required_for_more_than_one_process():
    check_rendezvous(LaunchEnv())  # alone: nothing needed
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT"):
        check_rendezvous(read_launch_env({"RANK": "0", "WORLD_SIZE": "2"}))
    with pytest.raises(LaunchError, match="MASTER_PORT"):
        check_rendezvous(read_launch_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}))


# ---------------------------------------------------------------- device/backend selection logic


class StandInDevices:
    """What torch.npu / torch.cuda answer: `count` devices, and a record of set_device calls."""

    def __init__(self, count):
        self.count = count
        self.set_calls = []

    def is_available(self):
        return self.count > 0

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.set_calls.append(index)


@pytest.fixture
def fresh_probe():
    accel.clear_probe_cache()
    yield
    accel.clear_probe_cache()


@pytest.fixture
def no_accelerators(monkeypatch, fresh_probe):
    """Neither torch_npu (blocked in sys.modules) nor CUDA."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def stand_in_npu(monkeypatch, fresh_probe):
    """A stand-in torch_npu module reporting 8 NPUs; returns its device handle."""
    devices = StandInDevices(8)
    module = types.ModuleType("torch_npu")
    module.npu = devices
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return devices


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """torch.cuda answering for 2 GPUs; returns the record of set_device calls."""
    devices = StandInDevices(2)
    monkeypatch.setattr(torch.cuda, "is_available", devices.is_available)
    monkeypatch.setattr(torch.cuda, "device_count", devices.device_count)
    monkeypatch.setattr(torch.cuda, "set_device", devices.set_device)
    return devices


def env_for_device(index):
    return LaunchEnv(rank=index, world_size=16, local_rank=index, local_world_size=16, device_index=index)


def test_selection_logic_without_accelerators_gives_cpu_and_gloo(no_accelerators):
    choice = backend.select_device("auto", env_for_device(3))
    assert choice == backend.DeviceChoice("cpu", None, "gloo", "cpu", True)
    assert choice.device == torch.device("cpu")


def test_selection_logic_rejects_unavailable_explicit_requests(no_accelerators):
    with pytest.raises(backend.DeviceUnavailable, match="dist.device='npu'.*torch_npu"):
        backend.select_device("npu")
    with pytest.raises(backend.DeviceUnavailable, match="dist.device='cuda'.*torch.cuda.is_available"):
        backend.select_device("cuda")
    with pytest.raises(ValueError, match="dist.device must be one of .*'tpu'"):
        backend.select_device("tpu")


def test_selection_logic_with_a_stand_in_torch_npu_gives_npu_and_hccl(stand_in_npu, stand_in_cuda):
    # CUDA also answers, but an NPU wins under 'auto'.
    choice = backend.select_device("auto", env_for_device(3))
    assert (choice.kind, choice.index, choice.backend) == ("npu", 3, "hccl")
    assert (choice.autocast_device_type, choice.compile_advised, choice.device_str) == ("npu", False, "npu:3")
    assert stand_in_npu.set_calls == [3] and stand_in_cuda.set_calls == []


def test_selection_logic_resolve_sets_nothing(stand_in_npu):
    assert backend.resolve_device("npu", env_for_device(5)).device_str == "npu:5"
    assert stand_in_npu.set_calls == []


def test_selection_logic_explicit_cpu_ignores_the_npu(stand_in_npu):
    assert backend.select_device("cpu", env_for_device(1)).backend == "gloo"
    assert stand_in_npu.set_calls == []


def test_selection_logic_rejects_more_processes_than_npus(stand_in_npu):
    with pytest.raises(backend.DeviceUnavailable, match="npu:8 but only 8 npu"):
        backend.select_device("auto", env_for_device(8))


def test_selection_logic_with_cuda_gives_nccl_and_sets_the_local_device(no_accelerators, stand_in_cuda):
    choice = backend.select_device("auto", env_for_device(1))
    assert choice == backend.DeviceChoice("cuda", 1, "nccl", "cuda", True)
    assert choice.device == torch.device("cuda", 1)
    assert stand_in_cuda.set_calls == [1]
    with pytest.raises(backend.DeviceUnavailable, match="cuda:2 but only 2"):
        backend.select_device("cuda", env_for_device(2))
