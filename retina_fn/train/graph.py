"""CUDA-graph capture of a pure step: a thin stateful runner around a pure function, like a jit cache.

    step = graph_or_eager(train_step, device, what="the train step", updates_state=True)
    state, metrics = step(state, batch)          # copy the batch in, replay, hand back the static state

The step stays pure (retina_fn.train.step); `GraphedFunction` holds what is stateful: static state buffers (one
copy of the state tree that every graph reads and, with `updates_state`, overwrites inside the graph) and, per
input signature (paths, shapes, dtypes: one per canvas), static input buffers and one captured graph.

Warm-up runs the function on the static buffers on a side stream and discards the results (lazy init and
algorithm choice happen before capture), so it never advances the state; the first replay performs the first
real step. The lr and the step counter are device tensors, so a replay needs nothing from the host.

Donation, as jax's donate_argnums: the returned state *is* the static buffers and the metrics are the graph's
static outputs; the next call overwrites both, so read (or clone) them first. Passing the returned state back
is free; any other state is copied into the buffers leaf by leaf.

A captured function must not read device values on the host (`.item()`, `bool(t)`, `torch.equal`, `nonzero`,
boolean indexing), branch on tensor values or allocate outside the pool; `graph_host.host_syncs` lists such
operations on any device. Tensors built from Python data are lifted by `graph_host.HostConstants`. In-place
optimisers (apex, `Optimizer.inplace`) read the host and cannot be captured. Where capture is impossible, the
function runs eagerly (same results) with a logged reason.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Protocol

import torch

from retina_fn import tree
from retina_fn.train.graph_host import HostConstants, host_syncs

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The capture of a graph failed (the function did something a CUDA graph cannot record)."""


def first_error(error: BaseException) -> BaseException:
    """The error a failure started with (a capture failing inside `torch.cuda.graph` raises a second error when
    the context closes, chained to the first)."""
    seen = {id(error)}
    while True:
        earlier = error.__cause__ or error.__context__
        if earlier is None or id(earlier) in seen:
            return error
        seen.add(id(earlier))
        error = earlier


class Capture(Protocol):
    """How a runner turns one call into something replayable: capture(body, warmup) -> replay.

    `warmup()` runs the function on the static buffers and discards the result; `body()` runs it and writes its
    results into the static buffers and the output holder; `replay()` must have `body()`'s effect on the current
    buffers. Raises CaptureError when recording is impossible.
    """

    def __call__(self, body: Callable[[], None], warmup: Callable[[], None]) -> Callable[[], None]: ...


class _Replay:
    """One captured CUDA graph and the constants it reads (kept alive as long as the graph)."""

    def __init__(self, graph, constants: HostConstants | None):
        self.graph, self.constants = graph, constants

    def __call__(self) -> None:
        self.graph.replay()


class CudaGraphCapture:
    """`Capture` with torch.cuda.CUDAGraph: warm-up on a side stream, then one capture.

    All graphs of one capture share a memory pool (a runner replays one at a time on one stream). Capture uses
    capture_error_mode='thread_local' so that other threads (the loader's pin-memory thread) may use CUDA meanwhile.

    Args:
      warmup_steps: warm-up calls before the capture.
      lift_constants: run under `HostConstants`; off for a torch.compile'd function (inductor folds constants
        itself, and a mode around it would change what it traces).
    """

    def __init__(self, device: torch.device | str, warmup_steps: int = 2, lift_constants: bool = True):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.device = torch.device(device)
        self.warmup_steps = warmup_steps
        self.lift_constants = lift_constants
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, body: Callable[[], None], warmup: Callable[[], None]) -> Callable[[], None]:
        constants = HostConstants() if self.lift_constants else None
        lifting = constants if constants is not None else contextlib.nullcontext()
        side = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.device(self.device), torch.cuda.stream(side), lifting:
            for _ in range(self.warmup_steps):
                warmup()
        current.wait_stream(side)
        if constants is not None:
            constants.recording = False
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), lifting, torch.cuda.graph(graph, pool=self.pool,
                                                                            capture_error_mode="thread_local"):
                body()
        except RuntimeError as e:
            torch.cuda.set_stream(current)  # a failed capture can leave its side stream current
            cause = first_error(e)
            raise CaptureError(str(cause) if cause is e else f"{cause} (then: {e})") from e
        return _Replay(graph, constants)


def _signature(inputs: tuple) -> tuple:
    """(input, path, shape, dtype) of every leaf of every input tree: what a graph is recorded for."""
    sig = []
    for i, x in enumerate(inputs):
        for path, leaf in tree.leaves_with_paths(x):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"graph inputs must be trees of tensors; input {i} has {type(leaf).__name__} at "
                                f"{path!r}")
            sig.append((i, path, tuple(leaf.shape), leaf.dtype))
    return tuple(sig)


def _describe(signature: tuple) -> str:
    """The largest input leaf of a signature, e.g. 'image [2, 3, 64, 64] (and 9 more leaves)'."""
    index, path, shape, _ = max(signature, key=lambda s: (len(s[2]), torch.Size(s[2]).numel()))
    return f"{path or f'input {index}'} {list(shape)} (and {len(signature) - 1} more leaves)"


class _Entry:
    """One recorded input signature: its static input buffers, its replay and the output holder."""

    def __init__(self, inputs: list, replay: Callable[[], None], holder: list, graphed: bool):
        self.inputs, self.input_leaves = inputs, [leaf for x in inputs for leaf in tree.leaves(x)]
        self.replay, self.holder, self.graphed = replay, holder, graphed


class GraphedFunction:
    """The stateful runner around a pure function (module docstring).

    fn(state, *inputs) -> (new_state, outputs) when `updates_state` (a train step), else -> outputs (the eval
    forward, state the parameters); all trees of tensors, new_state of the state's structure, shapes and dtypes.
    runner(state, *inputs) returns (static state, outputs) or outputs, overwritten by the next call.

    Args:
      fn: the pure function (eager or torch.compile'd).
      capture: how a call is recorded (CudaGraphCapture; tests pass an eager stand-in).
      name: what fn is, for log messages.
    """

    def __init__(self, fn: Callable, device: torch.device | str, capture: Capture, *, updates_state: bool,
                 name: str = "the step"):
        self.fn, self.device, self.capture = fn, torch.device(device), capture
        self.updates_state, self.name = updates_state, name
        self.state: Any = None  # the static state tree, made on the first call
        self._state_leaves: list[torch.Tensor] = []
        self._entries: dict[tuple, _Entry] = {}

    @property
    def signatures(self) -> int:
        """How many input signatures have been recorded (graphed or fallen back to eager)."""
        return len(self._entries)

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, device=self.device).copy_(x)

    def load_state(self, state) -> None:
        """Copies `state` into the static state buffers (made from it on the first call), skipping the buffers.

        Raises:
          ValueError: the structure, a shape or a dtype differs from the buffers'.
        """
        if self.state is None:
            self.state = tree.map(self._static, state)
            self._state_leaves = tree.leaves(self.state)
            return
        leaves = tree.leaves(state)
        if len(leaves) != len(self._state_leaves):
            raise ValueError(f"{self.name}: the state has {len(leaves)} leaves, the graph's buffers "
                             f"{len(self._state_leaves)}; a runner keeps one state structure")
        for (path, src), dst in zip(tree.leaves_with_paths(state), self._state_leaves):
            if src is dst:
                continue
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"{self.name}: state leaf {path!r} is {tuple(src.shape)} {src.dtype}, the "
                                 f"graph's buffer {tuple(dst.shape)} {dst.dtype}")
            dst.copy_(src)

    def _commit(self, new_state) -> None:
        """Copies a new state into the static state buffers (inside the graph when captured)."""
        new_leaves = tree.leaves(new_state)
        if len(new_leaves) != len(self._state_leaves):
            raise ValueError(f"{self.name} returned a state of {len(new_leaves)} leaves for one of "
                             f"{len(self._state_leaves)}")
        buffers = {id(b) for b in self._state_leaves}
        pairs = [(dst, src.clone() if id(src) in buffers else src)  # a buffer moved elsewhere: read it first
                 for src, dst in zip(new_leaves, self._state_leaves) if src is not dst]
        for dst, src in pairs:
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"{self.name} returned a state leaf of {tuple(src.shape)} {src.dtype} for a "
                                 f"buffer of {tuple(dst.shape)} {dst.dtype}")
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    def _record(self, signature: tuple, inputs: tuple) -> _Entry:
        static_inputs = [tree.map(self._static, x) for x in inputs]
        holder: list = []

        def warmup() -> None:
            self.fn(self.state, *static_inputs)

        def body() -> None:
            result = self.fn(self.state, *static_inputs)
            if self.updates_state:
                new_state, result = result
                self._commit(new_state)
            holder[:] = [result]

        try:
            replay, graphed = self.capture(body, warmup), True
            log.info("%s: CUDA graph recorded for %s", self.name, _describe(signature))
        except CaptureError as e:
            replay, graphed = body, False
            found = host_syncs(self.fn, self.state, *static_inputs)
            places = "; ".join(f"{op} at {', '.join(where)}" for op, where in found["where"].items()) or "none"
            log.warning("%s: CUDA graph capture failed for %s, so this shape runs eagerly (same results, "
                        "slower). Error: %s. A captured function must not read device values on the host "
                        "(.item(), bool(tensor), torch.equal, nonzero, boolean indexing, .tolist(), .cpu()); "
                        "retina_fn.train.graph_host.host_syncs found: %s", self.name, _describe(signature), e, places)
        return _Entry(static_inputs, replay, holder, graphed)

    def __call__(self, state, *inputs):
        self.load_state(state)
        signature = _signature(inputs)
        entry = self._entries.get(signature)
        if entry is None:
            entry = self._entries[signature] = self._record(signature, inputs)
        srcs = [leaf for x in inputs for leaf in tree.leaves(x)]
        for dst, src in zip(entry.input_leaves, srcs):
            dst.copy_(src, non_blocking=True)
        entry.replay()
        (outputs,) = entry.holder
        return (self.state, outputs) if self.updates_state else outputs


def graph_or_eager(fn: Callable, device: torch.device | str, *, what: str, updates_state: bool,
                   lift_constants: bool = True, warmup_steps: int = 2, capture: Capture | None = None) -> Callable:
    """`fn` behind a `GraphedFunction` on a CUDA device, or `fn` itself (with a logged reason) elsewhere.

    Args:
      what: its name in log messages; updates_state: see GraphedFunction.
      lift_constants, warmup_steps: CudaGraphCapture's.
      capture: use this instead of CUDA graphs, on any device (tests pass an eager stand-in).
    """
    device = torch.device(device)
    if capture is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            log.warning("train.cuda_graph: %s runs without CUDA graphs on %s (graph capture needs a CUDA device)",
                        what, device)
            return fn
        capture = CudaGraphCapture(device, warmup_steps=warmup_steps, lift_constants=lift_constants)
    return GraphedFunction(fn, device, capture, updates_state=updates_state, name=what)
