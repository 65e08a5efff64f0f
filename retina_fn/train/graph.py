"""CUDA-graph capture of a pure step: a thin stateful runner around a pure function, like a jit cache.

    step = graph_or_eager(train_step, device, what="the train step", updates_state=True)
    state, metrics = step(state, batch)          # copy the batch in, replay, hand back the static state
    run = graph_or_eager(forward, device, what="the eval forward", updates_state=False)
    outputs = run(params, inputs)

The step itself stays pure (retina_fn.train.step); everything stateful about graphs lives here, in
`GraphedFunction`, which holds

- static state buffers: one copy of the state tree (params, optimiser state, step counter, loss scale) that
  every graph reads and, with `updates_state`, overwrites with the new state inside the graph;
- per input signature (the paths, shapes and dtypes of the batch: one per canvas), static input
  buffers and one captured graph; a call copies its inputs into them and replays.

Warm-up runs the pure function on the static buffers and throws its results away (on a side stream, so that
lazy initialisation and algorithm choice happen before the capture), so it never advances the state; the
capture then records one call, including the optimiser update and the copy of the new state into the static
buffers; the first replay performs the first real step. The learning rate and the step counter are device
tensors: the schedule reads state['step'] inside the graph, and the step adds 1 to it there, so a replay needs
nothing from the host.

Donation, as jax's donate_argnums: the state a call returns *is* the static buffers, and the metrics are the
graph's static outputs; the next call overwrites both. Read what you need (or clone it) before the next call.
Passing the returned state back costs nothing; passing any other state (a restored checkpoint, another
run's) copies it into the buffers first, leaf by leaf, and leaves the caller's tensors untouched.

What a captured function must not do (CUDA graphs replay kernels, not Python): read device values on the
host (`.item()`, `bool(t)`, `torch.equal`, data-dependent shapes such as `nonzero` or boolean indexing),
branch in Python on tensor values, or allocate outside the graph's pool. `graph_host.host_syncs` lists such
operations of a function on any device, the CPU included. Tensors built from Python data (`torch.tensor(...,
device=)`, a host-to-device copy that capture refuses) are handled by `graph_host.HostConstants`: made once
during warm-up and read from device memory by the graph. In-place optimisers (apex's fused SGD,
`Optimizer.inplace`) decide skipped steps with a host read of the finite flag and read the learning rate on
the host: they cannot be captured; the native optimisers select on the device (`torch.where`) and can.

Where capture is impossible (no CUDA device, or the capture itself fails), `graph_or_eager` and the runner
log why and run the function eagerly: the results are the same, only slower.
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
    """The error a failure started with: a capture that fails inside `torch.cuda.graph` raises a second error
    while the context closes ('operation failed due to a previous error during capture'), chained to the first."""
    seen = {id(error)}
    while True:
        earlier = error.__cause__ or error.__context__
        if earlier is None or id(earlier) in seen:
            return error
        seen.add(id(earlier))
        error = earlier


class Capture(Protocol):
    """How a runner turns one call into something replayable.

    capture(body, warmup) -> replay: `warmup()` runs the function on the static buffers and discards the
    result (call it as often as needed first); `body()` runs it and writes its results into the static
    buffers and the runner's output holder. `replay()` must have the effect of `body()` on the current
    contents of the static buffers. Raises CaptureError when recording is impossible.
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

    All graphs of one capture object share one memory pool: a runner replays its graphs one at a time on one
    stream and keeps every graph's outputs referenced, so one graph's temporaries may reuse another's.
    Capture uses capture_error_mode='thread_local', so that other threads (the data loader's pin-memory
    thread) may keep calling CUDA while this one captures.

    Args:
      device: the CUDA device.
      warmup_steps: warm-up calls before the capture (cuDNN algorithm choice, lazy initialisation, the
        first call of a compiled function).
      lift_constants: run warm-up and capture under `HostConstants`. Leave it off for a torch.compile'd
        function (inductor folds its constants itself, and a mode around it would change what it traces).
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
    """(path, shape, dtype) of every leaf of every input tree: the static shape a graph is recorded for."""
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
    """The stateful runner around a pure function (see the module docstring): static buffers and one graph
    per input signature.

    The function is fn(state, *inputs) -> (new_state, outputs) when `updates_state` (a train step: state the
    train state, inputs (batch,)), else fn(state, *inputs) -> outputs (the eval forward: state the
    parameters). state and every input are trees of tensors; new_state has the state's structure, shapes and
    dtypes, and its leaves are new tensors or the given leaves themselves (as a pure function returns).

    Args:
      fn: the pure function (eager or torch.compile'd).
      device: where the static buffers live (the graphs' device).
      capture: how a call is recorded (CudaGraphCapture; tests pass an eager stand-in).
      updates_state: whether fn returns a new state to keep (see above).
      name: what fn is, for log messages.

    Calling it: runner(state, *inputs) -> (static state, outputs) when updates_state, else outputs; the
    returned tensors are overwritten by the next call (donation, see the module docstring).
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
        """Copies `state` into the static state buffers (made from it on the first call); leaves that already
        are the buffers are skipped.

        Args:
          state: a tree with the structure, shapes and dtypes of the first state given.

        Raises:
          ValueError: the state's structure, a shape or a dtype differs from the buffers'.
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
      fn: the pure function (see GraphedFunction).
      device: where it runs.
      what: its name in log messages (e.g. 'the train step').
      updates_state: see GraphedFunction.
      lift_constants: CudaGraphCapture's (False for a torch.compile'd fn).
      warmup_steps: CudaGraphCapture's.
      capture: use this instead of CUDA graphs, on any device (tests pass an eager stand-in).

    Returns:
      A callable with fn's arguments (see GraphedFunction for what it returns), or fn.
    """
    device = torch.device(device)
    if capture is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            log.warning("train.cuda_graph: %s runs without CUDA graphs on %s (graph capture needs a CUDA device)",
                        what, device)
            return fn
        capture = CudaGraphCapture(device, warmup_steps=warmup_steps, lift_constants=lift_constants)
    return GraphedFunction(fn, device, capture, updates_state=updates_state, name=what)
