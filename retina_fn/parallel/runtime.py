"""The process group and tree collectives of one training process.

    runtime = parallel.init(cfg.dist)               # after torchrun, or alone
    params = runtime.broadcast_tree(params)     # rank 0's initialisation everywhere
    runtime.verify_same(params)
    train_step = make_train_step(..., reduce=runtime.reduce_mean)
    ...
    results = runtime.gather_objects(my_detections)   # list on rank 0, None elsewhere
    runtime.shutdown()

No DistributedDataParallel (it does not compose with torch.func): gradients are plain pytrees and
`reduce_mean` all-reduces them in a few coalesced buffers. With one process there is no process group and
every collective is the identity.

Hangs. The process group is created with timeout=dist.timeout_s, which gloo applies to every collective
(object collectives included) and NCCL's watchdog enforces by aborting the communicator; barriers on gloo use
monitored_barrier, which names the ranks that failed to arrive. A failure inside a collective is re-raised as
CollectiveError naming the operation and the timeout. On Ascend, HCCL_EXEC_TIMEOUT and HCCL_CONNECT_TIMEOUT
(read by HCCL itself, defaults 1800 s and 120 s) bound the device-side waits and are left to the launcher.
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
    """This process's distributed context. Build it with `init`; attributes are read-only by convention.

    `reduce_mean(tree) -> tree` and `reduce_sum(tree) -> tree` are bound at construction: the identity
    without a process group (so torch.compile traces through them), else the leafwise mean / sum over
    ranks, kept out of torch.compile graphs.

    Args:
      env: this process's LaunchEnv.
      choice: the activated DeviceChoice.
      timeout: the timeout of every collective.
      bucket_bytes: the coalescing bucket size in bytes.
      group: the process group, None for one process.

    Attributes:
      env: LaunchEnv.
      choice: DeviceChoice.
      timeout: timedelta.
      bucket_bytes: int, the coalescing bucket size.
      group: the process group (None for one process).
      reduce_mean: tree -> tree, the leafwise mean over ranks of floating tensors.
      reduce_sum: tree -> tree, the leafwise sum over ranks of floating or integer tensors.
    """

    def __init__(
        self,
        env: LaunchEnv,
        choice: DeviceChoice,
        timeout: timedelta,
        bucket_bytes: int,
        group=None,
    ):
        self.env = env
        self.choice = choice
        self.timeout = timeout
        self.bucket_bytes = bucket_bytes
        self.group = group
        if group is None:
            # One process: plain identities, which torch.compile can trace through.
            self.reduce_mean = self.reduce_sum = _identity
        else:
            self.reduce_mean = torch.compiler.disable(self._reduce_mean)
            self.reduce_sum = torch.compiler.disable(self._reduce_sum)

    # -- facts ------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.env.rank

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and writes files."""
        return self.env.rank == 0

    @property
    def device(self) -> torch.device:
        """The torch.device this process drives."""
        return self.choice.device

    @property
    def backend(self) -> str | None:
        """'gloo' | 'nccl' | 'hccl' when a process group exists, else None."""
        return self.choice.backend if self.group is not None else None

    def __repr__(self) -> str:
        return (
            f"Runtime(rank={self.rank}, world_size={self.world_size}, device={self.choice.device_str}, "
            f"backend={self.backend}, nodes={self.env.num_nodes})"
        )

    # -- collectives --------------------------------------------------------------------------------
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
                f"most dist.timeout_s={self.timeout.total_seconds():g} s."
            ) from error

    # `reduce_mean` and `reduce_sum` are bound in __init__: the methods below with a process group (kept out
    # of torch.compile graphs, whose collective tracing has been unreliable), the identity without one.

    def _reduce_mean(self, tree: Tree) -> Tree:
        """reduce_mean(tree) -> tree: the leafwise mean over ranks of a tree of floating tensors (any shapes),
        as new tensors of the same structure, shapes and dtypes. Call it outside torch.func transforms."""
        with self._guard("reduce_mean (all_reduce)"):
            return collectives.all_reduce_tree(tree, "mean", group=self.group, bucket_bytes=self.bucket_bytes)

    def _reduce_sum(self, tree: Tree) -> Tree:
        """reduce_sum(tree) -> tree: the leafwise sum over ranks (floating or integer tensors), as new tensors
        of the same structure, shapes and dtypes."""
        with self._guard("reduce_sum (all_reduce)"):
            return collectives.all_reduce_tree(tree, "sum", group=self.group, bucket_bytes=self.bucket_bytes)

    def broadcast_tree(self, tree: Tree, src: int = 0) -> Tree:
        """Rank `src`'s `tree` on every rank.

        Args:
          tree: this rank's tree of tensors (same structure on every rank).
          src: the rank whose values are sent.

        Returns:
          New tensors of the same structure, shapes, dtypes and devices; `tree` itself for one process.

        Raises:
          ReplicaMismatch: the structures differ between ranks.
          CollectiveError: the collective failed or timed out.
        """
        if self.group is None:
            return tree
        with self._guard(f"broadcast_tree from rank {src}"):
            return collectives.broadcast_tree(tree, src, group=self.group, bucket_bytes=self.bucket_bytes)

    @staticmethod
    def tree_checksum(tree: Tree) -> dict[str, collectives.LeafChecksum]:
        """{path: (shape, dtype, float64 sum, byte digest)} of this rank's `tree`.

        Args:
          tree: a tree of tensors.

        Returns:
          dict[str, LeafChecksum].
        """
        return collectives.tree_checksum(tree)

    def verify_same(self, tree: Tree) -> None:
        """Checks that `tree` is bitwise identical on all ranks (nothing to check for one process).

        Args:
          tree: this rank's tree of tensors.

        Returns:
          None.

        Raises:
          ReplicaMismatch: on every rank, naming the first differing path.
          CollectiveError: the collective failed or timed out.
        """
        if self.group is None:
            return
        with self._guard("verify_same (all_gather_object)"):
            collectives.verify_same(tree, group=self.group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj` on every rank (a host-side decision shared, e.g. when to checkpoint).

        Args:
          obj: the object on rank `src`; ignored elsewhere.
          src: the sending rank.

        Returns:
          Rank `src`'s object (`obj` itself for one process).

        Raises:
          CollectiveError: the collective failed or timed out.
        """
        if self.group is None:
            return obj
        with self._guard(f"broadcast_object from rank {src}"):
            box = [obj]
            dist.broadcast_object_list(box, src=src, group=self.group)
            return box[0]

    def barrier(self) -> None:
        """Waits for every rank; on gloo a monitored barrier that names the ranks that did not arrive.

        Returns:
          None.

        Raises:
          CollectiveError: a rank did not arrive within the timeout, or the collective failed.
        """
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
        """Gathers one picklable object from every rank onto rank `dst`.

        Args:
          obj: this rank's object.
          dst: the receiving rank.

        Returns:
          [obj of rank 0, obj of rank 1, ...] on rank `dst`, None on the others ([obj] for one process).

        Raises:
          CollectiveError: the collective failed or timed out.
        """
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
        """Gathers one picklable object from every rank onto every rank.

        Args:
          obj: this rank's object.

        Returns:
          [obj of rank 0, obj of rank 1, ...] ([obj] for one process).

        Raises:
          CollectiveError: the collective failed or timed out.
        """
        if self.group is None:
            return [obj]
        with self._guard("all_gather_object"):
            return self._all_gather_object(obj)

    def _all_gather_object(self, obj: Any) -> list:
        received: list = [None] * self.world_size
        dist.all_gather_object(received, obj, group=self.group)
        return received

    def shutdown(self) -> None:
        """Destroys the process group (idempotent).

        Returns:
          None.
        """
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.group = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _attempt_store(env: LaunchEnv, timeout: timedelta):
    """The env:// rendezvous store under `store_prefix()`."""
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    return dist.PrefixStore(store_prefix(), store)


def init(dist_cfg, env: LaunchEnv | None = None) -> Runtime:
    """The Runtime for this process.

    Chooses and activates the device, then (world size > 1) creates the default process group over env://
    with the configured timeout, runs a warm-up all_reduce (HCCL builds communicators lazily; this also
    proves every rank can talk).

    Args:
      dist_cfg: the `dist` config block (device, timeout_s, bucket_mb).
      env: the launcher's environment; None: `read_launch_env()`.

    Returns:
      Runtime.

    Raises:
      ValueError: timeout_s or bucket_mb not positive, or an unknown dist.device.
      LaunchError: a malformed launch environment or a missing rendezvous endpoint.
      DeviceUnavailable: the requested device cannot be used.
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
    # Before the group exists: torch._dynamo (imported by Runtime's torch.compiler.disable) imports modules that
    # take `group.WORLD` as a default argument (torch.distributed.nn.functional); imported later, they would pin
    # the group past destroy_process_group, and its gloo threads, torn down at interpreter exit while a peer is
    # still connected, abort the process ("terminate called without an active exception").
    import torch._dynamo  # noqa: F401
    options = dict(backend=choice.backend, store=_attempt_store(env, timeout), rank=env.rank,
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
