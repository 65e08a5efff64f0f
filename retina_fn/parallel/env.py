"""Where this process sits in a launch, read from the launcher's environment variables.

torchrun (`python -m torch.distributed.run`) exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK (the node), GROUP_WORLD_SIZE (the node count), MASTER_ADDR and MASTER_PORT. Ascend's ModelZoo
shell scripts start one process per device themselves and export RANK_ID, RANK_SIZE and DEVICE_ID instead;
torch reads none of those, so they are accepted here as fallbacks when torchrun's variables are absent.
With neither set, the process runs alone (world size 1).
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple


class LaunchError(ValueError):
    """The launcher's environment variables are missing, malformed or inconsistent."""


class LaunchEnv(NamedTuple):
    """One process's place in the launch; the defaults describe a process running alone.

    Attributes:
      rank: global process index.
      world_size: global process count.
      local_rank: process index on this node.
      local_world_size: process count on this node.
      node_rank: this node's index.
      num_nodes: the node count.
      master_addr: the rendezvous host (None for a single process or when unset).
      master_port: the rendezvous port (None for a single process or when unset).
      device_index: the accelerator index this process drives (LOCAL_RANK under torchrun; DEVICE_ID under
        Ascend scripts).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    device_index: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _int_var(environ: Mapping[str, str], name: str, minimum: int) -> int | None:
    """The integer in environ[name] (None when unset or empty); LaunchError naming `name` otherwise."""
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise LaunchError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _first(environ: Mapping[str, str], names: tuple[str, ...], minimum: int) -> tuple[int | None, str | None]:
    """(value, name) of the first variable in `names` that is set, else (None, None)."""
    for name in names:
        value = _int_var(environ, name, minimum)
        if value is not None:
            return value, name
    return None, None


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The LaunchEnv described by the launcher's environment variables.

    Precedence: RANK over RANK_ID, WORLD_SIZE over RANK_SIZE. LOCAL_WORLD_SIZE defaults to the whole world
    (one node) when the launcher does not say; the local rank is LOCAL_RANK, else rank modulo the local world
    size. The device index is LOCAL_RANK under torchrun and DEVICE_ID (when set) otherwise, since Ascend
    scripts may place processes on any subset of a server's devices.

    Args:
      environ: the variables to read (default: os.environ).

    Returns:
      LaunchEnv; a single-process one (device_index from DEVICE_ID, else 0) when neither rank nor world
      size is set.

    Raises:
      LaunchError: naming the variable, for non-integers, a rank without a world size (or the reverse),
        rank >= world size, and similar inconsistencies.
    """
    # Long on purpose: one linear read-and-check per variable, each with its own message; splitting it would
    # scatter the precedence rules stated above.
    environ = os.environ if environ is None else environ
    rank, rank_name = _first(environ, ("RANK", "RANK_ID"), minimum=0)
    world, world_name = _first(environ, ("WORLD_SIZE", "RANK_SIZE"), minimum=1)
    device_id = _int_var(environ, "DEVICE_ID", minimum=0)

    if rank is None and world is None:
        return LaunchEnv(device_index=device_id or 0)
    if rank is None or world is None:
        if world is None:
            given, missing = rank_name, "WORLD_SIZE (or RANK_SIZE)"
        else:
            given, missing = world_name, "RANK (or RANK_ID)"
        raise LaunchError(f"{given} is set but {missing} is not: set both, or neither for a single process")
    if rank >= world:
        raise LaunchError(f"{rank_name}={rank} must be smaller than {world_name}={world}")
    torchrun_style = rank_name == "RANK"

    local_world = _int_var(environ, "LOCAL_WORLD_SIZE", minimum=1)
    if local_world is None:
        local_world = world
    if local_world > world:
        raise LaunchError(f"LOCAL_WORLD_SIZE={local_world} exceeds {world_name}={world}")

    local_rank = _int_var(environ, "LOCAL_RANK", minimum=0)
    local_name = "LOCAL_RANK"
    if local_rank is None:
        local_rank, local_name = rank % local_world, rank_name
    if local_rank >= local_world:
        raise LaunchError(f"{local_name}={local_rank} must be smaller than LOCAL_WORLD_SIZE={local_world}")

    num_nodes = _int_var(environ, "GROUP_WORLD_SIZE", minimum=1)
    if num_nodes is None:
        if world % local_world != 0:
            raise LaunchError(
                f"{world_name}={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}; "
                "set GROUP_WORLD_SIZE to the node count"
            )
        num_nodes = world // local_world
    node_rank = _int_var(environ, "GROUP_RANK", minimum=0)
    if node_rank is None:
        node_rank = min(rank // local_world, num_nodes - 1)
    if node_rank >= num_nodes:
        raise LaunchError(f"GROUP_RANK={node_rank} must be smaller than the node count {num_nodes}")

    master_addr = environ.get("MASTER_ADDR") or None
    master_port = _int_var(environ, "MASTER_PORT", minimum=1)
    if master_port is not None and master_port > 65535:
        raise LaunchError(f"environment variable MASTER_PORT={master_port} is not a TCP port (1..65535)")

    device_index = local_rank if (torchrun_style or device_id is None) else device_id
    return LaunchEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=master_addr,
        master_port=master_port,
        device_index=device_index,
    )


def check_rendezvous(env: LaunchEnv) -> None:
    """Checks that a multi-process `env` names its rendezvous endpoint.

    Args:
      env: this process's LaunchEnv; a single-process one always passes.

    Returns:
      None.

    Raises:
      LaunchError: MASTER_ADDR or MASTER_PORT is missing in a multi-process launch.
    """
    if not env.distributed:
        return
    endpoint = (("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port))
    missing = [name for name, value in endpoint if value is None]
    if missing:
        raise LaunchError(
            f"world size {env.world_size} needs {' and '.join(missing)} for the env:// rendezvous "
            "(torchrun sets them; Ascend launch scripts must export them)"
        )


def store_prefix(environ: Mapping[str, str] | None = None) -> str:
    """The key prefix of this process group in the env:// rendezvous store.

    When torchrun's agent hosts that store (TORCHELASTIC_USE_AGENT_STORE=True: static rendezvous, or c10d with
    the store shared) it outlives restarts and still holds the previous attempt's keys; seen here, gloo's
    connectFullMesh could read a dead worker's address from them ("Connection refused"), so each attempt gets
    its own prefix. Otherwise (c10d with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which membership changes need)
    rank 0 hosts a fresh store on a fresh port for every rendezvous round, nothing is stale, and a prefix must
    not name the restart count: agents count their own restarts, so a node that joined later would disagree.

    Args:
      environ: the environment (default os.environ).

    Returns:
      'retina_fn/attempt_<TORCHELASTIC_RESTART_COUNT>/' with the agent's store, else 'retina_fn/'.
    """
    environ = os.environ if environ is None else environ
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        return f"retina_fn/attempt_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    return "retina_fn/"
