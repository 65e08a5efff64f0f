"""Where this process sits in a launch, read from the launcher's environment variables.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (the node), GROUP_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. Ascend's ModelZoo scripts start one process per device and export RANK_ID, RANK_SIZE
and DEVICE_ID instead (torch reads none of those): accepted as fallbacks. With neither, the process runs alone.
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple


class LaunchError(ValueError):
    """The launcher's environment variables are missing, malformed or inconsistent."""


class LaunchEnv(NamedTuple):
    """One process's place in the launch; the defaults describe a process running alone. device_index: the
    accelerator this process drives (LOCAL_RANK under torchrun; DEVICE_ID under Ascend scripts)."""

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
    for name in names:
        value = _int_var(environ, name, minimum)
        if value is not None:
            return value, name
    return None, None


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The LaunchEnv of the environment variables (default: os.environ).

    RANK wins over RANK_ID, WORLD_SIZE over RANK_SIZE; LOCAL_WORLD_SIZE defaults to the world (one node); the local
    rank is LOCAL_RANK, else rank modulo the local world size; the device index is LOCAL_RANK under torchrun, else
    DEVICE_ID when set (Ascend scripts may use any subset of devices). LaunchError names a bad or inconsistent variable.
    """
    environ = os.environ if environ is None else environ
    rank, rank_name = _first(environ, ("RANK", "RANK_ID"), minimum=0)
    world, world_name = _first(environ, ("WORLD_SIZE", "RANK_SIZE"), minimum=1)
    device_id = _int_var(environ, "DEVICE_ID", minimum=0)

    if rank is None and world is None:
        return LaunchEnv(device_index=device_id or 0)
    if rank is None or world is None:
        given, missing = ((rank_name, "WORLD_SIZE (or RANK_SIZE)") if world is None
                          else (world_name, "RANK (or RANK_ID)"))
        raise LaunchError(f"{given} is set but {missing} is not: set both, or neither for a single process")
    if rank >= world:
        raise LaunchError(f"{rank_name}={rank} must be smaller than {world_name}={world}")
    torchrun_style = rank_name == "RANK"

    local_world = _int_var(environ, "LOCAL_WORLD_SIZE", minimum=1) or world
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
            raise LaunchError(f"{world_name}={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}; "
                              "set GROUP_WORLD_SIZE to the node count")
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
    return LaunchEnv(rank, world, local_rank, local_world, node_rank, num_nodes, master_addr, master_port,
                     device_index)


def check_rendezvous(env: LaunchEnv) -> None:
    """Raises LaunchError when a multi-process `env` lacks MASTER_ADDR or MASTER_PORT."""
    if not env.distributed:
        return
    endpoint = (("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port))
    missing = [name for name, value in endpoint if value is None]
    if missing:
        raise LaunchError(f"world size {env.world_size} needs {' and '.join(missing)} for the env:// rendezvous "
                          "(torchrun sets them; Ascend launch scripts must export them)")


def store_prefix(environ: Mapping[str, str] | None = None) -> str:
    """The key prefix of this process group in the env:// rendezvous store: with torchrun's agent store
    (TORCHELASTIC_USE_AGENT_STORE=True), which outlives restarts and holds dead workers' addresses, one per attempt,
    'retina_fn/attempt_<TORCHELASTIC_RESTART_COUNT>/'; else 'retina_fn/' (a fresh store per round; agents count
    their own restarts, so the count must not appear)."""
    environ = os.environ if environ is None else environ
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        return f"retina_fn/attempt_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    return "retina_fn/"
