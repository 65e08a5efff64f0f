"""The process group and tree collectives of one training process (`init` builds the Runtime).

No DistributedDataParallel (it does not compose with torch.func): gradients are plain pytrees that `reduce_mean`
all-reduces in coalesced buffers; with one process every collective is the identity. dist.timeout_s bounds every
gloo collective and NCCL's watchdog; a failed collective is re-raised as CollectiveError naming it.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from retina_fn.parallel import collectives
from retina_fn.parallel.backend import DeviceChoice, select_device
from retina_fn.parallel.env import LaunchEnv, check_rendezvous, read_launch_env, store_prefix

Tree = Any
_MB = 2**20


def _identity(tree: Tree) -> Tree:
    return tree


class CollectiveError(RuntimeError):
    """A collective failed or timed out, typically because another rank died, hung or diverged."""


class Runtime:
    """This process's distributed context; build it with `init`. `reduce_mean` (floating leaves) and `reduce_sum`
    (floating or integer) are leafwise over ranks, kept out of torch.compile graphs; the identity without a group."""

    def __init__(self, env: LaunchEnv, choice: DeviceChoice, timeout: timedelta, bucket_bytes: int, group=None):
        self.env, self.choice, self.timeout, self.bucket_bytes, self.group = env, choice, timeout, bucket_bytes, group
        if group is None:
            self.reduce_mean = self.reduce_sum = _identity
        else:
            self.reduce_mean = torch.compiler.disable(self._reduce_mean)
            self.reduce_sum = torch.compiler.disable(self._reduce_sum)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and writes files."""
        return self.env.rank == 0

    @property
    def device(self) -> torch.device:
        return self.choice.device

    @property
    def backend(self) -> str | None:
        """The backend when a process group exists, else None."""
        return self.choice.backend if self.group is not None else None

    def __repr__(self) -> str:
        return (f"Runtime(rank={self.rank}, world_size={self.world_size}, device={self.choice.device_str}, "
                f"backend={self.backend}, nodes={self.env.num_nodes})")

    @contextlib.contextmanager
    def _guard(self, what: str):
        try:
            yield
        except (collectives.ReplicaMismatch, CollectiveError):
            raise
        except RuntimeError as error:  # DistBackendError, DistNetworkError, gloo timeouts are RuntimeErrors
            raise CollectiveError(
                f"{what} failed on rank {self.rank} of {self.world_size}: {error}\n"
                f"Another rank probably died, hung or took a different code path; every collective waits at "
                f"most dist.timeout_s={self.timeout.total_seconds():g} s.") from error

    def _reduce_mean(self, tree: Tree) -> Tree:
        """Call it outside torch.func transforms."""
        with self._guard("reduce_mean (all_reduce)"):
            return collectives.all_reduce_tree(tree, "mean", group=self.group, bucket_bytes=self.bucket_bytes)

    def _reduce_sum(self, tree: Tree) -> Tree:
        with self._guard("reduce_sum (all_reduce)"):
            return collectives.all_reduce_tree(tree, "sum", group=self.group, bucket_bytes=self.bucket_bytes)

    def broadcast_tree(self, tree: Tree, src: int = 0) -> Tree:
        """Rank `src`'s `tree` on every rank, as new tensors (`tree` itself for one process); ReplicaMismatch when
        the structures differ between ranks."""
        if self.group is None:
            return tree
        with self._guard(f"broadcast_tree from rank {src}"):
            return collectives.broadcast_tree(tree, src, group=self.group, bucket_bytes=self.bucket_bytes)

    @staticmethod
    def tree_checksum(tree: Tree) -> dict[str, collectives.LeafChecksum]:
        """collectives.tree_checksum of this rank's `tree`."""
        return collectives.tree_checksum(tree)

    def verify_same(self, tree: Tree) -> None:
        """Checks that `tree` is bitwise identical on all ranks (ReplicaMismatch names the first differing path)."""
        if self.group is None:
            return
        with self._guard("verify_same (all_gather_object)"):
            collectives.verify_same(tree, group=self.group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj` on every rank (raises CollectiveError on failure)."""
        if self.group is None:
            return obj
        with self._guard(f"broadcast_object from rank {src}"):
            box = [obj]
            dist.broadcast_object_list(box, src=src, group=self.group)
            return box[0]

    def barrier(self) -> None:
        """Waits for every rank (raises CollectiveError when one does not arrive within the timeout)."""
        if self.group is None:
            return
        with self._guard("barrier"):
            if self.choice.backend == "gloo":
                dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
            else:
                token = torch.zeros(1, device=self.device)
                dist.all_reduce(token, group=self.group)
                token.cpu()  # waits for the device

    def gather_objects(self, obj: Any, dst: int = 0) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank `dst`, None elsewhere ([obj] for one process); raises
        CollectiveError on failure."""
        if self.group is None:
            return [obj]
        with self._guard(f"gather_objects to rank {dst}"):
            if self.choice.backend == "hccl":  # HCCL has long lacked a gather primitive
                everything = self._all_gather_object(obj)
                return everything if self.rank == dst else None
            received = [None] * self.world_size if self.rank == dst else None
            dist.gather_object(obj, received, dst=dst, group=self.group)
            return received

    def all_gather_object(self, obj: Any) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank; raises CollectiveError on failure."""
        if self.group is None:
            return [obj]
        with self._guard("all_gather_object"):
            return self._all_gather_object(obj)

    def _all_gather_object(self, obj: Any) -> list:
        received: list = [None] * self.world_size
        dist.all_gather_object(received, obj, group=self.group)
        return received

    def shutdown(self) -> None:
        """Destroys the process group (idempotent)."""
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.group = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def init(dist_cfg, env: LaunchEnv | None = None) -> Runtime:
    """The Runtime for this process: chooses and activates the device, then (world size > 1) creates the default
    process group over env:// and runs a warm-up all_reduce (HCCL builds communicators lazily; it also proves every
    rank can talk). env None: `read_launch_env()`.

    Raises:
      ValueError, LaunchError, DeviceUnavailable: bad dist settings, launch environment or device.
      RuntimeError: a default process group already exists.
      CollectiveError: the warm-up all_reduce failed or gave the wrong sum.
    """
    if dist_cfg.timeout_s <= 0:
        raise ValueError(f"dist.timeout_s must be positive, got {dist_cfg.timeout_s}")
    if dist_cfg.bucket_mb <= 0:
        raise ValueError(f"dist.bucket_mb must be positive, got {dist_cfg.bucket_mb}")
    env = env or read_launch_env()
    timeout = timedelta(seconds=float(dist_cfg.timeout_s))
    bucket_bytes = max(1, int(dist_cfg.bucket_mb * _MB))
    choice = select_device(dist_cfg.device, env)  # before the process group: NCCL/HCCL bind the current device
    if not env.distributed:
        return Runtime(env, choice, timeout, bucket_bytes)

    check_rendezvous(env)
    if dist.is_initialized():
        raise RuntimeError("a default process group already exists; call Runtime.shutdown() before init() again")
    # Before the group exists: torch._dynamo imports modules that take `group.WORLD` as a default argument;
    # imported later, they would pin the group past destroy_process_group, and its gloo threads, torn down at
    # exit while a peer is still connected, abort the process ("terminate called without an active exception").
    import torch._dynamo  # noqa: F401
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    options = dict(backend=choice.backend, store=dist.PrefixStore(store_prefix(), store), rank=env.rank,
                   world_size=env.world_size)
    if choice.kind == "cuda":
        options["device_id"] = choice.device  # eager NCCL init, bound to this device
    dist.init_process_group(timeout=timeout, **options)
    runtime = Runtime(env, choice, timeout, bucket_bytes, group=dist.group.WORLD)

    with runtime._guard("warm-up all_reduce"):
        token = torch.ones(1, device=choice.device_str)
        dist.all_reduce(token)
        if int(token.cpu()) != env.world_size:
            raise CollectiveError(f"warm-up all_reduce gave {int(token.cpu())}, expected world size {env.world_size}")

    return runtime
